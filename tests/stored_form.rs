//! The compact stored form, over real sockets: every accepted event reaches a stock gRPC client
//! (default 4 MiB message limit) in its largest form, a redelivery's conflict is decided by the
//! digests kept with the record without decoding the stored body again, and records of the
//! earlier form stay readable.

mod common;

use std::sync::Arc;

use bytes::Bytes;
use common::{TestServer, WAIT};
use iqchannels_gateway::log::memory::MemoryLog;
use iqchannels_gateway::log::{NewRecord, SharedLog};
use iqchannels_gateway::pb::client::{
    get_event_request::Key, subscribe_request::Start, GetEventRequest, SubscribeRequest,
};
use iqchannels_gateway::server::ServerConfig;
use prost::Message;

/// A body of about 1 MiB (the default `--max-body-bytes`): event `id`, whose referenced
/// project holds an array of `zeros` opaque zeros (`"Options":[0,0,...]`: 11 bytes each typed).
fn zeros_body(id: i64, zeros: usize) -> String {
    format!(
        r#"{{"ChatEvent":{{"Id":{id},"Type":"chat_changed","ChatId":1}},"Rels":{{"Chats":[{{"Id":1,"ProjectId":1}}],"Projects":[{{"Id":1,"Title":"p","Options":[{}]}}]}}}}"#,
        vec!["0"; zeros].join(",")
    )
}

fn tiny(id: i64) -> String {
    format!(
        r#"{{"ChatEvent":{{"Id":{id},"Type":"chat_changed","ChatId":1}},"Rels":{{"Chats":[{{"Id":1,"ProjectId":1}}],"Projects":[{{"Id":1,"Options":{{"a":[1,2]}}}}]}}}}"#
    )
}

