//! A model-based test of the invariants of ../shared/DESIGN.md, on the memory, embedded and
//! JetStream stores alike: proptest generates sequences of operations (single, batch and gRPC
//! ingest, redeliveries, transitive events, tolerated and refused bodies, retention, SIGKILL and
//! restart of the gateway, subscribers that join at random positions with random filters and
//! read at random speeds), runs them against the real binary over sockets, and checks every
//! observation against a plain model (the list of stored events):
//! - an acknowledged event is present once, under the sequence the model gives it; sequences are
//!   gapless and increasing; redeliveries answer the original sequence; transitive events are
//!   never deduplicated; nothing the policy refuses is stored, nothing it accepts is refused;
//! - each subscriber receives exactly the model's filtered suffix from its start, in order, or
//!   an explicit OUT_OF_RANGE naming an event retention removed at or after its position (wanted
//!   by its filter or not: the gateway cannot know a removed event's type); after a restart
//!   it resumes after its last event without gap or repeat.
//!
//! A failure shrinks to a short sequence of operations. The bounded run is part of `cargo test`;
//! the long run: `MODEL_CASES=5000 cargo test --test model` (TESTING.md).

mod binary;
mod nats;

use std::collections::HashMap;
use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::event_gateway_client::EventGatewayClient;
use iqchannels_gateway::pb::client::{
    publish_request, subscribe_request::Start, Event, Filter, PublishRequest, SubscribeRequest,
};
use proptest::prelude::*;
use tonic::transport::Channel;

const TYPES: [&str; 3] = ["message_created", "chat_closed", "chat_assigned"];
/// Retention by count on the stores that have it: small, so the runs reach it.
const RETAIN: usize = 12;
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Memory,
    Embedded,
    JetStream,
}

/// A body to ingest.
#[derive(Debug, Clone, Copy)]
enum Body {
    /// A regular event of this id and type.
    Plain(i64, usize),
    /// The same, with fields of the wrong type the tolerant policy coerces.
    Tolerated(i64, usize),
    /// A typing event: no id, never deduplicated.
    Transitive,
    /// A non-transitive event without an id: refused.
    Refused,
}

#[derive(Debug, Clone)]
enum Op {
    Post(Body),
    Batch(Vec<Body>),
    Publish(Body),
    /// A subscriber joins: from the beginning, live, or after a fraction of what is stored;
    /// with a filter on some types (empty: all).
    Subscribe {
        start: u8,
        types: Vec<usize>,
    },
    /// Subscriber `sub % count` reads up to `n` events (the others stall meanwhile).
    Read {
        sub: usize,
        n: usize,
    },
    /// SIGKILL the gateway and start it again on the same store.
    Restart,
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        6 => (1i64..10, 0..TYPES.len()).prop_map(|(id, t)| Body::Plain(id, t)),
        2 => (1i64..10, 0..TYPES.len()).prop_map(|(id, t)| Body::Tolerated(id, t)),
        2 => Just(Body::Transitive),
        1 => Just(Body::Refused),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => body().prop_map(Op::Post),
        2 => proptest::collection::vec(body(), 1..5).prop_map(Op::Batch),
        2 => body().prop_map(Op::Publish),
        2 => (0u8..4, proptest::collection::vec(0..TYPES.len(), 0..2))
            .prop_map(|(start, types)| Op::Subscribe { start, types }),
        4 => (0usize..4, 1usize..6).prop_map(|(sub, n)| Op::Read { sub, n }),
        1 => Just(Op::Restart),
    ]
}

impl Body {
    fn json(self) -> String {
        match self {
            Body::Plain(id, t) => format!(
                r#"{{"ChatEvent":{{"Id":{id},"Type":"{}","ChatId":13}}}}"#,
                TYPES[t]
            ),
            Body::Tolerated(id, t) => format!(
                r#"{{"ChatEvent":{{"Id":"{id}","Type":"{}","ChatId":13.0}},"Rels":{{"Users":[{{"Id":1,"Online":1}}]}}}}"#,
                TYPES[t]
            ),
            Body::Transitive => {
                r#"{"ChatEvent":{"Type":"typing","Transitive":true,"ChatId":13}}"#.to_owned()
            }
            Body::Refused => r#"{"ChatEvent":{"Type":"chat_closed","ChatId":13}}"#.to_owned(),
        }
    }
}

