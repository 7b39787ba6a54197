//! "Unknown" is not "not stored" (issue 19, point 5), against a real nats-server of the test's
//! own: while it is frozen (SIGSTOP) events sent to it get no ack in time, and the gateway must
//! answer that their outcome is unknown (HTTP 503 `"outcome": "unknown"`, per batch item, and
//! gRPC's `iqgw-outcome` metadata), not that they were refused: once the server runs again it
//! stores what it had received. Sent again, an event with an id is stored once, and so is a
//! transitive event sent with the same idempotency key (`Idempotency-Key`, `webhook-id`, gRPC
//! `idempotency_key`). Before, the answer said nothing of the kind, and a transitive event
//! retried after such an answer was stored twice.

mod binary;
mod nats;
mod private_nats;

use std::collections::HashMap;
use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::{
    publish_request, subscribe_request::Start, PublishRequest, SubscribeRequest,
};
use nats::require;
use private_nats::{free_port, PrivateNats};
use serde_json::{json, Value};

fn with_id(id: i64) -> String {
    format!(r#"{{"ChatEvent":{{"Id":{id},"Type":"message_created","ChatId":9}},"Rels":null}}"#)
}

fn transitive(text: &str) -> String {
    transitive_in(text, 9)
}

/// A transitive event in chat `chat` (a typed difference: `Text` is no field of `ChatEvent`).
fn transitive_in(text: &str, chat: i64) -> String {
    format!(
        r#"{{"ChatEvent":{{"Type":"typing","Transitive":true,"ChatId":{chat},"Text":"{text}"}},"Rels":null}}"#
    )
}

/// POSTs `body` to `path` with `headers`; the status and the JSON answer.
async fn post(
    http: &reqwest::Client,
    gateway: &Process,
    path: &str,
    body: String,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let mut request = http
        .post(gateway.url(path))
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("the gateway answers");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// What the stream holds: one entry per stored event, its id (or text for a transitive one).
async fn stored(gateway: &Process, expected: usize) -> Vec<String> {
    let mut stream = gateway
        .grpc()
        .await
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            include_raw_json: true,
            ..Default::default()
        })
        .await
        .expect("subscribed")
        .into_inner();
    let mut seen = Vec::new();
    // Everything expected, then a short while for anything more.
    loop {
        let wait = if seen.len() < expected { 20 } else { 1 };
        match tokio::time::timeout(Duration::from_secs(wait), stream.message()).await {
            Ok(Ok(Some(event))) => {
                let raw: Value = serde_json::from_slice(&event.raw_json).unwrap_or_default();
                let chat_event = &raw["ChatEvent"];
                seen.push(match chat_event["Id"].as_i64() {
                    Some(id) => id.to_string(),
                    None => chat_event["Text"].as_str().unwrap_or("?").to_owned(),
                });
            }
            _ => return seen,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_whose_ack_was_lost_are_answered_unknown_and_stored_once_when_sent_again() {
    if !require("the nats-server binary", private_nats::installed()) {
        return;
    }
    let nats = PrivateNats::start(free_port(), tempfile::tempdir().expect("a directory"))
        .expect("a private nats-server starts");
    let store = nats.url();
    let gateway = Process::start(&["--store", &store, "--nats-ack-timeout", "700ms"]);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("a client");
    assert_eq!(
        post(&http, &gateway, "/v1/events", with_id(1), &[]).await.0,
        200
    );

    // What is sent while the server is frozen, and how each is sent again.
    type Send = (&'static str, String, Vec<(&'static str, &'static str)>);
    let sends: Vec<Send> = vec![
        ("/v1/events", with_id(2), vec![]),
        (
            "/v1/events",
            transitive("single"),
            vec![("idempotency-key", "k-1")],
        ),
        (
            "/v1/events",
            transitive("webhook"),
            vec![("webhook-id", "msg_2")],
        ),
        (
            "/v1/events:batch",
            format!("[{}, {}]", with_id(3), transitive("batch")),
            vec![("idempotency-key", "b-1")],
        ),
    ];
    let mut grpc = gateway.grpc().await;
    let publish = PublishRequest {
        event: Some(publish_request::Event::RawJson(
            transitive("grpc").into_bytes(),
        )),
        idempotency_key: "g-1".into(),
    };
    // All at once: well within the ~6 s the gateway takes to give up on a frozen server (then
    // it would refuse events before sending them: not stored).
    let mut frozen_grpc = grpc.clone();
    nats.signal(libc::SIGSTOP);
    let (answers, grpc_answer) = tokio::join!(
        futures_util::future::join_all(sends.iter().map(|(path, body, headers)| post(
            &http,
            &gateway,
            path,
            body.clone(),
            headers
        )),),
        frozen_grpc.publish(publish.clone()),
    );
    nats.signal(libc::SIGCONT);

    for ((path, _, _), (status, body)) in sends.iter().zip(&answers) {
        assert_eq!(*status, 503, "{path}: {body}");
        assert_eq!(body["outcome"], "unknown", "{path}: {body}");
        assert!(
            body["error"]
                .as_str()
                .unwrap_or_default()
                .contains("may have been stored"),
            "{path}: {body}"
        );
    }
    let status = grpc_answer.expect_err("no ack: no answer of success");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(
        status
            .metadata()
            .get("iqgw-outcome")
            .and_then(|v| v.to_str().ok()),
        Some("unknown"),
        "{status:?}"
    );

    // Sent again once the server answers: each is stored, none twice.
    let mut again = Vec::new();
    for _ in 0..100 {
        let (status, body) = post(&http, &gateway, "/v1/events", with_id(2), &[]).await;
        if status == 200 {
            again.push(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(again.len(), 1, "the gateway stores again once NATS answers");
    for (path, body, headers) in sends.iter().skip(1) {
        let (status, answer) = post(&http, &gateway, path, body.clone(), headers).await;
        assert_eq!(status, 200, "{path}: {answer}");
        again.push(answer);
    }
    grpc.publish(publish).await.expect("stored when sent again");

    let held = stored(&gateway, 7).await;
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for name in &held {
        *counts.entry(name.as_str()).or_default() += 1;
    }
    assert_eq!(held.len(), 7, "each event once: {held:?}");
    for name in ["1", "2", "single", "webhook", "3", "batch", "grpc"] {
        assert_eq!(counts.get(name), Some(&1), "{name} stored once: {held:?}");
    }
    // The server had received them before it froze: the resent ones were duplicates.
    let duplicates = again
        .iter()
        .map(|answer| match &answer["results"] {
            Value::Array(items) => items
                .iter()
                .filter(|i| i["duplicate"] == json!(true))
                .count(),
            _ => usize::from(answer["duplicate"] == json!(true)),
        })
        .sum::<usize>();
    assert!(
        duplicates > 0,
        "some answered unknown had been stored: {again:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_is_checked_and_keys_a_transitive_event_only() {
    let dir = tempfile::tempdir().expect("a directory");
    let gateway = Process::embedded(dir.path(), &[]);
    let http = reqwest::Client::new();
    // The same key: stored once; the same key with another transitive event: a conflict.
    let key = [("idempotency-key", "same")];
    let (status, first) = post(&http, &gateway, "/v1/events", transitive("a"), &key).await;
    assert_eq!(
        (status, &first["duplicate"]),
        (200, &json!(false)),
        "{first}"
    );
    let (_, again) = post(&http, &gateway, "/v1/events", transitive("a"), &key).await;
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["sequence"], first["sequence"]);
    let (_, other) = post(&http, &gateway, "/v1/events", transitive_in("b", 10), &key).await;
    assert_eq!(other["conflict"], true, "{other}");
    // The key is the store's own: GetEvent by id never finds a transitive event by it.
    let internal = iqchannels_gateway::decode::idempotency_id("same", None);
    let found = gateway
        .grpc()
        .await
        .get_event(iqchannels_gateway::pb::client::GetEventRequest {
            key: Some(iqchannels_gateway::pb::client::get_event_request::Key::EventId(internal)),
            ..Default::default()
        })
        .await;
    assert_eq!(
        found.expect_err("not by its key").code(),
        tonic::Code::NotFound
    );
    // Without a key, a transitive event is stored each time it is sent.
    let (_, one) = post(&http, &gateway, "/v1/events", transitive("a"), &[]).await;
    let (_, two) = post(&http, &gateway, "/v1/events", transitive("a"), &[]).await;
    assert_ne!(one["sequence"], two["sequence"]);
    // An event with an id is deduplicated by its id whatever the key.
    let (_, id) = post(
        &http,
        &gateway,
        "/v1/events",
        with_id(5),
        &[("idempotency-key", "x")],
    )
    .await;
    let (_, id_again) = post(
        &http,
        &gateway,
        "/v1/events",
        with_id(5),
        &[("idempotency-key", "y")],
    )
    .await;
    assert_eq!(id_again["duplicate"], true, "{id} {id_again}");
    // A batch: each transitive item keyed by its place.
    let batch = format!("[{}, {}]", transitive("a"), transitive("a"));
    let (_, stored) = post(&http, &gateway, "/v1/events:batch", batch.clone(), &key).await;
    assert_eq!(stored["stored"], 2, "{stored}");
    let (_, resent) = post(&http, &gateway, "/v1/events:batch", batch, &key).await;
    assert_eq!(resent["duplicates"], 2, "{resent}");
    // Keys that cannot be one.
    let long = "k".repeat(256);
    for bad in ["", "with space", long.as_str()] {
        let (status, answer) = post(
            &http,
            &gateway,
            "/v1/events",
            transitive("a"),
            &[("idempotency-key", bad)],
        )
        .await;
        assert_eq!(status, 400, "{bad:?}: {answer}");
        assert!(answer["error"]
            .as_str()
            .unwrap_or_default()
            .contains("idempotency-key"));
    }
}