async fn metric(server: &TestServer, name: &str) -> Option<u64> {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(&format!("{name} ")))
        .and_then(|value| value.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stock_grpc_client_reads_every_event_in_its_largest_form_tiny_and_huge_in_any_order() {
    let server = TestServer::start().await;
    // Tiny, huge (1 MiB of opaque zeros: 5.6 MB typed, twice with the reference), tiny, huge.
    let bodies = [
        tiny(1),
        zeros_body(2, 520_000),
        tiny(3),
        zeros_body(4, 523_000),
    ];
    for body in &bodies {
        assert!(body.len() <= 1 << 20, "{} bytes", body.len());
        server.store(body.clone()).await;
    }
    // tonic's client as generated: 4 MiB decoding limit.
    let mut client = server.grpc().await;
    for (i, body) in bodies.iter().enumerate() {
        let sequence = i as u64 + 1;
        let event = client
            .get_event(GetEventRequest {
                key: Some(Key::Sequence(sequence)),
                include_raw_json: true,
                include_references: true,
            })
            .await
            .unwrap_or_else(|status| panic!("GetEvent {sequence}: {status}"))
            .into_inner();
        assert!(event.encoded_len() <= 4 << 20);
        assert_eq!(event.raw_json, body.as_bytes(), "the body is kept whole");
        let envelope = event.envelope.expect("typed");
        let project = &envelope.rels.as_ref().expect("rels").projects[0];
        let references = event.references.expect("asked for");
        assert_eq!(references.project.as_ref(), Some(project));
        let cut: Vec<_> = event
            .deviations
            .iter()
            .filter(|d| d.path == "Rels.Projects[0].Options")
            .collect();
        if sequence % 2 == 0 {
            assert_eq!(cut.len(), 1, "{:?}", event.deviations);
            assert_eq!(
                project.options.as_ref().and_then(|v| v.kind.clone()),
                Some(prost_types::value::Kind::NullValue(0))
            );
        } else {
            assert!(cut.is_empty(), "a small event is left alone");
        }
    }
    let mut stream = client
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            include_raw_json: true,
            include_references: true,
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    for sequence in 1..=bodies.len() as u64 {
        let event = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("in time")
            .unwrap_or_else(|status| panic!("event {sequence}: {status}"))
            .expect("an event");
        assert_eq!(event.sequence, sequence);
    }
    server.stop().await;
}

/// A body forced onto the tolerant path (`"Id":"5"`) with many items: slow to decode.
fn slow_body(id: i64) -> String {
    format!(
        r#"{{"ChatEvent":{{"Id":"{id}","Type":"chat_changed","ChatId":1}},"Rels":{{"Chats":[{{"Id":1,"ProjectId":1}}],"ChatMessages":[{}]}}}}"#,
        vec![r#"{"Id":"7"}"#; 60_000].join(",")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redelivery_is_decided_by_digests_without_decoding_the_stored_body() {
    let log: SharedLog = Arc::new(MemoryLog::default());
    let server = TestServer::with_log(log.clone(), ServerConfig::default()).await;
    let huge = slow_body(5);
    let first = server.store(huge.clone()).await;

    // The same bytes again: a duplicate, not a conflict.
    let (status, answer) = server.post_event(huge.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["duplicate"], true);
    assert!(answer.get("conflict").is_none(), "{answer}");
    // The same event in other bytes (spaces, the id as a number): the same typed form.
    let respaced = huge.replacen(r#""Id":"5""#, r#""Id": 5"#, 1);
    let (_, answer) = server.post_event(respaced).await;
    assert_eq!(
        (&answer["duplicate"], answer.get("conflict")),
        (&true.into(), None),
        "{answer}"
    );
    // 45 bytes under the same id: another event, a conflict.
    let short = r#"{"ChatEvent":{"Id":5,"Type":"chat_closed"}}"#;
    let (status, answer) = server.post_event(short).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer,
        serde_json::json!({"sequence": first, "duplicate": true, "conflict": true})
    );
    // And the huge one again after it: still the first event.
    let (_, answer) = server.post_event(huge).await;
    assert!(answer.get("conflict").is_none(), "{answer}");
    assert_eq!(
        metric(&server, "iqgw_conflict_check_decodes_total").await,
        Some(0),
        "no stored body was decoded again"
    );
    assert_eq!(
        metric(&server, "iqgw_duplicate_conflicts_total").await,
        Some(1)
    );

    // A record of the earlier form (no digests): decided by decoding its body, counted.
    let legacy_body = tiny(77);
    let envelope = iqchannels_gateway::decode::decode(legacy_body.as_bytes())
        .expect("decodes")
        .envelope;
    let legacy = iqchannels_gateway::gateway::stored_event(&envelope, legacy_body.into(), &[]);
    log.append_all(vec![NewRecord {
        event_id: Some(77),
        received_at_ms: 1,
        payload: Bytes::from(legacy.encode_to_vec()),
    }])
    .await
    .expect("appended");
    let (_, answer) = server
        .post_event(r#"{"ChatEvent":{"Id":77,"Type":"x"}}"#)
        .await;
    assert_eq!(answer["conflict"], true, "{answer}");
    assert_eq!(
        metric(&server, "iqgw_conflict_check_decodes_total").await,
        Some(1),
        "the old record's body was decoded, once"
    );
    server.stop().await;
}

/// The 2018 `message_created` sample under event id `id`.
fn message_created(id: i64) -> Vec<u8> {
    let mut body: serde_json::Value =
        serde_json::from_slice(common::MESSAGE_CREATED).expect("the fixture is JSON");
    body["ChatEvent"]["Id"] = id.into();
    body.to_string().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_the_earlier_form_are_served_beside_compact_ones_with_their_references() {
    let log: SharedLog = Arc::new(MemoryLog::default());
    let server = TestServer::with_log(log.clone(), ServerConfig::default()).await;
    // Old, new, old: each served the same way, references and all.
    let mut expected = Vec::new();
    for (id, old) in [(1, true), (2, false), (3, true)] {
        let body = message_created(id);
        let envelope = iqchannels_gateway::decode::decode(&body)
            .expect("decodes")
            .envelope;
        let stored = iqchannels_gateway::gateway::stored_event(&envelope, body.clone().into(), &[]);
        if old {
            log.append_all(vec![NewRecord {
                event_id: Some(id),
                received_at_ms: 1,
                payload: Bytes::from(stored.encode_to_vec()),
            }])
            .await
            .expect("appended");
        } else {
            server.store(body.clone()).await;
        }
        expected.push((envelope, stored));
    }
    let mut client = server.grpc().await;
    let mut stream = client
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            include_raw_json: true,
            include_references: true,
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribe")
        .into_inner();
    for (sequence, (envelope, stored)) in (1..).zip(&expected) {
        let event = tokio::time::timeout(WAIT, stream.message())
            .await
            .expect("in time")
            .expect("an event")
            .expect("an event");
        assert_eq!(event.sequence, sequence);
        assert_eq!(event.envelope.as_ref(), Some(envelope));
        assert_eq!(event.raw_json, stored.raw_json);
        let references = event.references.expect("asked for");
        assert_eq!(
            references.encode_to_vec(),
            stored.references.to_vec(),
            "the same references, byte for byte, pointers or copies"
        );
        assert!(references.chat.is_some() && references.message.is_some());
    }
    server.stop().await;
}