/// One stored event as the model knows it.
#[derive(Debug, Clone)]
struct Stored {
    sequence: u64,
    id: Option<i64>,
    event_type: String,
}

/// The plain model: every event ever stored, the dedup index, and what retention kept.
#[derive(Debug, Default)]
struct Model {
    events: Vec<Stored>,
    ids: HashMap<i64, u64>,
    /// The oldest retained sequence.
    first: u64,
    retain: Option<usize>,
}

/// What the gateway must answer for one body.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Stored(u64),
    Duplicate(u64),
    Refused,
}

impl Model {
    fn next(&self) -> u64 {
        self.events.len() as u64 + 1
    }

    fn ingest(&mut self, body: Body) -> Answer {
        let (id, event_type) = match body {
            Body::Plain(id, t) | Body::Tolerated(id, t) => (Some(id), TYPES[t].to_owned()),
            Body::Transitive => (None, "typing".to_owned()),
            Body::Refused => return Answer::Refused,
        };
        if let Some(&sequence) = id.and_then(|id| self.ids.get(&id)) {
            return Answer::Duplicate(sequence);
        }
        let sequence = self.next();
        if let Some(id) = id {
            self.ids.insert(id, sequence);
        }
        self.events.push(Stored {
            sequence,
            id,
            event_type,
        });
        Answer::Stored(sequence)
    }

    /// Retention after one append (a request): the oldest go, their ids with them.
    fn retain(&mut self) {
        let Some(max) = self.retain else { return };
        while (self.next() - self.first) as usize > max {
            let gone = &self.events[(self.first - 1) as usize];
            if let Some(id) = gone.id {
                self.ids.remove(&id);
            }
            self.first += 1;
        }
    }

    /// The events a subscriber with `types` expects from sequence `from` on.
    fn expected(&self, from: u64, types: &[String]) -> Vec<&Stored> {
        self.events
            .iter()
            .filter(|e| e.sequence >= from)
            .filter(|e| types.is_empty() || types.contains(&e.event_type))
            .collect()
    }
}

/// A subscriber as the test holds it.
struct Sub {
    stream: Option<tonic::Streaming<Event>>,
    types: Vec<String>,
    /// The next sequence it may receive.
    next: u64,
    /// Ended with OUT_OF_RANGE (allowed only when retention removed what it was to read).
    gone: bool,
    /// `Some(the log's next sequence when it subscribed)` while a subscriber that asked for the
    /// beginning has received nothing: the gateway may start it at the oldest event left when
    /// retention removed older ones before its first read (README: "from the beginning"), but
    /// never past an event stored after it subscribed.
    began: Option<u64>,
}

/// The gateway under test and what restarting it needs.
struct Gateway {
    process: Process,
    args: Vec<String>,
    _dir: Option<tempfile::TempDir>,
    _stream: Option<nats::TestStream>,
}

impl Gateway {
    fn start(store: Store) -> Option<Self> {
        let mut args: Vec<String> = Vec::new();
        let (dir, stream) = match store {
            Store::Memory => {
                args.extend(["--store", "memory"].map(String::from));
                (None, None)
            }
            Store::Embedded => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                args.extend(["--store".into(), "embedded".into(), "--data-dir".into()]);
                args.push(dir.path().to_str().expect("UTF-8 path").to_owned());
                (Some(dir), None)
            }
            Store::JetStream => {
                if !nats::require("nats-server", nats::reachable(nats::SHARED_NATS)) {
                    return None;
                }
                let stream = nats::TestStream::new(nats::SHARED_NATS);
                let store = format!("nats://{}", nats::SHARED_NATS);
                args.extend(stream.args(&store).into_iter().map(String::from));
                (None, Some(stream))
            }
        };
        if store != Store::JetStream {
            args.extend(["--retention-max-events".into(), RETAIN.to_string()]);
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let process = Process::start(&refs);
        Some(Self {
            process,
            args,
            _dir: dir,
            _stream: stream,
        })
    }

