//! Memory stays within the configured bounds however many subscribers stop reading (DESIGN
//! invariant 4), and is given back when they leave: raw HTTP/2 clients subscribe from the
//! beginning over large events in the embedded store and never open their flow-control window
//! again, against the real binary, whose resident memory is read from /proc.

mod binary;
mod stall;

use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};

/// Each stored event's size: a padding field the proto does not know, kept in the raw JSON.
const EVENT_BYTES: usize = 100 * 1024;
const EVENTS: i64 = 300;
const STREAMS: usize = 60;
/// `--catch-up-memory` of the gateway under test.
const BUDGET: usize = 8 << 20;

fn big_event(id: i64) -> String {
    format!(
        r#"{{"ChatEvent":{{"Id":{id},"Type":"message_created","ChatId":13}},"Padding":"{}"}}"#,
        "x".repeat(EVENT_BYTES)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscribers_hold_at_most_the_catch_up_budget_and_give_it_back() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let budget = BUDGET.to_string();
    let gateway = Process::embedded(
        dir.path(),
        &[
            "--catch-up-memory",
            &budget,
            "--store-cache-bytes",
            "4194304",
        ],
    );
    let http = reqwest::Client::new();
    for id in 1..=EVENTS {
        let response = http
            .post(gateway.url("/v1/events"))
            .header("content-type", "application/json")
            .body(big_event(id))
            .send()
            .await
            .expect("posted");
        assert_eq!(response.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let baseline = gateway.rss_kib();

    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        streams.push(
            stall::stalled_request(
                gateway.addr,
                SubscribeRequest {
                    start: Some(Start::Beginning(())),
                    ..SubscribeRequest::default()
                },
                16 * 1024,
                None,
            )
            .await,
        );
    }
    // Let every subscription read what it will while its client does not read.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stalled = gateway.rss_kib();
    // The budget, plus per stream one event in its page and what HTTP/2 buffers, plus slack.
    let bound_kib = (BUDGET + STREAMS * (2 * EVENT_BYTES + (128 << 10))) as u64 / 1024 + 32 * 1024;
    let grown = stalled.saturating_sub(baseline);
    assert!(
        grown < bound_kib,
        "RSS grew by {grown} KiB with {STREAMS} stalled subscribers (bound {bound_kib} KiB; \
         baseline {baseline} KiB)"
    );

    // A subscriber that reads still gets everything while the others stall.
    let mut client = gateway.grpc().await;
    let mut stream = client
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribes")
        .into_inner();
    for sequence in 1..=EVENTS as u64 {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("in time")
            .expect("no error")
            .expect("not ended");
        assert_eq!(event.sequence, sequence);
    }
    drop(stream);

    drop(streams);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let after = gateway.rss_kib();
    eprintln!("RSS KiB: baseline {baseline}, stalled {stalled}, after {after}");
    assert!(
        after.saturating_sub(baseline) < 48 * 1024,
        "RSS stayed {after} KiB after the subscribers left (baseline {baseline} KiB)"
    );
}
