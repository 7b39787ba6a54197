//! A stream of the earlier JetStream layout (a subject per event, one message each): the gateway
//! refuses it naming the command that migrates it, and `migrate-stream` copies it, in order and
//! resumably, into a stream the gateway serves (the real binary, the machine's nats-server).

mod binary;
mod nats;

use std::process::Command;
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use binary::{event, gateway_binary, serve_to_exit, Process};
use bytes::Bytes;
use iqchannels_gateway::pb::client::get_event_request::Key;
use iqchannels_gateway::pb::client::{subscribe_request::Start, GetEventRequest, SubscribeRequest};
use nats::{reachable, require, TestStream, SHARED_NATS};
use prost::Message;

const TYPING: &[u8] =
    br#"{"ChatEvent": {"Type": "typing", "Transitive": true, "ChatId": 13, "Actor": "client"}}"#;
/// Receive times of the old records: far from now, so that a copy that took the copy's time
/// instead would show.
const RECEIVED: i64 = 1_600_000_000_000;

/// A record as a release before the compact form wrote it (a bare `StoredEvent`).
fn old_record(body: &[u8]) -> Bytes {
    let envelope = iqchannels_gateway::decode::decode(body)
        .expect("a valid body")
        .envelope;
    let stored =
        iqchannels_gateway::gateway::stored_event(&envelope, Bytes::copy_from_slice(body), &[]);
    Bytes::from(stored.encode_to_vec())
}

/// What an old gateway published: `(subject token, message id, body)`.
async fn publish_old(
    context: &jetstream::Context,
    prefix: &str,
    items: &[(String, Option<String>, Vec<u8>)],
) {
    for (n, (token, id, body)) in items.iter().enumerate() {
        let mut message = jetstream::message::PublishMessage::build()
            .payload(old_record(body))
            .header(
                "Iqgw-Received-At",
                (RECEIVED + n as i64).to_string().as_str(),
            );
        if let Some(id) = id {
            message = message.message_id(id);
        }
        context
            .send_publish(format!("{prefix}.{token}"), message)
            .await
            .expect("published")
            .await
            .expect("stored");
    }
}

