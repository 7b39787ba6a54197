//! The JetStream store against the machine's nats-server, each test on a stream of its own:
//! reads under retention never skip silently, streams that would break a guarantee are refused,
//! a batch is answered per record, and a time means the gateway's receive time.

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::{jetstream_config, nats_admin, subscription, TestServer};
use iqchannels_gateway::log::jetstream::JetStreamLog;
use iqchannels_gateway::log::{EventLog, LogError, NewRecord, Record};
use iqchannels_gateway::pb::client::subscribe_request::Start;
use iqchannels_gateway::pb::client::Filter;
use iqchannels_gateway::server::ServerConfig;

/// Printable ASCII that zstd cannot shrink much: `len` bytes from a xorshift generator,
/// without `"` or `\\`.
fn incompressible(len: usize, mut seed: u64) -> String {
    let mut out = String::with_capacity(len);
    seed |= 1;
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

fn record(id: i64, received_at_ms: i64) -> NewRecord {
    NewRecord {
        event_id: Some(id),
        received_at_ms,
        payload: Bytes::from(format!("event {id}")),
    }
}

/// Waits until the log's tail has seen `sequence`.
async fn tailed(log: &JetStreamLog, sequence: u64) {
    let mut committed = log.committed();
    tokio::time::timeout(common::WAIT, committed.wait_for(|&c| c >= sequence))
        .await
        .expect("the tail sees the appends")
        .expect("the log is open");
}

fn sequences(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.sequence).collect()
}