    fn restart(&mut self) {
        let addr = self.process.addr.to_string();
        self.process.kill();
        let refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.process = Process::start_on(&addr, &refs);
    }
}

async fn client(process: &Process) -> EventGatewayClient<Channel> {
    EventGatewayClient::connect(format!("http://{}", process.addr))
        .await
        .expect("gRPC connects")
}

/// Posts one body over HTTP; the answer as the model words it.
async fn post(http: &reqwest::Client, process: &Process, body: Body) -> Result<Answer, String> {
    let response = http
        .post(process.url("/v1/events"))
        .header("content-type", "application/json")
        .body(body.json())
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let json: serde_json::Value = response.json().await.map_err(|e| e.to_string())?;
    answer(status, &json)
}

fn answer(status: u16, json: &serde_json::Value) -> Result<Answer, String> {
    match status {
        200 => {
            let sequence = json["sequence"]
                .as_u64()
                .ok_or(format!("no sequence: {json}"))?;
            Ok(if json["duplicate"] == true {
                Answer::Duplicate(sequence)
            } else {
                Answer::Stored(sequence)
            })
        }
        400 => Ok(Answer::Refused),
        other => Err(format!("status {other}: {json}")),
    }
}

async fn subscribe(
    client: &mut EventGatewayClient<Channel>,
    start: Start,
    types: &[String],
) -> Result<tonic::Streaming<Event>, tonic::Status> {
    let request = SubscribeRequest {
        filter: Some(Filter {
            event_types: types.to_vec(),
            ..Filter::default()
        }),
        start: Some(start),
        ..SubscribeRequest::default()
    };
    tokio::time::timeout(WAIT, client.subscribe(request))
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("Subscribe did not answer"))?
        .map(tonic::Response::into_inner)
}

