//! A filter that matches nothing costs little per event (issue 18, point 6), on the real binary
//! over real sockets: 50 streams from the beginning whose filter matches nothing look at every
//! stored record's filter keys in place and copy or decode none of them
//! (`iqgw_catch_up_records_scanned_total` against `iqgw_catch_up_records_kept_total`), while a
//! stream whose filter matches some gets exactly those, in order; on the memory, embedded and
//! JetStream stores. The CPU this saves is measured
//! by `cargo bench --bench fanout -- --only filtered` (BENCHMARKS.md), not here.

mod binary;
mod nats;

use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::{subscribe_request::Start, Filter, SubscribeRequest};

const EVENTS: u64 = 5_000;
const STREAMS: u64 = 50;

/// Every fifth event is `chat_closed`, the rest `message_created`.
async fn store(gateway: &Process) {
    let http = reqwest::Client::new();
    for chunk in 0..EVENTS / 500 {
        let body: String = (1..=500)
            .map(|i| {
                let id = chunk * 500 + i;
                let kind = if id % 5 == 0 {
                    "chat_closed"
                } else {
                    "message_created"
                };
                format!(
                    r#"{{"ChatEvent":{{"Id":{id},"Type":"{kind}","ChatId":{}}}}}"#,
                    id % 7
                ) + "\n"
            })
            .collect();
        let response = http
            .post(gateway.url("/v1/events:batch"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await
            .expect("batch posted");
        assert_eq!(response.status(), 200);
    }
}

fn request(types: &[&str]) -> SubscribeRequest {
    SubscribeRequest {
        start: Some(Start::Beginning(())),
        filter: Some(Filter {
            event_types: types.iter().map(|t| (*t).to_owned()).collect(),
            ..Filter::default()
        }),
        ..SubscribeRequest::default()
    }
}

async fn check(gateway: Process) {
    store(&gateway).await;
    let client = gateway.grpc().await;
    let mut idle = Vec::new();
    for _ in 0..STREAMS {
        let mut client = client.clone();
        idle.push(
            client
                .subscribe(request(&["no_such_type"]))
                .await
                .expect("subscribed")
                .into_inner(),
        );
    }
    // Every non-matching stream looks at every record once it has caught up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let scanned = loop {
        let scanned = gateway.metric("iqgw_catch_up_records_scanned_total").await;
        if scanned >= STREAMS * EVENTS || tokio::time::Instant::now() > deadline {
            break scanned;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        scanned >= STREAMS * EVENTS,
        "{scanned} records looked at, {} expected",
        STREAMS * EVENTS
    );
    assert_eq!(
        gateway.metric("iqgw_catch_up_records_kept_total").await,
        0,
        "a filter that matches nothing copies and decodes nothing"
    );

    // A matching filter gets exactly its events, in order, and keeps only those.
    let mut client = client.clone();
    let mut closed = client
        .subscribe(request(&["chat_closed"]))
        .await
        .expect("subscribed")
        .into_inner();
    for n in 1..=EVENTS / 5 {
        let event = tokio::time::timeout(Duration::from_secs(30), closed.message())
            .await
            .expect("in time")
            .expect("the stream goes on")
            .expect("an event");
        let chat_event = event
            .envelope
            .as_ref()
            .and_then(|e| e.chat_event.as_ref())
            .expect("a chat event");
        assert_eq!(
            (chat_event.r#type.as_str(), chat_event.id % 5),
            ("chat_closed", 0),
            "sequence {}",
            event.sequence
        );
        assert_eq!(event.sequence, n * 5);
    }
    let kept = gateway.metric("iqgw_catch_up_records_kept_total").await;
    assert!(
        (EVENTS / 5..EVENTS / 5 + 64).contains(&kept),
        "{kept} records kept for {} matching events",
        EVENTS / 5
    );
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_matches_nothing_decodes_nothing_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().to_str().expect("UTF-8 path").to_owned();
    check(Process::start(&[
        "--store",
        "embedded",
        "--data-dir",
        &data,
    ]))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_matches_nothing_decodes_nothing_on_the_memory_store() {
    check(Process::start(&["--store", "memory"])).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_matches_nothing_decodes_nothing_on_jetstream() {
    if !nats::require("nats-server", nats::reachable(nats::SHARED_NATS)) {
        return;
    }
    let stream = nats::TestStream::new(nats::SHARED_NATS);
    let store = format!("nats://{}", nats::SHARED_NATS);
    check(Process::start(&stream.args(&store))).await;
}
