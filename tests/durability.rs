//! The embedded store under crashes and slow subscribers, driving the real binary.

mod binary;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binary::{event, Process};
use iqchannels_gateway::pb::client::{subscribe_request::Start, Event, SubscribeRequest};
use tokio_stream::StreamExt;

/// Reads a subscription until it has been idle for `idle`; returns `(sequence, event id)`s.
async fn drain(process: &Process, start: Start, idle: Duration) -> Vec<(u64, i64)> {
    let mut client = process.grpc().await;
    let request = SubscribeRequest {
        start: Some(start),
        ..SubscribeRequest::default()
    };
    let mut stream = client
        .subscribe(request)
        .await
        .expect("subscribe")
        .into_inner();
    let mut seen = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(idle, stream.next()).await {
        seen.push(id_of(&item.expect("stream item")));
    }
    seen
}

fn id_of(event: &Event) -> (u64, i64) {
    let id = event
        .envelope
        .as_ref()
        .and_then(|e| e.chat_event.as_ref())
        .map(|c| c.id)
        .unwrap_or(-1);
    (event.sequence, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_concurrent_ingest_keeps_every_acknowledged_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let acked: Arc<Mutex<HashMap<i64, u64>>> = Arc::default();
    let mut cursor = 0u64;
    // Kill at several points of sustained ingest.
    for (round, kill_after_ms) in [150u64, 600, 1100].into_iter().enumerate() {
        let mut process = Process::embedded(dir.path(), &[]);

        // A subscriber resumes from its cursor and must see exactly the events after it.
        let received: Arc<Mutex<Vec<u64>>> = Arc::default();
        let mut client = process.grpc().await;
        let request = SubscribeRequest {
            start: Some(Start::AfterSequence(cursor)),
            ..SubscribeRequest::default()
        };
        let mut stream = client
            .subscribe(request)
            .await
            .expect("subscribe")
            .into_inner();
        let sink = received.clone();
        let subscriber = tokio::spawn(async move {
            while let Some(Ok(event)) = stream.next().await {
                sink.lock().unwrap().push(event.sequence);
            }
        });

        let first_id = (round as i64 + 1) * 10_000_000;
        let writers = binary::spawn_writers(
            process.url("/v1/events"),
            16,
            first_id,
            100_000,
            acked.clone(),
        );
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        process.kill();
        for writer in writers {
            writer.await.unwrap();
        }
        subscriber.await.unwrap();

        let received = received.lock().unwrap().clone();
        let expected: Vec<u64> = (cursor + 1..cursor + 1 + received.len() as u64).collect();
        assert_eq!(
            received, expected,
            "round {round}: the subscriber got a gap or a repeat"
        );
        cursor = received.last().copied().unwrap_or(cursor);
    }

    let process = Process::embedded(dir.path(), &[]);
    let stored = drain(&process, Start::Beginning(()), Duration::from_secs(2)).await;
    let sequences: Vec<u64> = stored.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sequences,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "sequences have a gap"
    );
    let ids: HashSet<i64> = stored.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), stored.len(), "an event is stored twice");
    let by_id: HashMap<i64, u64> = stored.iter().map(|&(s, id)| (id, s)).collect();
    let acked = acked.lock().unwrap();
    assert!(
        acked.len() > 100,
        "the test should acknowledge a sustained stream, got {}",
        acked.len()
    );
    for (id, sequence) in acked.iter() {
        assert_eq!(
            by_id.get(id),
            Some(sequence),
            "acknowledged event {id} lost or moved"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_subscriber_costs_bounded_memory_and_later_gets_all_events_in_order() {
    const EVENTS: i64 = 100_000;
    const BATCH: i64 = 250;
    let dir = tempfile::tempdir().unwrap();
    let process = Process::embedded(
        dir.path(),
        &["--live-buffer", "1024", "--store-cache-bytes", "16777216"],
    );
    let mut client = process.grpc().await;
    // Subscribed, then never read while everything is ingested.
    let mut stream = client
        .subscribe(SubscribeRequest::default())
        .await
        .expect("subscribe")
        .into_inner();

    let http = reqwest::Client::new();
    // Warm up allocations, then take the baseline.
    post_batch(&http, &process, 0..BATCH).await;
    let baseline = process.rss_kib();
    let mut peak = baseline;
    for start in (BATCH..EVENTS + BATCH).step_by(BATCH as usize) {
        post_batch(&http, &process, start..start + BATCH).await;
        peak = peak.max(process.rss_kib());
    }
    // Configured bounds: 1024 live events (~5 KiB each encoded) + 16 MiB cache; allow generous
    // slack for allocator behaviour, far below the ~400 MiB that holding every event would take.
    let growth_mib = (peak - baseline) / 1024;
    eprintln!("RSS baseline {baseline} KiB, peak {peak} KiB, growth {growth_mib} MiB");
    assert!(
        growth_mib < 96,
        "memory grew by {growth_mib} MiB while a subscriber stalled"
    );

    let mut expected = 1u64;
    while expected <= (EVENTS + BATCH) as u64 {
        let event = tokio::time::timeout(Duration::from_secs(30), stream.next())
            .await
            .expect("events keep coming")
            .expect("stream open")
            .expect("no error");
        assert_eq!(event.sequence, expected, "gap or repeat after resuming");
        expected += 1;
    }
}

async fn post_batch(http: &reqwest::Client, process: &Process, ids: std::ops::Range<i64>) {
    let mut body = Vec::new();
    for id in ids {
        body.extend_from_slice(&event(id + 1));
        body.push(b'\n');
    }
    let response = http
        .post(process.url("/v1/events:batch"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("batch posted");
    assert_eq!(response.status(), 200);
}
