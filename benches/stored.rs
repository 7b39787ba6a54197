//! Stored size and CPU (issue 18, point 3): bytes a store keeps per event against the raw body,
//! and the CPU of ingest (decode, build the record, append) and of catch-up (read the records
//! back, decode each into its `Event`, write it in its largest form), for the compact record
//! this build writes ("after") beside the record earlier releases wrote ("before", built exactly
//! as they built it: `gateway::stored_event`, references copied, nothing compressed), in one run,
//! on the embedded store and on JetStream.
//!
//! `cargo bench --bench stored [-- --events N] [--nats HOST:PORT]`. Without `--bench`
//! (`cargo test --all-targets`) it is a smoke run of a few hundred events. JetStream rows need
//! NATS (127.0.0.1:4222 by default); without it they are skipped (a failure under `CI=true`).

use std::sync::Arc;

use bytes::Bytes;
use iqchannels_gateway::decode;
use iqchannels_gateway::fit::DEFAULT_MAX_EVENT_BYTES;
use iqchannels_gateway::log::embedded::{EmbeddedLog, Retention};
use iqchannels_gateway::log::jetstream::{JetStreamLog, NatsConfig};
use iqchannels_gateway::log::{NewRecord, SharedLog};
use iqchannels_gateway::wire::{EncodedEvent, Form, WireEvent};
use prost::Message;

mod common;

const FIXTURES: [&str; 2] = ["chat_closed.json", "message_created_file.json"];

/// Records appended per call (the embedded store's group commit takes them in one transaction).
const APPEND: usize = 100;

/// The form records are written in.
#[derive(Clone, Copy, PartialEq)]
enum Stored {
    /// As releases before the compact record wrote them.
    Before,
    /// The compact record.
    After,
}

impl Stored {
    fn name(self) -> &'static str {
        match self {
            Stored::Before => "before",
            Stored::After => "after",
        }
    }
}

