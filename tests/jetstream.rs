//! Gateway replicas on one NATS JetStream stream, against a real nats-server: the machine's one
//! on 127.0.0.1:4222 (a unique stream per test), or a private one that the test restarts.

mod binary;
mod nats;
mod private_nats;

use std::collections::{HashMap, HashSet};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binary::{event, Process};
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};
use nats::{reachable, require, TestStream, SHARED_NATS};
use private_nats::{free_port, PrivateNats};
use tokio_stream::StreamExt;

async fn post(http: &reqwest::Client, process: &Process, id: i64) -> Option<u64> {
    let response = http
        .post(process.url("/v1/events"))
        .header("content-type", "application/json")
        .body(event(id))
        .send()
        .await
        .ok()?;
    if response.status() != 200 {
        return None;
    }
    response.json::<serde_json::Value>().await.ok()?["sequence"].as_u64()
}

/// Collects `(sequence, event id)` from a subscription into `sink` until it ends.
fn collect(
    mut stream: tonic::Streaming<iqchannels_gateway::pb::client::Event>,
    sink: Arc<Mutex<Vec<(u64, i64)>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(Ok(event)) = stream.next().await {
            let id = event
                .envelope
                .and_then(|e| e.chat_event)
                .map(|c| c.id)
                .unwrap_or(-1);
            sink.lock().unwrap().push((event.sequence, id));
        }
    })
}

