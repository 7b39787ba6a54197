//! Upgrades do not lose data: a store written by the last release before store format versions
//! (`tests/data/format1`, made by `make.py` there with that release's binary) opens with this
//! build and serves every event and dedup entry, and a store of a newer format is refused and
//! left untouched. Drives the real binary.

mod binary;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use binary::Process;
use iqchannels_gateway::log::embedded::FORMAT;
use iqchannels_gateway::pb::client::{
    get_event_request::Key, subscribe_request::Start, Event, GetEventRequest, References,
    SubscribeRequest,
};
use iqchannels_gateway::pb::webhook::v1::Envelope;
use prost::Message;
use redb::{Database, TableDefinition};
use tokio_stream::StreamExt;

/// The table and key where the store keeps its format (read and written here with redb
/// directly, so the test checks the file, not the gateway's own accessor).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const FORMAT_KEY: &str = "format";

/// What the format-1 fixture holds, as that release served it (`events.json`).
#[derive(serde::Deserialize)]
struct Listing {
    events: Vec<Stored>,
    redelivered: Redelivered,
}

#[derive(serde::Deserialize)]
struct Stored {
    sequence: u64,
    event_id: i64,
    #[serde(rename = "type")]
    event_type: String,
    /// The webhook body as posted.
    body: String,
    received_at_ms: i64,
    /// The typed envelope as that release served it.
    envelope_base64: String,
}

#[derive(serde::Deserialize)]
struct Redelivered {
    event_id: i64,
    answer: serde_json::Value,
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/format1")
}

fn listing() -> Listing {
    let text = std::fs::read_to_string(fixture().join("events.json")).expect("events.json");
    serde_json::from_str(&text).expect("events.json parses")
}

/// A data dir holding a copy of the format-1 store.
fn format_1_store() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture().join("events.redb"),
        dir.path().join("events.redb"),
    )
    .expect("the fixture store is copied");
    dir
}

fn stored_format(dir: &Path) -> Option<u64> {
    let db = Database::open(dir.join("events.redb")).expect("the store opens with redb");
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    let format = meta.get(FORMAT_KEY).unwrap().map(|v| v.value());
    format
}

/// Sets the store's format with redb directly, and copies the file to `crashed_copy` while it is
/// still open, as a crash would leave it (redb repairs such a file when it opens it, which
/// writes to it).
fn set_format(dir: &Path, format: u64, crashed_copy: &Path) {
    let db = Database::open(dir.join("events.redb")).expect("the store opens with redb");
    let txn = db.begin_write().unwrap();
    txn.open_table(META)
        .unwrap()
        .insert(FORMAT_KEY, format)
        .unwrap();
    txn.commit().unwrap();
    std::fs::copy(dir.join("events.redb"), crashed_copy.join("events.redb")).unwrap();
}

