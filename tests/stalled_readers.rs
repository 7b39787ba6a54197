//! Slow subscribers cost nothing to others (DESIGN invariant 4), on the real binary: clients that
//! stop reading (gRPC and SSE) hold all of `--catch-up-memory`, and a client that reads still
//! gets every event, from the beginning and live. Their connections are closed once another has
//! waited `--subscriber-stall-timeout` for the memory they hold; before that rule, the reader
//! waited for ever.

mod binary;
mod stall;

use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};
use stall::{stalled_grpc, stalled_sse};

/// An event of about `bytes`, padded with a field the proto does not know (raw JSON only).
fn event(id: i64, bytes: usize) -> String {
    format!(
        r#"{{"ChatEvent":{{"Id":{id},"Type":"message_created","ChatId":13}},"Padding":"{}"}}"#,
        "x".repeat(bytes)
    )
}

async fn post(http: &reqwest::Client, gateway: &Process, id: i64, bytes: usize) {
    let response = http
        .post(gateway.url("/v1/events"))
        .header("content-type", "application/json")
        .body(event(id, bytes))
        .send()
        .await
        .expect("posted");
    assert_eq!(response.status(), 200, "{:?}", response.text().await);
}

/// A gateway on the memory store with these budgets, holding `events` events of about `bytes`.
async fn with_events(
    catch_up_memory: usize,
    stall_timeout: &str,
    events: i64,
    bytes: usize,
) -> (Process, reqwest::Client) {
    let catch_up_memory = catch_up_memory.to_string();
    let gateway = Process::start(&[
        "--store",
        "memory",
        "--catch-up-memory",
        &catch_up_memory,
        "--subscriber-stall-timeout",
        stall_timeout,
    ]);
    let http = reqwest::Client::new();
    for id in 1..=events {
        post(&http, &gateway, id, bytes).await;
    }
    (gateway, http)
}

/// A gRPC subscriber from the beginning that reads everything it is sent, in a task.
async fn reader_from_the_beginning(gateway: &Process) -> tokio::task::JoinHandle<()> {
    let mut client = gateway.grpc().await;
    let mut stream = client
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribed")
        .into_inner();
    tokio::spawn(async move { while let Ok(Some(_)) = stream.message().await {} })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_gets_every_event_while_stalled_readers_hold_all_the_memory() {
    // 60 events of 100 KB: three times the budget.
    const EVENTS: i64 = 60;
    let (gateway, http) = with_events(2_097_152, "1s", EVENTS, 100_000).await;
    // Readers that stop reading, from the beginning: together they hold all 2 MiB.
    let mut grpc = Vec::new();
    for _ in 0..8 {
        grpc.push(stalled_grpc(gateway.addr, Some(Start::Beginning(())), 65_535).await);
    }
    let sse: Vec<_> = (0..4)
        .map(|_| stalled_sse(gateway.addr, "from=beginning"))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = gateway.metric("iqgw_subscriber_held_bytes").await;
    assert!(
        held > 1_500_000,
        "the stalled readers hold the budget: {held}"
    );

    // A reader that reads gets everything, from the beginning, then live.
    let mut client = gateway.grpc().await;
    let mut stream = client
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribed")
        .into_inner();
    for sequence in 1..=EVENTS as u64 {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap_or_else(|_| panic!("waited for sequence {sequence} in vain"))
            .expect("the stream goes on")
            .expect("an event");
        assert_eq!(event.sequence, sequence);
    }
    post(&http, &gateway, EVENTS + 1, 100_000).await;
    let live = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("the live event in time")
        .expect("the stream goes on")
        .expect("an event");
    assert_eq!(live.sequence, EVENTS as u64 + 1);

    // The stalled readers' connections were closed, and counted.
    let evicted = gateway.metric("iqgw_subscribers_evicted_total").await;
    assert!(evicted >= 1, "evictions counted: {evicted}");
    let mut closed = 0;
    for (_client, mut body) in grpc {
        // A closed connection ends the stream with an error (or ends it) once what it had
        // received is read.
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match body.data().await {
                    Some(Ok(data)) => {
                        let _ = body.flow_control().release_capacity(data.len());
                    }
                    _ => return,
                }
            }
        })
        .await;
        closed += usize::from(ended.is_ok());
    }
    assert!(closed >= 1, "no stalled gRPC connection was closed");
    drop(sse);
}

/// Readers that read slowly but steadily are never closed, however large the events, while
/// another waits for the memory they hold (found from outside: a reader draining 900 KB events
/// at 50 KB/s was closed as stalled, since an event's bytes came back only once all of it was
/// written; they now come back in pieces of 64 KiB as the client reads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_readers_are_not_closed_while_others_wait() {
    let (gateway, _http) = with_events(4_194_304, "2s", 30, 900_000).await;
    // Three readers that take about 64 KB a second each, from the beginning.
    let received: Vec<std::sync::Arc<std::sync::atomic::AtomicUsize>> =
        (0..3).map(|_| std::sync::Arc::default()).collect();
    let mut readers = Vec::new();
    for count in &received {
        let request = SubscribeRequest {
            start: Some(Start::Beginning(())),
            include_raw_json: true,
            ..SubscribeRequest::default()
        };
        let (client, mut body) =
            stall::stalled_request(gateway.addr, request, 65_535, Some(65_535)).await;
        let count = count.clone();
        readers.push(tokio::spawn(async move {
            let _client = client;
            while let Some(Ok(data)) = body.data().await {
                count.fetch_add(data.len(), std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
                let _ = body.flow_control().release_capacity(data.len());
            }
        }));
    }
    // Another subscriber waits for memory meanwhile.
    let waiter = reader_from_the_beginning(&gateway).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        gateway.metric("iqgw_subscribers_evicted_total").await,
        0,
        "no slow reader was closed"
    );
    for (i, count) in received.iter().enumerate() {
        let bytes = count.load(std::sync::atomic::Ordering::Relaxed);
        assert!(bytes > 300_000, "reader {i} went on reading: {bytes} bytes");
    }
    for reader in readers {
        reader.abort();
    }
    waiter.abort();
}

/// SSE readers taking about 50 KB a second are never closed while another waits, though the
/// kernel's socket buffers (megabytes) mean none of the bytes held for them reach the socket for
/// many seconds: the kernel's count of bytes the client acknowledged shows that it reads (found
/// from outside: such readers were closed as "read nothing").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sse_readers_behind_large_socket_buffers_are_not_closed() {
    use std::io::{Read, Write};
    let (gateway, _http) = with_events(4_194_304, "2s", 30, 900_000).await;
    let addr = gateway.addr;
    let readers: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut socket = std::net::TcpStream::connect(addr).expect("connects");
                write!(
                    socket,
                    "GET /v1/events:stream?from=beginning HTTP/1.1\r\nHost: gateway\r\n\r\n"
                )
                .expect("sent");
                let started = std::time::Instant::now();
                let (mut total, mut buffer) = (0usize, [0u8; 5000]);
                while started.elapsed() < Duration::from_secs(12) {
                    match socket.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n,
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
                total
            })
        })
        .collect();
    let waiter = reader_from_the_beginning(&gateway).await;
    let totals: Vec<usize> = tokio::task::spawn_blocking(move || {
        readers
            .into_iter()
            .map(|reader| reader.join().expect("reads"))
            .collect()
    })
    .await
    .expect("joins");
    assert_eq!(
        gateway.metric("iqgw_subscribers_evicted_total").await,
        0,
        "no slow SSE reader was closed; they read {totals:?} bytes"
    );
    waiter.abort();
}