async fn wait_for(sink: &Arc<Mutex<Vec<(u64, i64)>>>, count: usize) {
    for _ in 0..200 {
        if sink.lock().unwrap().len() >= count {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_one_order_and_a_cursor_moves_between_them() {
    if !require(
        "NATS with JetStream on 127.0.0.1:4222",
        reachable(SHARED_NATS),
    ) {
        return;
    }
    let stream = TestStream::new(SHARED_NATS);
    let store = format!("nats://{SHARED_NATS}");
    let mut a = Process::start(&stream.args(&store));
    let b = Process::start(&stream.args(&store));

    let seen_a: Arc<Mutex<Vec<(u64, i64)>>> = Arc::default();
    let seen_b: Arc<Mutex<Vec<(u64, i64)>>> = Arc::default();
    let from_start = || SubscribeRequest {
        start: Some(Start::Beginning(())),
        ..SubscribeRequest::default()
    };
    let sub_a = collect(
        a.grpc()
            .await
            .subscribe(from_start())
            .await
            .unwrap()
            .into_inner(),
        seen_a.clone(),
    );
    let _sub_b = collect(
        b.grpc()
            .await
            .subscribe(from_start())
            .await
            .unwrap()
            .into_inner(),
        seen_b.clone(),
    );

    // Events posted to both replicas, duplicates too.
    let http = reqwest::Client::new();
    let mut acked = HashMap::new();
    for id in 1..=60 {
        let target = if id % 2 == 0 { &a } else { &b };
        acked.insert(id, post(&http, target, id).await.expect("stored"));
    }
    assert_eq!(
        post(&http, &a, 7).await,
        Some(acked[&7]),
        "a redelivery to the other replica is a duplicate"
    );
    wait_for(&seen_a, 60).await;
    wait_for(&seen_b, 60).await;
    assert_eq!(
        *seen_a.lock().unwrap(),
        *seen_b.lock().unwrap(),
        "both replicas stream one order"
    );

    // Kill A mid-ingest; A's subscriber resumes on B from its cursor.
    let writer = {
        let (http, url) = (http.clone(), b.url("/v1/events"));
        tokio::spawn(async move {
            for id in 61..=260 {
                let sent = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(event(id))
                    .send()
                    .await;
                assert_eq!(sent.expect("B answers").status(), 200);
            }
        })
    };
    for id in 1000..1100 {
        if post(&http, &a, id).await.is_none() {
            break;
        }
        if id == 1040 {
            a.kill();
        }
    }
    sub_a.await.unwrap();
    let before: Vec<(u64, i64)> = seen_a.lock().unwrap().clone();
    let cursor = before.last().expect("A's subscriber received events").0;
    writer.await.unwrap();

    let resumed: Arc<Mutex<Vec<(u64, i64)>>> = Arc::default();
    let request = SubscribeRequest {
        start: Some(Start::AfterSequence(cursor)),
        ..SubscribeRequest::default()
    };
    let _sub = collect(
        b.grpc()
            .await
            .subscribe(request)
            .await
            .unwrap()
            .into_inner(),
        resumed.clone(),
    );
    let total = seen_b.lock().unwrap().len();
    wait_for(&resumed, 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total_b = seen_b.lock().unwrap().clone();
    assert!(total_b.len() >= total);
    let mut joined = before.clone();
    joined.extend(resumed.lock().unwrap().iter().copied());
    assert_eq!(
        joined, total_b,
        "cursor from A resumed on B: nothing missing, nothing repeated"
    );
    let sequences: Vec<u64> = joined.iter().map(|(s, _)| *s).collect();
    assert_eq!(sequences, (1..=joined.len() as u64).collect::<Vec<_>>());
    let ids: HashSet<i64> = joined.iter().map(|(_, id)| *id).collect();
    assert_eq!(ids.len(), joined.len(), "every event stored once");
    for id in 61..=260 {
        assert!(
            ids.contains(&id),
            "event {id} acknowledged by B is in the stream"
        );
    }
}

/// Dedup on NATS holds within the duplicate window (`Nats-Msg-Id`): a redelivery after it is
/// stored again, as README says, and a lookup by id finds the first copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redelivery_after_the_duplicate_window_is_stored_again_and_found_first_by_id() {
    use iqchannels_gateway::pb::client::{get_event_request::Key, GetEventRequest};
    if !require(
        "NATS with JetStream on 127.0.0.1:4222",
        reachable(SHARED_NATS),
    ) {
        return;
    }
    let stream = TestStream::new(SHARED_NATS);
    let store = format!("nats://{SHARED_NATS}");
    let mut args = stream.args(&store);
    args.extend(["--nats-duplicate-window", "1s"]);
    let process = Process::start(&args);
    let http = reqwest::Client::new();
    let first = post(&http, &process, 42).await.expect("stored");
    let answer = |sequence: u64, duplicate: bool| serde_json::json!({"sequence": sequence, "duplicate": duplicate});
    let body = process.post_event_answer(42).await;
    assert_eq!(body, answer(first, true), "within the window");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let body = process.post_event_answer(42).await;
    assert_eq!(body, answer(first + 1, false), "after the window");
    let found = process
        .grpc()
        .await
        .get_event(GetEventRequest {
            key: Some(Key::EventId(42)),
            ..GetEventRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.sequence, first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_restart_during_ingest_answers_503_then_continues_without_gap_or_repeat() {
    if !require("the nats-server binary", private_nats::installed()) {
        return;
    }
    let nats = PrivateNats::start(free_port(), tempfile::tempdir().unwrap())
        .expect("private nats-server starts");
    let store = format!("nats://127.0.0.1:{}", nats.port);
    let process = Process::start(&["--store", &store, "--nats-ack-timeout", "1s"]);

    let seen: Arc<Mutex<Vec<(u64, i64)>>> = Arc::default();
    let request = SubscribeRequest {
        start: Some(Start::Beginning(())),
        ..SubscribeRequest::default()
    };
    let _sub = collect(
        process
            .grpc()
            .await
            .subscribe(request)
            .await
            .unwrap()
            .into_inner(),
        seen.clone(),
    );

    let http = reqwest::Client::new();
    let mut acked = HashMap::new();
    for id in 1..=50 {
        acked.insert(id, post(&http, &process, id).await.expect("stored"));
    }
    let (port, dir) = nats.stop();
    // While NATS is down: 503, and not ready. Never 200 without JetStream's ack.
    let mut refused = 0;
    for id in 51..=55 {
        match post(&http, &process, id).await {
            Some(sequence) => drop(acked.insert(id, sequence)),
            None => refused += 1,
        }
    }
    assert!(refused > 0, "ingest is refused while NATS is down");
    assert_eq!(
        http.get(process.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        503
    );

    let _nats =
        PrivateNats::start(port, dir).expect("nats-server restarts on the same port and store");
    let id = 56;
    let mut recovered = false;
    for _ in 0..100 {
        if let Some(sequence) = post(&http, &process, id).await {
            acked.insert(id, sequence);
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "the gateway reconnects by itself");
    for next in id + 1..=id + 50 {
        acked.insert(
            next,
            post(&http, &process, next)
                .await
                .expect("stored after reconnect"),
        );
    }
    assert_eq!(
        http.get(process.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    let stored_count = acked.values().collect::<HashSet<_>>().len();
    wait_for(&seen, stored_count).await;
    let seen = seen.lock().unwrap().clone();
    let sequences: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        sequences,
        (1..=seen.len() as u64).collect::<Vec<_>>(),
        "no gap or repeat across the restart"
    );
    let by_id: HashMap<i64, u64> = seen.iter().map(|&(s, i)| (i, s)).collect();
    for (id, sequence) in &acked {
        assert_eq!(
            by_id.get(id),
            Some(sequence),
            "acknowledged event {id} delivered"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cluster_form_of_store_a_comma_separated_server_list_starts_and_stores() {
    if !require(
        "NATS with JetStream on 127.0.0.1:4222",
        reachable(SHARED_NATS),
    ) {
        return;
    }
    let stream = TestStream::new(SHARED_NATS);
    // As README shows it, with a space after the comma, and one server that is down: the
    // gateway connects to the other.
    let store = format!("nats://127.0.0.1:{}, nats://{SHARED_NATS}", free_port());
    let process = Process::start(&stream.args(&store));
    let http = reqwest::Client::new();
    assert_eq!(post(&http, &process, 1).await, Some(1));
    assert_eq!(post(&http, &process, 2).await, Some(2));
}

#[test]
fn a_malformed_server_list_is_refused_naming_the_bad_entry() {
    let output = Command::new(env!("CARGO_BIN_EXE_iqchannels-gateway"))
        .args([
            "serve",
            "--store",
            "nats://127.0.0.1:4222, nats://127.0.0.1:42x2",
        ])
        .output()
        .expect("the gateway binary runs");
    assert!(!output.status.success(), "the gateway started");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("NATS server `nats://127.0.0.1:42x2` is invalid: invalid port number"),
        "{stderr}"
    );
}

/// A nats-server that freezes (SIGSTOP: its connections stay open, nothing answers) while events
/// keep arriving: the gateway must notice (pings) and say it is not ready, answer 503 rather
/// than hang, and recover once the server answers again. With async-nats 0.46 every publish
/// restarted the ping timer, so a gateway under steady ingest never noticed a frozen server
/// and could not fail over to another node of a cluster (found by tests/cluster_faults.rs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_nats_server_is_noticed_under_steady_ingest_and_recovered_from() {
    let has_server = Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok();
    if !require("the nats-server binary", has_server) {
        return;
    }
    let nats = PrivateNats::start(free_port(), tempfile::tempdir().unwrap())
        .expect("private nats-server starts");
    let store = format!("nats://127.0.0.1:{}", nats.port);
    let process = Arc::new(Process::start(&[
        "--store",
        &store,
        "--nats-ack-timeout",
        "1s",
    ]));
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(post(&http, &process, 1).await.is_some(), "stored before");

    // Steady ingest: a publish at least every 100 ms.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (http, process, stop) = (http.clone(), process.clone(), stop.clone());
        tokio::spawn(async move {
            let mut id = 2;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = post(&http, &process, id).await;
                id += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    nats.signal(libc::SIGSTOP);
    let frozen = std::time::Instant::now();
    let mut noticed = None;
    while frozen.elapsed() < Duration::from_secs(30) {
        let ready = http.get(process.url("/readyz")).send().await.unwrap();
        if ready.status() == 503 {
            noticed = Some(frozen.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nats.signal(libc::SIGCONT);
    let noticed = noticed.expect("the gateway noticed the frozen server within 30 s");
    assert!(
        noticed < Duration::from_secs(15),
        "noticed after {noticed:?}"
    );

    let mut recovered = false;
    for _ in 0..150 {
        let ready = http.get(process.url("/readyz")).send().await.unwrap();
        if ready.status() == 200 && post(&http, &process, 1_000_000).await.is_some() {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.await.unwrap();
    assert!(recovered, "ready and storing again once the server answers");
}

/// Printable ASCII that zstd cannot shrink much (about 6.6 bits a byte): `len` bytes from a
/// xorshift generator, without `"` or `\\`.
fn incompressible(len: usize, mut seed: u64) -> String {
    let mut out = String::with_capacity(len);
    while out.len() < len {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let c = (b' ' + (seed % 95) as u8) as char;
        if c != '"' && c != '\\' {
            out.push(c);
        }
    }
    out
}

/// An event whose record, compressed, is over the NATS server's `max_payload` cannot be stored:
/// it is refused with 413 naming the limit and the setting that raises it (never a 503 the
/// sender would retry forever), decided from the record's actual size: a larger body that
/// compresses under the limit is stored. The start warns when `--max-body-bytes` allows bodies
/// over `max_payload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_whose_record_is_over_the_nats_max_payload_is_refused_with_413_naming_the_limit() {
    if !require(
        "NATS with JetStream on 127.0.0.1:4222",
        reachable(SHARED_NATS),
    ) {
        return;
    }
    let stream = TestStream::new(SHARED_NATS);
    let store = format!("nats://{SHARED_NATS}");
    let mut args = stream.args(&store);
    args.extend(["--max-body-bytes", "4194304"]);
    let process = Process::start(&args);
    let warned = process
        .logged()
        .iter()
        .any(|line| line.contains("max_payload is 1048576 bytes") && line.contains("WARN"));
    assert!(warned, "the start warns: {:#?}", process.logged());

    let fixture = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/message_created_file.json"
    ));
    let http = reqwest::Client::new();
    let send = |body: serde_json::Value| {
        http.post(process.url("/v1/events"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
    };
    // 1 MB of text that compresses well: over max_payload as a body, under it as a record.
    let mut body: serde_json::Value = serde_json::from_str(fixture).unwrap();
    body["ChatEvent"]["Id"] = 1001.into();
    body["Rels"]["ChatMessages"][0]["Text"] = "я".repeat(530_000).into();
    let response = send(body).await.unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());

    // 1.3 MB and more that does not compress (to about 0.83), in an unknown field (the typed
    // form stays small): over, in records of 1.08 MB and 1.24 MB.
    for (id, len) in [(1002, 1_500_000), (1003, 1_300_000)] {
        let mut body: serde_json::Value = serde_json::from_str(fixture).unwrap();
        body["ChatEvent"]["Id"] = id.into();
        body["Padding"] = incompressible(len, id as u64).into();
        let response = send(body).await.unwrap();
        let status = response.status();
        let retry_after = response.headers().get("retry-after").cloned();
        let answer: serde_json::Value = response.json().await.unwrap();
        assert_eq!(status, 413, "{answer}");
        assert!(retry_after.is_none());
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("max_payload is 1048576 bytes") && error.contains("raise `max_payload`"),
            "{answer}"
        );
    }
    // The gateway is fine otherwise.
    assert_eq!(post(&http, &process, 7).await, Some(2));
}
