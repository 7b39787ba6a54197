//! Retention by age runs on a timer on every local store: on a quiet gateway (no new writes) the
//! real binary removes expired events seconds later (`first_sequence` in `/v1/stats` moves), and a
//! subscriber resuming from a removed position is told so (`OUT_OF_RANGE`), never skipped ahead.

mod binary;

use std::time::{Duration, Instant};

use binary::Process;
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};
use tokio_stream::StreamExt;

async fn stats(http: &reqwest::Client, process: &Process) -> serde_json::Value {
    http.get(process.url("/v1/stats"))
        .send()
        .await
        .expect("stats answer")
        .json()
        .await
        .expect("stats are JSON")
}

/// Posts three events, then writes nothing more: within a few seconds of their 2 s age every one
/// is removed, and resuming after the first answers OUT_OF_RANGE naming the next sequence.
async fn expired_events_go_without_new_writes(process: &Process) {
    let http = reqwest::Client::new();
    for id in 1..=3 {
        assert_eq!(process.post_event(id).await, 200);
    }
    let before = stats(&http, process).await;
    assert_eq!(before["first_sequence"], 1, "{before}");
    assert_eq!(before["last_sequence"], 3, "{before}");

    let started = Instant::now();
    let after = loop {
        let now = stats(&http, process).await;
        if now["first_sequence"] == 4 || started.elapsed() > Duration::from_secs(10) {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        after["first_sequence"], 4,
        "events older than 2 s are removed with no new write: {after}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "removed within seconds of expiring, took {:?}",
        started.elapsed()
    );

    let mut client = process.grpc().await;
    let request = SubscribeRequest {
        start: Some(Start::AfterSequence(1)),
        ..SubscribeRequest::default()
    };
    let answer = match client.subscribe(request).await {
        Ok(response) => {
            let mut stream = response.into_inner();
            tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("the stream answers")
                .expect("the stream ends with a status")
                .map(|event| event.sequence)
        }
        Err(status) => Err(status),
    };
    let status = answer.expect_err("a removed position is not skipped silently");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(
        status.message().contains('4'),
        "names the oldest retained: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_retention_removes_expired_events_on_a_quiet_memory_gateway() {
    let process = Process::start(&["--store", "memory", "--retention-max-age", "2s"]);
    expired_events_go_without_new_writes(&process).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn age_retention_removes_expired_events_on_a_quiet_embedded_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::embedded(dir.path(), &["--retention-max-age", "2s"]);
    expired_events_go_without_new_writes(&process).await;
}