fn migrate(old: &TestStream, to: &str) -> (bool, String, String) {
    let output = Command::new(gateway_binary())
        .args([
            "migrate-stream",
            "--store",
            &format!("nats://{SHARED_NATS}"),
            "--nats-stream",
            old.name(),
            "--nats-subject-prefix",
            old.prefix(),
            "--to",
            to,
        ])
        .output()
        .expect("the binary runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_of_the_old_layout_is_refused_then_migrated_in_order_and_served() {
    if !require(
        "NATS with JetStream on 127.0.0.1:4222",
        reachable(SHARED_NATS),
    ) {
        return;
    }
    let old = TestStream::new(SHARED_NATS);
    let new = TestStream::new(SHARED_NATS);
    let context = jetstream::new(async_nats::connect(SHARED_NATS).await.unwrap());
    let old_config = stream::Config {
        name: old.name().to_owned(),
        subjects: vec![format!("{}.*", old.prefix())],
        storage: stream::StorageType::File,
        max_messages_per_subject: 1,
        discard: stream::DiscardPolicy::New,
        discard_new_per_subject: true,
        allow_direct: true,
        duplicate_window: Duration::from_secs(3600),
        ..Default::default()
    };
    let source = context.create_stream(old_config.clone()).await.unwrap();
    // Events 1..=20, a typing event after every fifth (without a key, and one with a key).
    let mut items = Vec::new();
    for id in 1..=20i64 {
        items.push((id.to_string(), Some(id.to_string()), event(id)));
        if id % 5 == 0 {
            items.push((format!("t{}", nuid::next()), None, TYPING.to_vec()));
        }
    }
    items.push(("-77".into(), Some("-77".into()), TYPING.to_vec()));
    publish_old(&context, old.prefix(), &items).await;
    // A hole (sequence 3, event 3, deleted by hand): the copy closes it up.
    assert!(source.delete_message(3).await.unwrap());

    let (status, said) = serve_to_exit(
        &old.args(&format!("nats://{SHARED_NATS}")),
        &[],
        Duration::from_secs(30),
    );
    assert!(!status.success());
    let advice = format!("migrate-stream --to {}_2", old.name());
    assert!(said.contains(&advice), "names the migration: {said}");

    // What a run that met a gateway writing to the new stream leaves (found from outside): the
    // foreign event took the place of one copy, and the copies in flight behind it were stored,
    // so the last record is a copy. Going on would leave that copy out for good: refused.
    let bad = TestStream::new(SHARED_NATS);
    let mut shape =
        iqchannels_gateway::log::jetstream::NatsConfig::new(format!("nats://{SHARED_NATS}"));
    shape.stream = bad.name().to_owned();
    shape.subject_prefix = old.prefix().to_owned();
    context.create_stream(shape.stream_config()).await.unwrap();
    for (n, copy_of) in [Some(1u64), Some(2), None, Some(4), Some(5)]
        .into_iter()
        .enumerate()
    {
        let mut message = jetstream::message::PublishMessage::build()
            .payload(old_record(&event(n as i64 + 100)))
            .header("Iqgw-Received-At", "1");
        if let Some(copy_of) = copy_of {
            message = message.header("Iqgw-Migrated-From", copy_of.to_string().as_str());
        }
        context
            .send_publish(format!("{}.e.{n}", old.prefix()), message)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let (ok, out, err) = migrate(&old, bad.name());
    assert!(!ok, "{out}");
    assert!(
        err.contains("not a faithful copy") && err.contains("sequence 3"),
        "{err}"
    );
    context.delete_stream(bad.name()).await.unwrap();
    let (ok, out, err) = migrate(&old, new.name());
    assert!(ok, "{out}{err}");
    let copied = items.len() - 1;
    assert!(out.contains(&format!("copied {copied} records")), "{out}");
    assert!(out.contains("from the start"), "{out}");
    // The old stream gets more (its gateways were not stopped): a second run goes on.
    publish_old(
        &context,
        old.prefix(),
        &[("21".into(), Some("21".into()), event(21))],
    )
    .await;
    let (ok, out, err) = migrate(&old, new.name());
    assert!(ok, "{out}{err}");
    assert!(out.contains("copied 1 records"), "{out}");
    assert!(
        out.contains(&format!("going on after sequence {}", items.len())),
        "{out}"
    );
    let (ok, out, _) = migrate(&old, new.name());
    assert!(ok && out.contains("copied 0 records"), "{out}");
    // Into a stream that is not a migration's: refused.
    let (ok, out, err) = migrate(&old, old.name());
    assert!(!ok, "{out}");
    assert!(err.contains("another stream"), "{err}");

    // The old stream deleted and created again with other events (an old gateway restarted
    // after `nats stream rm`): its sequences name other events, and a run never goes on from it.
    context.delete_stream(old.name()).await.unwrap();
    context.create_stream(old_config.clone()).await.unwrap();
    let others: Vec<(String, Option<String>, Vec<u8>)> = (500..530)
        .map(|id: i64| (id.to_string(), Some(id.to_string()), event(id)))
        .collect();
    publish_old(&context, old.prefix(), &others).await;
    let (ok, out, err) = migrate(&old, new.name());
    assert!(!ok, "{out}");
    assert!(err.contains("deleted and created again"), "{err}");

    let store = format!("nats://{SHARED_NATS}");
    let gateway = Process::start(&[
        "--store",
        &store,
        "--nats-stream",
        new.name(),
        "--nats-subject-prefix",
        old.prefix(),
    ]);
    let mut client = gateway.grpc().await;
    let mut events = client
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            ..SubscribeRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    // The old stream's order, without the hole, each with its receive time.
    let mut expected: Vec<(i64, i64)> = items
        .iter()
        .enumerate()
        .filter(|(n, _)| *n != 2)
        .map(|(n, (token, _, _))| {
            (
                token.parse::<i64>().unwrap_or(0).max(0),
                RECEIVED + n as i64,
            )
        })
        .collect();
    expected.push((21, RECEIVED));
    for (n, (id, received)) in expected.iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("in time")
            .unwrap()
            .expect("an event");
        assert_eq!(got.sequence, n as u64 + 1);
        let chat_event = got.envelope.and_then(|e| e.chat_event).unwrap();
        assert_eq!(chat_event.id, *id, "sequence {}", got.sequence);
        let at = got.received_at.unwrap();
        assert_eq!(
            at.seconds * 1000 + i64::from(at.nanos) / 1_000_000,
            *received
        );
    }
    // Found by id; a redelivery of a copied event is its duplicate (the message id was kept).
    let found = client
        .get_event(GetEventRequest {
            key: Some(Key::EventId(20)),
            ..GetEventRequest::default()
        })
        .await
        .unwrap()
        .into_inner();
    let at = expected.iter().position(|(id, _)| *id == 20).unwrap() as u64 + 1;
    assert_eq!(found.sequence, at);
    assert_eq!(
        gateway.post_event_answer(20).await,
        serde_json::json!({"sequence": at, "duplicate": true})
    );
}