/// Reads `n` events (or all the model has for it when `n` is `None`) and checks each.
async fn read(sub: &mut Sub, model: &Model, n: Option<usize>) -> Result<(), String> {
    if sub.gone {
        return Ok(());
    }
    let mut left = n.unwrap_or(usize::MAX);
    while left > 0 {
        let expected = model.expected(sub.next, &sub.types);
        let Some(&want) = expected.first() else {
            return Ok(());
        };
        let Some(stream) = sub.stream.as_mut() else {
            return Err("a subscriber without a stream".into());
        };
        let got = tokio::time::timeout(WAIT, stream.message())
            .await
            .map_err(|_| format!("waited for sequence {} in vain", want.sequence))?;
        match got {
            Ok(Some(event)) => {
                let event_type = event
                    .envelope
                    .as_ref()
                    .and_then(|e| e.chat_event.as_ref())
                    .map(|e| e.r#type.clone())
                    .unwrap_or_default();
                let id = event
                    .envelope
                    .as_ref()
                    .and_then(|e| e.chat_event.as_ref())
                    .map(|e| e.id)
                    .unwrap_or_default();
                // A start at the beginning moves on to the oldest event left, over events that
                // retention removed and that were stored before it subscribed; nothing else.
                let skipped_only_removed = sub.began.is_some_and(|began| {
                    expected
                        .iter()
                        .take_while(|e| e.sequence < event.sequence)
                        .all(|e| e.sequence < model.first && e.sequence < began)
                });
                let want = if event.sequence > want.sequence && skipped_only_removed {
                    expected
                        .iter()
                        .copied()
                        .find(|e| e.sequence >= event.sequence)
                        .unwrap_or(want)
                } else {
                    want
                };
                if event.sequence != want.sequence
                    || event_type != want.event_type
                    || want.id.is_some_and(|want| want != id)
                {
                    return Err(format!(
                        "got sequence {} ({event_type}, id {id}), the model says {want:?}",
                        event.sequence
                    ));
                }
                sub.next = want.sequence + 1;
                sub.began = None;
                left -= 1;
            }
            Ok(None) => return Err("the stream ended with OK".into()),
            Err(status) if status.code() == tonic::Code::OutOfRange => {
                // The stream's position counts every event it looked at, wanted or not: with a
                // filter, the removal of an event it would have skipped ends it too (a removed
                // event's type is unknown). The sequence named must be one retention removed,
                // at or after the last one the subscriber received.
                match truncated(status.message()) {
                    Some((requested, oldest))
                        if sub.next <= requested && requested < oldest && oldest <= model.first =>
                    {
                        sub.gone = true;
                        return Ok(());
                    }
                    _ => {
                        return Err(format!(
                            "OUT_OF_RANGE waiting for {} (received up to {}) while the model \
                             retains from {}: {status:?}",
                            want.sequence,
                            sub.next - 1,
                            model.first
                        ))
                    }
                }
            }
            Err(status) => return Err(format!("stream failed: {status:?}")),
        }
    }
    Ok(())
}

/// `(requested, oldest)` of the gateway's "sequence N is no longer retained; the oldest retained
/// sequence after it is M".
fn truncated(message: &str) -> Option<(u64, u64)> {
    let rest = message.strip_prefix("sequence ")?;
    let (requested, rest) = rest.split_once(' ')?;
    let oldest = rest.rsplit(' ').next()?;
    Some((requested.parse().ok()?, oldest.parse().ok()?))
}

/// Runs `ops` against a fresh gateway on `store`; `Err` describes the first disagreement.
async fn run(store: Store, ops: &[Op]) -> Result<(), String> {
    let Some(mut gateway) = Gateway::start(store) else {
        return Ok(());
    };
    let mut model = Model {
        first: 1,
        retain: (store != Store::JetStream).then_some(RETAIN),
        ..Model::default()
    };
    let http = reqwest::Client::new();
    let mut grpc = client(&gateway.process).await;
    let mut subs: Vec<Sub> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        let context = |e: String| format!("step {step} {op:?}: {e}");
        match op {
            Op::Post(body) => {
                let got = post(&http, &gateway.process, *body)
                    .await
                    .map_err(context)?;
                let want = model.ingest(*body);
                model.retain();
                if got != want {
                    return Err(context(format!(
                        "answered {got:?}, the model says {want:?}"
                    )));
                }
            }
            Op::Batch(bodies) => {
                let ndjson: String = bodies.iter().map(|b| b.json() + "\n").collect();
                let response = http
                    .post(gateway.process.url("/v1/events:batch"))
                    .header("content-type", "application/x-ndjson")
                    .body(ndjson)
                    .send()
                    .await
                    .map_err(|e| context(e.to_string()))?;
                let json: serde_json::Value =
                    response.json().await.map_err(|e| context(e.to_string()))?;
                let results = json["results"].as_array().cloned().unwrap_or_default();
                if results.len() != bodies.len() {
                    return Err(context(format!("{} results: {json}", results.len())));
                }
                let wants: Vec<Answer> = bodies.iter().map(|b| model.ingest(*b)).collect();
                model.retain();
                for (result, want) in results.iter().zip(wants) {
                    let status = if result.get("error").is_some() {
                        400
                    } else {
                        200
                    };
                    let got = answer(status, result).map_err(context)?;
                    if got != want {
                        return Err(context(format!("item {result}, the model says {want:?}")));
                    }
                }
            }
            Op::Publish(body) => {
                let published = grpc
                    .publish(PublishRequest {
                        event: Some(publish_request::Event::RawJson(body.json().into_bytes())),
                        ..Default::default()
                    })
                    .await;
                let got = match published {
                    Ok(r) => {
                        let r = r.into_inner();
                        if r.duplicate {
                            Answer::Duplicate(r.sequence)
                        } else {
                            Answer::Stored(r.sequence)
                        }
                    }
                    Err(status) if status.code() == tonic::Code::InvalidArgument => Answer::Refused,
                    Err(status) => return Err(context(format!("{status:?}"))),
                };
                let want = model.ingest(*body);
                model.retain();
                if got != want {
                    return Err(context(format!(
                        "answered {got:?}, the model says {want:?}"
                    )));
                }
            }
            Op::Subscribe { start, types } => {
                let types: Vec<String> = types.iter().map(|&t| TYPES[t].to_owned()).collect();
                let last = model.next() - 1;
                let (start, next) = match start {
                    0 => (Start::Beginning(()), model.first),
                    1 => (Start::AfterSequence(last), last + 1),
                    2 => (Start::AfterSequence(last / 2), last / 2 + 1),
                    _ => (Start::AfterSequence(0), 1),
                };
                let stream = subscribe(&mut grpc, start, &types).await;
                match stream {
                    Ok(stream) => {
                        if next < model.first {
                            // Allowed only as an explicit error later, at its first read.
                        }
                        subs.push(Sub {
                            stream: Some(stream),
                            types,
                            next,
                            gone: false,
                            began: matches!(start, Start::Beginning(())).then(|| model.next()),
                        });
                    }
                    Err(status)
                        if status.code() == tonic::Code::OutOfRange && next < model.first => {}
                    Err(status) => return Err(context(format!("Subscribe: {status:?}"))),
                }
            }
            Op::Read { sub, n } => {
                if !subs.is_empty() {
                    let count = subs.len();
                    read(&mut subs[sub % count], &model, Some(*n))
                        .await
                        .map_err(context)?;
                }
            }
            Op::Restart => {
                if store == Store::Memory {
                    continue;
                }
                gateway.restart();
                grpc = client(&gateway.process).await;
                // Every subscriber reconnects after the last event it received.
                for sub in subs.iter_mut().filter(|s| !s.gone) {
                    let start = Start::AfterSequence(sub.next - 1);
                    match subscribe(&mut grpc, start, &sub.types).await {
                        Ok(stream) => {
                            sub.stream = Some(stream);
                            sub.began = None;
                        }
                        Err(status)
                            if status.code() == tonic::Code::OutOfRange
                                && sub.next < model.first =>
                        {
                            sub.gone = true
                        }
                        Err(status) => return Err(context(format!("resubscribe: {status:?}"))),
                    }
                }
            }
        }
    }
    // Every subscriber gets the rest of what the model holds for it.
    for (i, sub) in subs.iter_mut().enumerate() {
        read(sub, &model, None)
            .await
            .map_err(|e| format!("final read of subscriber {i}: {e}"))?;
    }
    // The store holds exactly the model's retained events (GetEvent by sequence).
    for event in model.events.iter().filter(|e| e.sequence >= model.first) {
        let got = grpc
            .get_event(iqchannels_gateway::pb::client::GetEventRequest {
                key: Some(
                    iqchannels_gateway::pb::client::get_event_request::Key::Sequence(
                        event.sequence,
                    ),
                ),
                ..Default::default()
            })
            .await
            .map_err(|e| format!("GetEvent {}: {e:?}", event.sequence))?
            .into_inner();
        let id = got
            .envelope
            .and_then(|e| e.chat_event)
            .map(|e| e.id)
            .unwrap_or_default();
        if event.id.is_some_and(|want| want != id) {
            return Err(format!(
                "GetEvent {}: id {id}, model {event:?}",
                event.sequence
            ));
        }
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(128)
}

fn check(store: Store, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime
        .block_on(run(store, &ops))
        .map_err(TestCaseError::fail)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_memory_store_keeps_every_promise(ops in proptest::collection::vec(op(), 1..40)) {
        check(Store::Memory, ops)?;
    }

    #[test]
    fn the_embedded_store_keeps_every_promise(ops in proptest::collection::vec(op(), 1..40)) {
        check(Store::Embedded, ops)?;
    }

    #[test]
    fn the_jetstream_store_keeps_every_promise(ops in proptest::collection::vec(op(), 1..40)) {
        check(Store::JetStream, ops)?;
    }
}

/// Shrunk cases the model found, kept as regression tests.
mod found {
    use super::*;

    /// Replays of a case that failed now and then (`MODEL_REPEAT` sets it).
    static REPEAT: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
        std::env::var("MODEL_REPEAT")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(20)
    });

    fn replay(store: Store, ops: &[Op]) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        if let Err(error) = runtime.block_on(run(store, ops)) {
            panic!("{error}");
        }
    }

    /// JetStream answered NOT_FOUND for an event right after its ack: reads were bounded by the
    /// tail's position (and its cache), which may lag the ack.
    #[test]
    fn a_read_right_after_an_ack_finds_the_event_on_jetstream() {
        for _ in 0..20 {
            replay(
                Store::JetStream,
                &[Op::Publish(Body::Plain(6, 2)), Op::Post(Body::Plain(2, 0))],
            );
        }
    }

    /// Found by a 2,000-case run on the memory store (2026-12-07, case 843): a subscriber from
    /// the beginning of an empty log, filtered on `message_created`, never received the third
    /// event of the batch that followed.
    #[test]
    fn a_filtered_subscriber_from_an_empty_beginning_gets_the_batch_after_it() {
        for _ in 0..*REPEAT {
            replay(
                Store::Memory,
                &[
                    Op::Subscribe {
                        start: 0,
                        types: vec![0],
                    },
                    Op::Batch(vec![Body::Plain(4, 1), Body::Transitive, Body::Plain(7, 0)]),
                ],
            );
        }
    }

    /// Found by a 14,000-case run on the memory store (2026-11-30, case 9,588; TESTING.md), and
    /// again by CI on a loaded machine: subscriber 0 (filtered on `chat_closed`) subscribed on
    /// an empty log, and was first read at step 19, after retention had removed sequence 1 (a
    /// typing event). When the machine was loaded, the gateway's side of that stream had not
    /// yet looked at sequence 1 when it was removed, so the stream ended with OUT_OF_RANGE for
    /// sequence 1. That is the documented answer: a stream's position counts the events its
    /// filter skips, and the type of a removed event is unknown. The model expected no
    /// OUT_OF_RANGE because the filter would have skipped sequence 1; it now accepts one that
    /// names a removed sequence at or after the subscriber's position. The gateway's answer, made
    /// deterministic: src/subscribe/tests.rs
    /// `a_filtered_subscriber_is_told_when_retention_removed_events_its_filter_would_skip`.
    /// Found by a 2,000-case run on the memory store (2026-12-07, case 210): subscriber 1 asked
    /// for the beginning when sequence 1 was the oldest, and retention removed sequence 1 before
    /// the gateway's side of the stream made its first read (catch-up reads take turns since
    /// `--catch-up-reads`). The gateway started it at sequence 2, the oldest left: README's
    /// "from the beginning" is the oldest event retained at the first read, and nothing stored
    /// after the subscription began may be skipped (src/subscribe/tests.rs
    /// `from_the_beginning_*`). The model expected sequence 1; it now accepts that start.
    #[test]
    fn from_the_beginning_starts_at_the_oldest_left_on_the_memory_store() {
        for _ in 0..5 {
            replay(Store::Memory, &case_beginning_after_retention());
        }
    }

    #[test]
    fn out_of_range_after_restarts_on_the_memory_store() {
        for _ in 0..5 {
            replay(Store::Memory, &case_out_of_range_after_restarts());
        }
    }
}