fn fixture(name: &str) -> serde_json::Value {
    let path = format!("{}/../shared/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).expect("the fixture is JSON")
}

/// Words of chat messages, to vary the text from event to event.
const WORDS: [&str; 24] = [
    "Здравствуйте",
    "подскажите",
    "пожалуйста",
    "заказ",
    "номер",
    "доставка",
    "когда",
    "будет",
    "спасибо",
    "оператор",
    "hello",
    "order",
    "status",
    "please",
    "refund",
    "card",
    "оплата",
    "не",
    "прошла",
    "почему",
    "ждём",
    "ответа",
    "сегодня",
    "завтра",
];

/// A realistic mix, event `i` of it: the 2021 `chat_closed` sample (40%), the 2018
/// `message_created` sample with a text of 3 to 120 words (40%), and small events (`message_read`:
/// the chat only, 20%); each with its own id, times and text.
fn mixed(i: u64, closed: &serde_json::Value, created: &serde_json::Value) -> Vec<u8> {
    let mut seed = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let id = 1_000_000 + i as i64;
    let mut body = match i % 5 {
        0 | 1 => closed.clone(),
        2 | 3 => {
            let mut body = created.clone();
            let words = 3 + next() % 118;
            let text: Vec<&str> = (0..words)
                .map(|_| WORDS[(next() % WORDS.len() as u64) as usize])
                .collect();
            body["Rels"]["ChatMessages"][0]["Text"] = text.join(" ").into();
            body["Rels"]["ChatMessages"][0]["Id"] = (id * 10).into();
            body["ChatEvent"]["MessageId"] = (id * 10).into();
            body
        }
        _ => {
            let mut body = closed.clone();
            body["ChatEvent"]["Type"] = "message_read".into();
            let chats = body["Rels"]["Chats"].clone();
            body["Rels"] = serde_json::json!({ "Chats": chats });
            body
        }
    };
    body["ChatEvent"]["Id"] = id.into();
    body["ChatEvent"]["CreatedAt"] =
        (1_700_000_000_000i64 + (next() % 1_000_000_000) as i64).into();
    body.to_string().into_bytes()
}

/// CPU seconds this process has used (user + system, every thread).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills a plain struct.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// The record ingest builds for `body` in `form`.
fn record(body: &[u8], form: Stored) -> NewRecord {
    let decoded = decode::decode(body).expect("the body decodes");
    let event_id = decode::dedup_id(&decoded.envelope);
    let raw = Bytes::copy_from_slice(body);
    let payload = match form {
        Stored::Before => {
            iqchannels_gateway::gateway::stored_event(&decoded.envelope, raw, &decoded.deviations)
                .encode_to_vec()
                .into()
        }
        Stored::After => {
            iqchannels_gateway::gateway::stored_record(
                decoded.envelope,
                raw,
                decoded.deviations,
                DEFAULT_MAX_EVENT_BYTES,
            )
            .expect("the body fits")
            .0
        }
    };
    NewRecord {
        event_id,
        received_at_ms: 1,
        payload,
    }
}

struct Row {
    store: &'static str,
    input: String,
    form: Stored,
    events: usize,
    raw: u64,
    payload: u64,
    stored: u64,
    ingest_us: f64,
    catch_up_us: f64,
}

/// Ingests `bodies` into `log` in `form`, then reads every record back as catch-up does.
async fn run(log: &SharedLog, bodies: &[Vec<u8>], form: Stored) -> (u64, f64, f64) {
    let started = cpu_seconds();
    let mut payload = 0u64;
    for chunk in bodies.chunks(APPEND) {
        let records: Vec<NewRecord> = chunk.iter().map(|body| record(body, form)).collect();
        payload += records.iter().map(|r| r.payload.len() as u64).sum::<u64>();
        log.append_all(records).await.expect("stored");
    }
    let ingest = (cpu_seconds() - started) / bodies.len() as f64;
    let started = cpu_seconds();
    let mut next = log.bounds().first;
    let mut read = 0;
    let mut out = Vec::new();
    let everything = Form {
        raw_json: true,
        references: true,
    };
    while read < bodies.len() {
        let records = log.read(next, 256).await.expect("read");
        assert!(!records.is_empty(), "every record reads back");
        for record in records {
            next = record.sequence + 1;
            let event =
                EncodedEvent::from_payload(record.sequence, record.received_at_ms, record.payload)
                    .expect("the record decodes");
            let wire = WireEvent {
                event: Arc::new(event),
                form: everything,
            };
            out.clear();
            wire.encode(&mut out).expect("a Vec grows");
            read += 1;
        }
    }
    let catch_up = (cpu_seconds() - started) / bodies.len() as f64;
    (payload, ingest, catch_up)
}

async fn embedded(input: &str, bodies: &[Vec<u8>], form: Stored) -> Row {
    let parent = common::data_parent();
    std::fs::create_dir_all(&parent).expect("the bench data dir");
    let dir = tempfile::tempdir_in(parent).expect("a temp dir");
    let log = EmbeddedLog::open(dir.path(), Retention::default()).expect("the store opens");
    let log: SharedLog = Arc::new(log);
    let (payload, ingest, catch_up) = run(&log, bodies, form).await;
    drop(log);
    // The writer closes the file once its last handle is gone.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let stored = std::fs::metadata(dir.path().join("events.redb"))
        .map(|m| m.len())
        .unwrap_or(0);
    Row {
        store: "embedded",
        input: input.to_owned(),
        form,
        events: bodies.len(),
        raw: bodies.iter().map(|b| b.len() as u64).sum(),
        payload,
        stored,
        ingest_us: ingest * 1e6,
        catch_up_us: catch_up * 1e6,
    }
}

async fn jetstream(nats: &str, input: &str, bodies: &[Vec<u8>], form: Stored) -> Row {
    let name = format!("BENCH_STORED_{}", nuid::next());
    let mut config = NatsConfig::new(format!("nats://{nats}"));
    config.stream = name.clone();
    config.subject_prefix = format!("bench.stored.{}", name.to_lowercase());
    let log = JetStreamLog::connect(config)
        .await
        .expect("JetStream connects");
    let log: SharedLog = Arc::new(log);
    let (payload, ingest, catch_up) = run(&log, bodies, form).await;
    let client = async_nats::connect(nats).await.expect("NATS connects");
    let context = async_nats::jetstream::new(client);
    let stored = context
        .get_stream(&name)
        .await
        .expect("the stream")
        .info()
        .await
        .expect("its state")
        .state
        .bytes;
    let _ = context.delete_stream(&name).await;
    Row {
        store: "jetstream",
        input: input.to_owned(),
        form,
        events: bodies.len(),
        raw: bodies.iter().map(|b| b.len() as u64).sum(),
        payload,
        stored,
        ingest_us: ingest * 1e6,
        catch_up_us: catch_up * 1e6,
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = !args.iter().any(|a| a == "--bench");
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let events: usize = value("--events")
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 300 } else { 20_000 });
    let nats = value("--nats").unwrap_or_else(|| "127.0.0.1:4222".to_owned());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("a runtime");
    let closed = fixture(FIXTURES[0]);
    let created = fixture(FIXTURES[1]);
    let mut inputs: Vec<(String, Vec<Vec<u8>>)> = FIXTURES
        .iter()
        .map(|name| {
            let mut body = fixture(name);
            let bodies = (0..events as i64)
                .map(|i| {
                    body["ChatEvent"]["Id"] = (1_000_000 + i).into();
                    body.to_string().into_bytes()
                })
                .collect();
            ((*name).to_owned(), bodies)
        })
        .collect();
    inputs.push((
        "mix".to_owned(),
        (0..events as u64)
            .map(|i| mixed(i, &closed, &created))
            .collect(),
    ));
    let nats_up = std::net::TcpStream::connect(&nats).is_ok();
    if !nats_up && std::env::var_os("CI").is_some() {
        panic!("NATS is not reachable at {nats}");
    }
    let mut rows = Vec::new();
    runtime.block_on(async {
        for (input, bodies) in &inputs {
            for form in [Stored::Before, Stored::After] {
                rows.push(embedded(input, bodies, form).await);
                if nats_up {
                    rows.push(jetstream(&nats, input, bodies, form).await);
                }
            }
        }
    });
    println!(
        "| store | input | form | events | raw body, bytes/event | record, bytes/event | stored, bytes/event | stored / raw | ingest CPU, µs/event | catch-up CPU, µs/event |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let per = |bytes: u64| bytes as f64 / row.events as f64;
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} | {:.1} |",
            row.store,
            row.input,
            row.form.name(),
            row.events,
            per(row.raw),
            per(row.payload),
            per(row.stored),
            row.stored as f64 / row.raw as f64,
            row.ingest_us,
            row.catch_up_us
        );
    }
    if !nats_up {
        println!("JetStream: SKIPPED (NATS is not reachable at {nats})");
    }
}
