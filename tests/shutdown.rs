//! SIGTERM on the real binary during ingest: in-flight requests finish, every acknowledged event
//! is durable, subscriber streams end with UNAVAILABLE (so clients reconnect), the process exits.

mod binary;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::{subscribe_request::Start, GetEventRequest, SubscribeRequest};
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_ingest_and_ends_streams_with_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::embedded(dir.path(), &["--shutdown-grace-secs", "5"]);
    let mut client = process.grpc().await;
    let request = SubscribeRequest {
        start: Some(Start::Beginning(())),
        ..SubscribeRequest::default()
    };
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let ended = tokio::spawn(async move {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status.code()),
                None => return None,
            }
        }
    });

    let acked: Arc<Mutex<HashMap<i64, u64>>> = Arc::default();
    let writers = binary::spawn_writers(process.url("/v1/events"), 8, 0, 1_000_000, acked.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    process.terminate();
    let status = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the stream ends")
        .unwrap();
    assert_eq!(
        status,
        Some(tonic::Code::Unavailable),
        "streams end with UNAVAILABLE, never OK"
    );
    for writer in writers {
        writer.await.unwrap();
    }
    let exit = process
        .wait_exit(Duration::from_secs(10))
        .expect("the process exits within the grace period");
    assert!(exit.success(), "clean exit after draining: {exit:?}");

    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    let restarted = Process::embedded(dir.path(), &[]);
    let mut client = restarted.grpc().await;
    for (id, sequence) in acked {
        let request = GetEventRequest {
            key: Some(iqchannels_gateway::pb::client::get_event_request::Key::EventId(id)),
            include_raw_json: false,
            include_references: false,
        };
        let found = client
            .get_event(request)
            .await
            .expect("acknowledged event survived")
            .into_inner();
        assert_eq!(found.sequence, sequence);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_health_watch_reports_not_serving_ends_and_does_not_hold_the_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let dir = tempfile::tempdir().unwrap();
    let grace = Duration::from_secs(20);
    let mut process = Process::embedded(
        dir.path(),
        &["--shutdown-grace-secs", &grace.as_secs().to_string()],
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", process.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch is served")
        .into_inner();
    let first = watch.next().await.expect("a first status").unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let signalled = std::time::Instant::now();
    process.terminate();
    let mut seen = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch.next().await {
                Some(Ok(response)) => seen.push(response.status),
                Some(Err(status)) => return Some(status.code()),
                None => return None,
            }
        }
    })
    .await
    .expect("the watch ends well before the grace period");
    assert_eq!(
        seen.last(),
        Some(&(ServingStatus::NotServing as i32)),
        "NOT_SERVING is reported before the watch ends: {seen:?}, then {end:?}"
    );
    assert_eq!(end, Some(tonic::Code::Unavailable), "never OK");
    let exit = process
        .wait_exit(Duration::from_secs(10))
        .expect("the process exits with the watch open");
    assert!(exit.success(), "{exit:?}");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM to exit took {took:?}, grace period {grace:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_while_draining_is_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::embedded(dir.path(), &["--shutdown-grace-secs", "10"]);
    // A request whose body is still coming keeps the drain going.
    let mut slow = tokio::net::TcpStream::connect(process.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/events HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
          content-length: 1000\r\n\r\n{\"ChatEvent\":",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    process.terminate();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        process.wait_exit(Duration::ZERO).is_none(),
        "still draining the slow request"
    );

    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(3), async {
        let mut fresh = match tokio::net::TcpStream::connect(process.addr).await {
            Ok(fresh) => fresh,
            Err(error) => return Err(error.kind()),
        };
        // Accepted after all: it must at least be closed at once, not left waiting.
        let _ = fresh
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        match fresh.read_to_end(&mut answer).await {
            Ok(_) if answer.is_empty() => Err(std::io::ErrorKind::UnexpectedEof),
            Ok(_) => Ok(String::from_utf8_lossy(&answer).into_owned()),
            Err(error) => Err(error.kind()),
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "a new connection during draining hung for {:?}",
            started.elapsed()
        )
    });
    assert!(
        outcome.is_err(),
        "a new connection during draining is refused, not served: {outcome:?}"
    );
    drop(slow);
}