/// The case of `found::out_of_range_after_restarts_on_the_memory_store`, as proptest printed it.
#[allow(dead_code)]
fn case_out_of_range_after_restarts() -> Vec<Op> {
    vec![
        Op::Subscribe {
            start: 3,
            types: vec![1],
        },
        Op::Batch(vec![
            Body::Transitive,
            Body::Tolerated(5, 2),
            Body::Transitive,
        ]),
        Op::Read { sub: 1, n: 5 },
        Op::Post(Body::Plain(8, 2)),
        Op::Publish(Body::Plain(7, 2)),
        Op::Read { sub: 1, n: 4 },
        Op::Subscribe {
            start: 2,
            types: vec![2],
        },
        Op::Read { sub: 2, n: 4 },
        Op::Read { sub: 2, n: 5 },
        Op::Batch(vec![
            Body::Plain(3, 0),
            Body::Plain(4, 1),
            Body::Plain(5, 1),
        ]),
        Op::Batch(vec![
            Body::Plain(7, 2),
            Body::Tolerated(3, 2),
            Body::Transitive,
            Body::Transitive,
        ]),
        Op::Batch(vec![Body::Plain(2, 1), Body::Plain(8, 2)]),
        Op::Subscribe {
            start: 3,
            types: vec![],
        },
        Op::Post(Body::Tolerated(9, 1)),
        Op::Restart,
        Op::Batch(vec![Body::Plain(2, 0), Body::Plain(1, 0)]),
        Op::Restart,
        Op::Post(Body::Transitive),
        Op::Publish(Body::Plain(5, 1)),
        Op::Read { sub: 0, n: 2 },
        Op::Subscribe {
            start: 2,
            types: vec![0],
        },
        Op::Restart,
        Op::Read { sub: 1, n: 4 },
        Op::Publish(Body::Transitive),
        Op::Subscribe {
            start: 1,
            types: vec![],
        },
        Op::Restart,
        Op::Batch(vec![Body::Tolerated(7, 2)]),
        Op::Post(Body::Plain(5, 0)),
        Op::Publish(Body::Tolerated(9, 0)),
        Op::Restart,
        Op::Post(Body::Plain(9, 1)),
        Op::Post(Body::Plain(8, 0)),
        Op::Read { sub: 3, n: 1 },
    ]
}

