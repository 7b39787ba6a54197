//! NaN and infinities (issue 19, point 7), on the real binary: a typed gRPC `Publish` whose
//! opaque values hold numbers JSON has no form for is stored with those numbers cut to `null`
//! (a `cut` deviation each), so that SSE sends the event, `subscribe --output json` prints it,
//! and `verify` and `export` find the store whole. Before, the event was stored as sent: the
//! CLI exited 1 on it at every resume, SSE sent `"event": null`, `verify` called the store
//! damaged and `export` skipped the event.

mod binary;

use std::process::Command;
use std::time::Duration;

use binary::{gateway_binary, Process};
use iqchannels_gateway::pb::client::{publish_request, PublishRequest};
use iqchannels_gateway::pb::webhook::v1::{ChatEvent, Envelope, Project, Rels};
use prost_types::value::Kind;
use prost_types::{ListValue, Value};

fn number(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_json_cannot_hold_are_cut_at_ingest_and_every_reader_gets_the_event() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().to_str().expect("UTF-8 path").to_owned();
    let gateway = Process::embedded(dir.path(), &[]);
    let envelope = Envelope {
        chat_event: Some(ChatEvent {
            id: 41,
            r#type: "chat_closed".to_owned(),
            ..ChatEvent::default()
        }),
        rels: Some(Rels {
            projects: vec![Project {
                id: 1,
                options: Some(number(f64::NAN)),
                permissions: Some(Value {
                    kind: Some(Kind::ListValue(ListValue {
                        values: vec![number(1.0), number(f64::INFINITY)],
                    })),
                }),
                ..Project::default()
            }],
            ..Rels::default()
        }),
    };
    let mut grpc = gateway.grpc().await;
    let answer = grpc
        .publish(PublishRequest {
            event: Some(publish_request::Event::Envelope(envelope)),
            ..Default::default()
        })
        .await
        .expect("stored")
        .into_inner();
    let mut cut: Vec<(String, String)> = answer
        .deviations
        .iter()
        .map(|d| (d.path.clone(), d.found.clone()))
        .collect();
    cut.sort();
    assert_eq!(
        cut,
        vec![
            ("Rels.Projects[0].Options".to_owned(), "NaN".to_owned()),
            (
                "Rels.Projects[0].Permissions[1]".to_owned(),
                "inf".to_owned()
            ),
        ]
    );

    // SSE sends the event (not `null`), with the numbers cut.
    let mut sse = reqwest::Client::new()
        .get(gateway.url("/v1/events:stream?from=beginning"))
        .send()
        .await
        .expect("SSE answers");
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), sse.chunk())
            .await
            .expect("an event in time")
            .expect("the stream goes on")
            .expect("a chunk");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data_line = text
        .lines()
        .find_map(|line| line.strip_prefix("data:"))
        .expect("a data line");
    let event: serde_json::Value = serde_json::from_str(data_line.trim()).expect("JSON");
    assert!(!event["event"].is_null(), "{event}");
    assert!(data_line.contains("\"Options\":null"), "{data_line}");

    // The CLI prints it as JSON.
    let address = format!("http://{}", gateway.addr);
    let printed = Command::new(gateway_binary())
        .args(["subscribe", "--server", &address, "--from-beginning"])
        .args(["--exit-after", "1", "--output", "json"])
        .output()
        .expect("the CLI runs");
    assert!(
        printed.status.success(),
        "{}",
        String::from_utf8_lossy(&printed.stderr)
    );
    let line: serde_json::Value = serde_json::from_slice(&printed.stdout).expect("one JSON line");
    assert_eq!(line["ChatEvent"]["Id"], 41, "{line}");
    drop(gateway);

    // The store is whole, and the event exported.
    let verify = Command::new(gateway_binary())
        .args(["verify", "--data-dir", &data])
        .output()
        .expect("verify runs");
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let export = Command::new(gateway_binary())
        .args(["export", "--data-dir", &data])
        .output()
        .expect("export runs");
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&export.stdout).lines().count(), 1);
}