/// Checks a served event against what the old release stored and served.
fn assert_served(event: &Event, stored: &Stored) {
    let sequence = stored.sequence;
    assert_eq!(event.sequence, sequence);
    let received = event.received_at.expect("received_at");
    assert_eq!(
        received.seconds * 1000 + i64::from(received.nanos) / 1_000_000,
        stored.received_at_ms,
        "sequence {sequence}: received time"
    );
    let old = base64::engine::general_purpose::STANDARD
        .decode(&stored.envelope_base64)
        .expect("base64");
    let envelope = event.envelope.as_ref().expect("a typed envelope");
    assert_eq!(
        *envelope,
        Envelope::decode(old.as_slice()).expect("the old envelope decodes"),
        "sequence {sequence}: typed envelope"
    );
    assert_eq!(
        envelope.encode_to_vec(),
        old,
        "sequence {sequence}: the envelope's bytes are the stored ones"
    );
    let chat_event = envelope.chat_event.as_ref().expect("ChatEvent");
    assert_eq!(chat_event.id, stored.event_id);
    assert_eq!(chat_event.r#type, stored.event_type);
    assert_eq!(
        event.raw_json,
        stored.body.as_bytes(),
        "sequence {sequence}: raw JSON, byte for byte"
    );
    // Stored before the gateway kept deviations and resolved references: none, and an empty
    // References when asked for.
    assert!(event.deviations.is_empty(), "sequence {sequence}");
    assert_eq!(event.references, Some(References::default()));
}

async fn get(process: &Process, key: Key) -> Event {
    process
        .grpc()
        .await
        .get_event(GetEventRequest {
            key: Some(key),
            include_raw_json: true,
            include_references: true,
        })
        .await
        .unwrap_or_else(|status| panic!("GetEvent {key:?}: {status}"))
        .into_inner()
}

async fn post(http: &reqwest::Client, process: &Process, body: Vec<u8>) -> serde_json::Value {
    let response = http
        .post(process.url("/v1/events"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("posted");
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JSON answer")
}

/// Every event of the store from the beginning, until the stream has been idle for a second.
async fn subscribe_all(process: &Process) -> Vec<Event> {
    let mut stream = process
        .grpc()
        .await
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            include_raw_json: true,
            include_references: true,
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    let mut events = Vec::new();
    while let Ok(Some(item)) = tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
        events.push(item.expect("stream item"));
    }
    events
}

fn stop(mut process: Process) {
    process.terminate();
    let status = process
        .wait_exit(Duration::from_secs(30))
        .expect("the gateway exits on SIGTERM");
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_format_1_store_serves_every_event_and_dedup_entry_and_is_upgraded_in_place() {
    let listing = listing();
    let dir = format_1_store();
    assert_eq!(stored_format(dir.path()), None, "the fixture is format 1");
    let process = Process::embedded(dir.path(), &[]);

    let served = subscribe_all(&process).await;
    assert_eq!(
        served.len(),
        listing.events.len(),
        "every event, nothing else"
    );
    for (event, stored) in served.iter().zip(&listing.events) {
        assert_served(event, stored);
    }
    for stored in &listing.events {
        assert_served(&get(&process, Key::Sequence(stored.sequence)).await, stored);
        assert_served(&get(&process, Key::EventId(stored.event_id)).await, stored);
    }

    // The dedup entries survived: each old event posted again is the duplicate it is.
    let http = reqwest::Client::new();
    for stored in &listing.events {
        let answer = post(&http, &process, stored.body.clone().into_bytes()).await;
        // The same event, typed by this build's protos: not a conflict (the key is left out).
        assert_eq!(
            (
                &answer["sequence"],
                &answer["duplicate"],
                answer.get("conflict")
            ),
            (&stored.sequence.into(), &true.into(), None),
            "event {}: {answer}",
            stored.event_id
        );
    }
    let redelivered = &listing.redelivered;
    assert_eq!(redelivered.answer["duplicate"], true);
    let first = listing
        .events
        .iter()
        .find(|e| e.event_id == redelivered.event_id)
        .expect("the redelivered event is listed");
    assert_eq!(redelivered.answer["sequence"], first.sequence);

    // A new event continues the old sequence.
    let next = listing.events.last().expect("events").sequence + 1;
    let answer = post(&http, &process, binary::event(777_001)).await;
    assert_eq!(
        (&answer["sequence"], &answer["duplicate"]),
        (&next.into(), &false.into()),
        "{answer}"
    );
    stop(process);

    // After a restart: the old events, the new one and their dedup entries; format recorded.
    let process = Process::embedded(dir.path(), &[]);
    let served = subscribe_all(&process).await;
    assert_eq!(served.len() as u64, next);
    for (event, stored) in served.iter().zip(&listing.events) {
        assert_served(event, stored);
    }
    assert_eq!(get(&process, Key::EventId(777_001)).await.sequence, next);
    let answer = post(&http, &process, listing.events[2].body.clone().into_bytes()).await;
    assert_eq!(answer["sequence"], listing.events[2].sequence);
    assert_eq!(answer["duplicate"], true);
    stop(process);
    assert_eq!(stored_format(dir.path()), Some(FORMAT));
}

#[test]
fn verify_and_export_read_a_format_1_store_without_changing_it() {
    let listing = listing();
    let dir = format_1_store();
    let path = dir.path().join("events.redb");
    let before = std::fs::read(&path).unwrap();
    let data_dir = dir.path().to_str().expect("utf-8 temp path");

    let verify = run(&["verify", "--data-dir", data_dir]);
    assert!(verify.status.success(), "{}", text(&verify.stderr));
    let count = listing.events.len();
    assert!(
        text(&verify.stdout).contains(&format!("{count} readable, 0 unreadable")),
        "{}",
        text(&verify.stdout)
    );

    let export = run(&["export", "--data-dir", data_dir]);
    assert!(export.status.success(), "{}", text(&export.stderr));
    let lines: Vec<serde_json::Value> = text(&export.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).expect("one JSON body a line"))
        .collect();
    let bodies: Vec<serde_json::Value> = listing
        .events
        .iter()
        .map(|e| serde_json::from_str(&e.body).expect("the body is JSON"))
        .collect();
    assert_eq!(lines, bodies);

    assert!(
        std::fs::read(&path).unwrap() == before,
        "verify or export changed the store"
    );
}

#[test]
fn a_store_of_a_newer_format_is_refused_at_start_naming_both_formats_and_left_untouched() {
    let clean = format_1_store();
    let crashed = tempfile::tempdir().unwrap();
    set_format(clean.path(), FORMAT + 1, crashed.path());
    for dir in [clean.path(), crashed.path()] {
        let path = dir.join("events.redb");
        let before = std::fs::read(&path).unwrap();
        let data_dir = dir.to_str().expect("utf-8 temp path");
        let serve = run(&[
            "serve",
            "--store",
            "embedded",
            "--data-dir",
            data_dir,
            "--listen",
            "127.0.0.1:0",
            "--log-format",
            "json",
        ]);
        let verify = run(&["verify", "--data-dir", data_dir]);
        for (command, output) in [("serve", &serve), ("verify", &verify)] {
            assert!(!output.status.success(), "{command} must refuse the store");
            let message = text(&output.stderr);
            assert!(
                message.contains(&format!("store format {}", FORMAT + 1))
                    && message.contains(&format!("formats up to {FORMAT}"))
                    && message.contains("run the newer release"),
                "{command}: {message}"
            );
        }
        assert!(
            std::fs::read(&path).unwrap() == before,
            "the refused store {} changed",
            dir.display()
        );
    }
    assert_eq!(stored_format(clean.path()), Some(FORMAT + 1));
}

/// Runs the binary to its end (at most a minute; a `serve` that starts is a failure).
fn run(args: &[&str]) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_iqchannels-gateway"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the gateway binary starts");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("try_wait").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("`{}` did not exit", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