/// What a read returned, as the sequences read or the truncation reported.
fn outcome(result: Result<Vec<Record>, LogError>) -> Result<Vec<u64>, (u64, u64)> {
    match result {
        Ok(records) => Ok(sequences(&records)),
        Err(LogError::Truncated { requested, oldest }) => Err((requested, oldest)),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_from_a_removed_sequence_is_truncated_and_never_starts_later() {
    let Some((config, guard)) = jetstream_config() else {
        return;
    };
    // One replica that tailed every event (its cache holds them), one that connected after
    // they were stored (nothing cached, its oldest sequence goes stale), one connected after
    // the removal.
    let tailing = JetStreamLog::connect(config.clone()).await.unwrap();
    let _ = tailing
        .append((1..=10).map(|id| record(id, id)).collect())
        .await;
    tailed(&tailing, 10).await;
    let stale = JetStreamLog::connect(config.clone()).await.unwrap();
    assert_eq!(stale.bounds().first, 1);

    let admin = nats_admin().await;
    let stream = admin.get_stream(guard.name()).await.unwrap();
    stream.purge().sequence(4).await.expect("purge 1..=3");
    assert!(stream.delete_message(7).await.expect("delete 7"));
    let fresh = JetStreamLog::connect(config.clone()).await.unwrap();

    for (name, log) in [("stale", &stale), ("fresh", &fresh)] {
        assert_eq!(
            outcome(log.read(1, 10).await),
            Err((1, 4)),
            "{name}: read(1)"
        );
        assert_eq!(
            outcome(log.read(3, 10).await),
            Err((3, 4)),
            "{name}: read(3)"
        );
        assert_eq!(outcome(log.read(4, 10).await), Ok(vec![4, 5, 6]), "{name}");
        assert_eq!(
            outcome(log.read(7, 10).await),
            Err((7, 8)),
            "{name}: read(7)"
        );
        assert_eq!(outcome(log.read(8, 10).await), Ok(vec![8, 9, 10]), "{name}");
        assert_eq!(log.bounds().first, 4, "{name}: the oldest is learnt");
    }
    // The replica that cached the events may still serve them from memory for a moment (no
    // gap: they were stored), or report the removal; it never starts later than asked.
    for from in [1, 4, 7] {
        match outcome(tailing.read(from, 10).await) {
            Ok(read) => assert_eq!(
                read,
                (from..=10).collect::<Vec<_>>(),
                "tailing: read({from})"
            ),
            Err((requested, oldest)) => assert!(requested == from && oldest > from),
        }
    }
}

/// The first answer of a Subscribe: the RPC's own status, or the stream's first item.
async fn first_answer(
    server: &TestServer,
    start: Start,
) -> Result<iqchannels_gateway::pb::client::Event, tonic::Status> {
    let mut client = server.grpc().await;
    let request = subscription(Filter::default(), Some(start));
    let mut stream = client.subscribe(request).await?.into_inner();
    tokio::time::timeout(common::WAIT, stream.message())
        .await
        .expect("an answer in time")?
        .ok_or_else(|| tonic::Status::internal("the stream ended"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribing_after_a_removed_sequence_is_out_of_range_on_a_replica_that_learns_late() {
    let Some((config, guard)) = jetstream_config() else {
        return;
    };
    let writer = TestServer::with_log(
        Arc::new(JetStreamLog::connect(config.clone()).await.unwrap()),
        ServerConfig::default(),
    )
    .await;
    for id in 1..=10 {
        writer
            .store(common::event_json(id, "chat_closed", 13, "user", 1))
            .await;
    }
    // A replica connected now knows 1 as the oldest until it refreshes (every 2 s).
    let replica = TestServer::with_log(
        Arc::new(JetStreamLog::connect(config.clone()).await.unwrap()),
        ServerConfig::default(),
    )
    .await;
    let admin = nats_admin().await;
    let stream = admin.get_stream(guard.name()).await.unwrap();
    stream.purge().sequence(4).await.expect("purge 1..=3");

    for after in [0, 2] {
        match first_answer(&replica, Start::AfterSequence(after)).await {
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
                assert!(
                    status.message().contains('4'),
                    "names the oldest: {status:?}"
                );
            }
            Ok(event) => panic!(
                "after {after}: expected OUT_OF_RANGE, got event {}",
                event.sequence
            ),
        }
    }
    // The beginning is the oldest event left.
    let event = first_answer(&replica, Start::Beginning(()))
        .await
        .expect("the beginning is served");
    assert_eq!(event.sequence, 4);
    let event = first_answer(&replica, Start::AfterSequence(3))
        .await
        .expect("resuming right before the oldest is no gap");
    assert_eq!(event.sequence, 4);
}

/// The error of connecting to a stream that exists with `shape`, with the gateway's `config`.
async fn refusal(
    config: iqchannels_gateway::log::jetstream::NatsConfig,
    shape: async_nats::jetstream::stream::Config,
) -> String {
    nats_admin()
        .await
        .create_stream(shape)
        .await
        .expect("the stream is created");
    match JetStreamLog::connect(config).await {
        Err(error) => error.to_string(),
        Ok(_) => panic!("the gateway accepted an unusable stream"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_existing_stream_that_would_break_a_promise_is_refused_naming_each_difference() {
    use async_nats::jetstream::stream::{Config, StorageType};
    type Shape = fn(Config) -> Config;
    let day = Duration::from_secs(24 * 3600);
    // (what differs, the existing stream from the one the gateway would create, the gateway's
    // --retention-max-age, what the refusal must name)
    let cases: [(&str, Shape, Duration, &[&str]); 3] = [
        (
            "memory storage",
            |c| Config {
                storage: StorageType::Memory,
                ..c
            },
            Duration::ZERO,
            &["storage is memory, must be file"],
        ),
        (
            "message and byte limits",
            |c| Config {
                max_messages: 1000,
                max_bytes: 1 << 20,
                ..c
            },
            Duration::ZERO,
            &[
                "max_msgs is 1000, must be unlimited",
                "max_bytes is 1048576, must be unlimited",
            ],
        ),
        (
            "another max age",
            |c| Config {
                max_age: Duration::from_secs(2 * 3600),
                ..c
            },
            day,
            &["max_age is 2h, must be 1day as configured (--retention-max-age)"],
        ),
    ];
    for (case, shape, max_age, named) in cases {
        let Some((mut config, _guard)) = jetstream_config() else {
            return;
        };
        let existing = shape(config.stream_config());
        config.max_age = max_age;
        let error = refusal(config, existing).await;
        for named in named {
            assert!(error.contains(named), "{case}: {named:?} not in {error}");
        }
    }
    // Replicas and the duplicate window are compared with the flags too.
    let Some((mut config, _guard)) = jetstream_config() else {
        return;
    };
    let existing = config.stream_config();
    config.replicas = 3;
    config.duplicate_window = Duration::from_secs(600);
    let error = refusal(config, existing).await;
    for named in [
        "replicas is 1, must be 3 as configured (--nats-replicas)",
        "duplicate_window is 1h, must be 10m as configured",
    ] {
        assert!(error.contains(named), "{named:?} not in {error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_the_stream_stores_in_part_is_answered_per_item_instead_of_503() {
    let Some((config, guard)) = jetstream_config() else {
        return;
    };
    let server = TestServer::with_log(
        Arc::new(JetStreamLog::connect(config).await.unwrap()),
        ServerConfig::default(),
    )
    .await;
    // From now on the stream refuses messages over 4 KiB: big events fail, small ones are stored.
    let admin = nats_admin().await;
    let mut shape = admin
        .get_stream(guard.name())
        .await
        .unwrap()
        .cached_info()
        .config
        .clone();
    shape.max_message_size = 4096;
    admin
        .update_stream(shape)
        .await
        .expect("the stream takes a message size limit");
    let small = |id| common::event_json(id, "chat_closed", 13, "user", 1);
    let big = |id| {
        let mut body: serde_json::Value = serde_json::from_str(&small(id)).unwrap();
        // Text that does not compress: the stored record stays over 4 KiB.
        body["Padding"] = incompressible(8192, id as u64).into();
        body.to_string()
    };

    let batch = format!("[{},{},{}]", small(1), big(2), small(3));
    let (status, answer) = server
        .post("/v1/events:batch", Some("application/json"), batch)
        .await;
    assert_eq!(status, 200, "two items were stored: {answer}");
    assert_eq!(
        (
            &answer["stored"],
            &answer["unavailable"],
            &answer["rejected"]
        ),
        (&2.into(), &1.into(), &0.into()),
        "{answer}"
    );
    let results = answer["results"].as_array().expect("results");
    assert_eq!(results[0]["sequence"], 1, "{answer}");
    assert_eq!(results[1]["retry"], true, "{answer}");
    let error = results[1]["error"].as_str().expect("an error");
    assert!(error.starts_with("storage unavailable"), "{error}");
    assert_eq!(results[2]["sequence"], 2, "{answer}");
    // What the answer says was stored is, and nothing else.
    let mut client = server.grpc().await;
    for (id, sequence) in [(1, 1), (3, 2)] {
        let event = common::get_by_event_id(&mut client, id).await.unwrap();
        assert_eq!(event.sequence, sequence);
    }
    let missing = common::get_by_event_id(&mut client, 2).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // Nothing stored: 503, the sender retries the whole batch.
    let batch = format!("[{},{}]", big(4), big(5));
    let (status, answer) = server
        .post("/v1/events:batch", Some("application/json"), batch)
        .await;
    assert_eq!(status, 503, "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_time_means_the_gateways_receive_time_not_the_nats_publish_time() {
    let Some((config, guard)) = jetstream_config() else {
        return;
    };
    let log = JetStreamLog::connect(config).await.unwrap();
    // Received at 1, 2, 3 and 4 s after the epoch; published by NATS now.
    let _ = log
        .append((1..=4).map(|id| record(id, id * 1000)).collect())
        .await;
    for (at_ms, sequence) in [(0, 1), (1000, 1), (2500, 3), (4000, 4), (4001, 5)] {
        assert_eq!(
            log.seek_time(at_ms).await.unwrap(),
            sequence,
            "received at or after {at_ms} ms"
        );
    }
    // A start that retention removed meanwhile (the cached oldest is still 1) is the oldest left.
    let admin = nats_admin().await;
    let stream = admin.get_stream(guard.name()).await.unwrap();
    stream.purge().sequence(3).await.expect("purge 1..=2");
    assert_eq!(log.seek_time(0).await.unwrap(), 3);
    assert_eq!(log.seek_time(3500).await.unwrap(), 4);
}

/// Records a release before the compact form wrote to the stream (a bare `StoredEvent`, the
/// references copied) are served beside the compact ones, references and all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_earlier_form_on_the_stream_stay_readable() {
    use iqchannels_gateway::pb::client::get_event_request::Key;
    use iqchannels_gateway::pb::client::GetEventRequest;
    use prost::Message;
    let Some((config, _guard)) = jetstream_config() else {
        return;
    };
    let log = Arc::new(JetStreamLog::connect(config).await.unwrap());
    let body = common::MESSAGE_CREATED;
    let envelope = iqchannels_gateway::decode::decode(body).unwrap().envelope;
    let old = iqchannels_gateway::gateway::stored_event(&envelope, Bytes::from_static(body), &[]);
    log.append_all(vec![NewRecord {
        event_id: Some(608),
        received_at_ms: 1,
        payload: Bytes::from(old.encode_to_vec()),
    }])
    .await
    .unwrap();
    let server = TestServer::with_log(log.clone(), ServerConfig::default()).await;
    let new = server.store(common::CHAT_CLOSED).await;
    assert_eq!(new, 2);
    let mut client = server.grpc().await;
    for sequence in [1, 2] {
        let event = client
            .get_event(GetEventRequest {
                key: Some(Key::Sequence(sequence)),
                include_raw_json: true,
                include_references: true,
            })
            .await
            .unwrap()
            .into_inner();
        let references = event.references.expect("asked for");
        assert!(references.chat.is_some(), "{sequence}: {references:?}");
        if sequence == 1 {
            assert_eq!(event.envelope, Some(envelope.clone()));
            assert_eq!(event.raw_json, body);
            assert_eq!(references.encode_to_vec(), old.references.to_vec());
        } else {
            assert_eq!(event.raw_json, common::CHAT_CLOSED);
        }
    }
    // The old event posted again: a duplicate of it, not a conflict.
    let (_, answer) = server.post_event(body).await;
    assert_eq!(
        (
            &answer["sequence"],
            &answer["duplicate"],
            answer.get("conflict")
        ),
        (&1.into(), &true.into(), None),
        "{answer}"
    );
    let mut stream = common::subscribe(
        &mut client,
        subscription(Filter::default(), Some(Start::Beginning(()))),
    )
    .await;
    for sequence in [1, 2] {
        assert_eq!(common::next_event(&mut stream).await.sequence, sequence);
    }
    server.stop().await;
}

/// A batch is stored in its order, whatever its size: its records were sent concurrently, and a
/// batch of more than 64 came out of order (the 64th item got sequence 128; found by
/// tests/catch_up_cost.rs). Batches of several sizes, tiny to large, one after the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_stored_in_its_order_whatever_its_size() {
    let Some((config, _guard)) = jetstream_config() else {
        return;
    };
    let log = JetStreamLog::connect(config).await.unwrap();
    let mut next_id = 1;
    let mut expected = 1;
    // Past the client's 5,000 acks in flight too (a batch of 5,001 waited for ever).
    for size in [1usize, 65, 300, 3, 1000, 129, 5001, 2, 12_000] {
        let batch: Vec<NewRecord> = (next_id..next_id + size as i64)
            .map(|id| {
                // Typing events (no id) among them: each has a subject of its own.
                let mut r = record(id, id);
                if id % 7 == 0 {
                    r.event_id = None;
                }
                r
            })
            .collect();
        let results = tokio::time::timeout(std::time::Duration::from_secs(120), log.append(batch))
            .await
            .unwrap_or_else(|_| panic!("a batch of {size} is answered"));
        let got: Vec<u64> = results
            .into_iter()
            .map(|r| r.expect("stored").sequence)
            .collect();
        let want: Vec<u64> = (expected..expected + size as u64).collect();
        assert_eq!(got, want, "a batch of {size}");
        // What is read back is each record at its sequence.
        tailed(&log, expected + size as u64 - 1).await;
        let read = log.read(expected, size).await.expect("read back");
        assert!(!read.is_empty());
        for (record, id) in read.iter().zip(next_id..) {
            assert_eq!(record.payload, Bytes::from(format!("event {id}")));
        }
        next_id += size as i64;
        expected += size as u64;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// The stream's state, as nats-server reports it.
async fn stream_state(name: &str) -> async_nats::jetstream::stream::State {
    nats_admin()
        .await
        .get_stream(name)
        .await
        .expect("the stream exists")
        .info()
        .await
        .expect("its info")
        .state
        .clone()
}

/// The number of subjects is bounded, whatever the number of events: nats-server keeps state
/// per subject (the layout of a subject per event took it from 17 MB to 781 MB for 1.9 million
/// typing events). Ids spread over more than the buckets, typing events with and without a key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_has_a_bounded_number_of_subjects_whatever_the_events() {
    use iqchannels_gateway::log::jetstream::BUCKETS;
    let Some((config, guard)) = jetstream_config() else {
        return;
    };
    let log = JetStreamLog::connect(config).await.unwrap();
    let ids: Vec<i64> = (1..=6_000)
        .chain((1..=3_000).map(|k| k * 7 + BUCKETS))
        .chain([i64::MAX, 3 * BUCKETS + 11])
        .collect();
    let mut records: Vec<NewRecord> = ids.iter().map(|&id| record(id, now_ms())).collect();
    // Typing events: 4,000 without a key, 1,000 with one (a negative id).
    for n in 0..5_000i64 {
        records.push(NewRecord {
            event_id: (n % 5 == 0).then_some(-(n + 1)),
            received_at_ms: now_ms(),
            payload: Bytes::from(format!("typing {n}")),
        });
    }
    let total = records.len() as u64;
    for chunk in records.chunks(4_000) {
        for result in log.append(chunk.to_vec()).await {
            assert!(!result.expect("stored").duplicate);
        }
    }
    let state = stream_state(guard.name()).await;
    assert_eq!(state.messages, total);
    let buckets: std::collections::HashSet<i64> =
        ids.iter().map(|id| id.rem_euclid(BUCKETS)).collect();
    assert_eq!(
        state.subjects_count,
        buckets.len() as u64 + 1,
        "a subject per id bucket used, and one for every typing event"
    );
    assert!(state.subjects_count <= BUCKETS as u64 + 1);
}

/// A lookup by id finds the event among the others of its bucket (ids that differ by a multiple
/// of the bucket count), whatever its place; an id never stored is not found, in a bucket that
/// holds others or in an empty one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_is_found_by_id_among_the_others_of_its_bucket() {
    use iqchannels_gateway::log::jetstream::BUCKETS;
    let Some((config, _guard)) = jetstream_config() else {
        return;
    };
    let log = JetStreamLog::connect(config).await.unwrap();
    let same_bucket: Vec<i64> = (0..60).map(|k| 5 + k * BUCKETS).collect();
    // Interleaved with others, so that the bucket's events are not consecutive.
    let mut records = Vec::new();
    for (n, &id) in same_bucket.iter().enumerate() {
        records.push(record(id, now_ms()));
        records.push(record(1_000 + n as i64, now_ms()));
        records.push(NewRecord {
            event_id: None,
            received_at_ms: now_ms(),
            payload: Bytes::from_static(b"typing"),
        });
    }
    let appended = log.append_all(records).await.unwrap();
    // Looked up in a shuffled order: the first, the last, and the rest.
    let mut order: Vec<usize> = (0..same_bucket.len()).collect();
    order.rotate_left(same_bucket.len() - 1);
    for n in order {
        let found = log.find_event(same_bucket[n]).await.unwrap();
        assert_eq!(
            found,
            Some(appended[n * 3].sequence),
            "id {}",
            same_bucket[n]
        );
    }
    assert_eq!(log.find_event(5 + 60 * BUCKETS).await.unwrap(), None);
    assert_eq!(log.find_event(6).await.unwrap(), None, "an empty bucket");
    assert_eq!(
        log.find_event(1_003).await.unwrap(),
        Some(appended[10].sequence)
    );
    assert_eq!(log.find_event(-1).await.unwrap(), None);
}

/// Transitive events have a retention of their own: older ones are removed, however many, and
/// a reader passes over the holes they leave, from a cursor or from the beginning; a hole among
/// recent events (deleted by hand) is still reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transitive_events_expire_and_readers_pass_over_the_holes() {
    const TYPING: &str =
        r#"{"ChatEvent": {"Type": "typing", "Transitive": true, "ChatId": 13, "Actor": "client"}}"#;
    let Some((mut config, guard)) = jetstream_config() else {
        return;
    };
    config.transitive_max_age = Duration::from_secs(2);
    // Purged in steps of two sequences (100,000 by default).
    config.purge_step = 2;
    let writer = Arc::new(JetStreamLog::connect(config.clone()).await.unwrap());
    let writing = TestServer::with_log(writer.clone(), ServerConfig::default()).await;
    let event = |id| common::event_json(id, "chat_closed", 13, "user", 1);
    // 1..=3 typing, 4 event 1, 5..=6 typing, 7 event 2, 8 typing; some typing with a key.
    let mut stored = Vec::new();
    for (n, body) in [TYPING, TYPING, TYPING, "1", TYPING, TYPING, "2", TYPING]
        .into_iter()
        .enumerate()
    {
        let sequence = match body.parse::<i64>() {
            Ok(id) => writing.store(event(id)).await,
            Err(_) if n % 2 == 0 => {
                let key = format!("key-{n}");
                let response = reqwest::Client::new()
                    .post(writing.url("/v1/events"))
                    .header("content-type", "application/json")
                    .header("idempotency-key", key)
                    .body(TYPING)
                    .send()
                    .await
                    .unwrap();
                let (status, answer) = common::answer(response).await;
                assert_eq!(status, 200, "{answer}");
                answer["sequence"].as_u64().unwrap()
            }
            Err(_) => writing.store(TYPING).await,
        };
        stored.push(sequence);
    }
    assert_eq!(stored, (1..=8).collect::<Vec<u64>>());
    // Removed within a few passes of the expiry (every 0.5 s).
    let mut state = stream_state(guard.name()).await;
    for _ in 0..100 {
        if state.messages == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        state = stream_state(guard.name()).await;
    }
    assert_eq!(state.messages, 2, "only the two events are left");
    assert_eq!(state.first_sequence, 4);

    // A gateway started now, and one that saw them stored: both pass over the holes.
    let fresh = Arc::new(JetStreamLog::connect(config.clone()).await.unwrap());
    for (name, log) in [("fresh", fresh.as_ref()), ("writer", writer.as_ref())] {
        let mut read = Vec::new();
        let mut from = 1;
        loop {
            let page = log.read(from, 10).await.unwrap_or_else(|error| {
                panic!("{name}: read({from}) passes over the hole: {error}")
            });
            let Some(last) = page.last() else { break };
            from = last.sequence + 1;
            read.extend(sequences(&page));
        }
        if name == "fresh" {
            assert_eq!(read, [4, 7], "{name}");
            // In one page: a read passes over the holes, not one lookup per hole.
            assert_eq!(sequences(&log.read(1, 10).await.unwrap()), [4, 7]);
        } else {
            // It may still serve expired typing events it keeps in memory: at their sequences.
            assert!(read.windows(2).all(|w| w[0] < w[1]), "{name}: {read:?}");
            assert!(read.contains(&4) && read.contains(&7), "{name}: {read:?}");
        }
        assert_eq!(
            log.bounds().first,
            1,
            "{name}: a read may start at the front"
        );
    }
    // Subscribers of the gateway started now: from the beginning, and from cursors in holes.
    let server = TestServer::with_log(fresh.clone(), ServerConfig::default()).await;
    for (start, first) in [
        (Start::Beginning(()), 4),
        (Start::AfterSequence(0), 4),
        (Start::AfterSequence(2), 4),
        (Start::AfterSequence(4), 7),
        (Start::AfterSequence(5), 7),
    ] {
        let event = first_answer(&server, start)
            .await
            .unwrap_or_else(|status| panic!("{first}: {status:?}"));
        assert_eq!(event.sequence, first);
    }
    // Recent events, one deleted by hand: that hole is reported.
    let appended = writer
        .append_all((3..=5).map(|id| record(id, now_ms())).collect())
        .await
        .unwrap();
    let removed = appended[1].sequence;
    let stream = nats_admin().await.get_stream(guard.name()).await.unwrap();
    assert!(stream.delete_message(removed).await.unwrap());
    let reader = JetStreamLog::connect(config).await.unwrap();
    assert_eq!(
        outcome(reader.read(removed, 10).await),
        Err((removed, removed + 1)),
        "a recent hole is a loss"
    );
    server.stop().await;
    writing.stop().await;
}
