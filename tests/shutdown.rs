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