/// The case of `found::from_the_beginning_starts_at_the_oldest_left_on_the_memory_store`.
#[allow(dead_code)]
fn case_beginning_after_retention() -> Vec<Op> {
    use Body::{Plain, Tolerated, Transitive};
    vec![
        Op::Post(Transitive),
        Op::Read { sub: 1, n: 5 },
        Op::Post(Plain(7, 2)),
        Op::Read { sub: 3, n: 3 },
        Op::Post(Plain(8, 1)),
        Op::Post(Tolerated(4, 2)),
        Op::Batch(vec![Tolerated(6, 0), Tolerated(8, 1)]),
        Op::Read { sub: 2, n: 4 },
        Op::Batch(vec![Plain(6, 0), Plain(7, 0), Plain(9, 1), Tolerated(6, 2)]),
        Op::Batch(vec![Plain(2, 2), Transitive, Plain(5, 2)]),
        Op::Restart,
        Op::Publish(Tolerated(2, 2)),
        Op::Publish(Plain(5, 2)),
        Op::Post(Plain(5, 1)),
        Op::Read { sub: 3, n: 2 },
        Op::Post(Plain(2, 2)),
        Op::Post(Plain(3, 2)),
        Op::Post(Transitive),
        Op::Read { sub: 3, n: 3 },
        Op::Restart,
        Op::Publish(Plain(7, 2)),
        Op::Read { sub: 1, n: 4 },
        Op::Post(Tolerated(1, 1)),
        Op::Post(Plain(5, 0)),
        Op::Publish(Plain(4, 2)),
        Op::Post(Plain(6, 2)),
        Op::Subscribe {
            start: 2,
            types: vec![2],
        },
        Op::Subscribe {
            start: 0,
            types: vec![],
        },
        Op::Post(Transitive),
    ]
}
