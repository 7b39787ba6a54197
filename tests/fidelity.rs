//! Fidelity to the vendor's real traffic, end to end over real sockets (HTTP in, gRPC and SSE
//! out), on the embedded store and on JetStream: transitive events (typing) are stored and
//! delivered every time, fields that do not fit are reported as deviations instead of refusing
//! the event, and a body nested past the protobuf limit is cut so every stream reads past it.

mod common;

use std::sync::Arc;

use common::{next_event, read_events, subscribe, subscription, TestServer, MESSAGE_CREATED};
use iqchannels_gateway::decode::Policy;
use iqchannels_gateway::log::embedded::{EmbeddedLog, Retention};
use iqchannels_gateway::log::SharedLog;
use iqchannels_gateway::pb::client::{
    publish_request, subscribe_request, Filter, PublishRequest, SubscribeRequest,
};
use iqchannels_gateway::pb::gateway::v1::DeviationOutcome;
use iqchannels_gateway::pb::webhook::v1::{ChatEvent, Envelope};
use iqchannels_gateway::server::ServerConfig;
use serde_json::{json, Value};

/// A body with every entity and field the proto knows (tests/roundtrip.rs checks it field by field).
const EVERY_FIELD: &[u8] = include_bytes!("data/every_field.json");

const TYPING: &str = r#"{"ChatEvent": {"Type": "typing", "Transitive": true, "ChatId": 13, "Actor": "client"}, "Rels": {}}"#;

/// A body with the SDKs' disagreements: NoticeId a word, TicketId a decimal string, RoleId a
/// float, Online a number.
fn odd_body(id: i64) -> String {
    json!({
        "ChatEvent": {"Id": id, "Type": "message_created", "ChatId": 13, "MessageId": 5},
        "Rels": {
            "ChatMessages": [{"Id": 5, "ChatId": 13, "Text": "Здравствуйте", "NoticeId": "n-15"}],
            "Chats": [{"Id": 13, "ProjectId": 1, "ChannelId": 1, "TicketId": "84"}],
            "Users": [{"Id": 7, "Name": "Оператор", "RoleId": 1.0, "Online": 1}]
        }
    })
    .to_string()
}

/// A body whose `Project.Options` nests 50 arrays: 100 protobuf levels as a Value.
fn poison_body(id: i64) -> String {
    let options = format!("{}1{}", "[".repeat(50), "]".repeat(50));
    format!(
        r#"{{"ChatEvent":{{"Id":{id},"Type":"chat_changed","CreatedAt":1}},"Rels":{{"Projects":[{{"Id":5,"Name":"Проект","Options":{options}}}]}}}}"#
    )
}

/// The expected `(path, outcome)` of the odd body's deviations, in body order.
const ODD_DEVIATIONS: &[(&str, &str)] = &[
    ("Rels.ChatMessages[0].NoticeId", "dropped"),
    ("Rels.Chats[0].TicketId", "coerced"),
    ("Rels.Users[0].RoleId", "coerced"),
    ("Rels.Users[0].Online", "coerced"),
];

fn paths(answer: &Value) -> Vec<(String, String)> {
    answer["deviations"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|d| {
                    (
                        d["path"].as_str().unwrap_or("").to_owned(),
                        d["outcome"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn expected(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(p, o)| (p.to_string(), o.to_string()))
        .collect()
}

/// The whole scenario against a server over `log`.
async fn scenario(log: SharedLog) {
    let server = TestServer::with_log(log, ServerConfig::default()).await;
    let mut sequences = Vec::new();

    // Two identical typing bodies are two events; a transitive event with Id 0 is one more.
    for body in [TYPING, TYPING] {
        let (status, answer) = server.post_event(body).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["duplicate"], false, "{answer}");
        assert!(answer.get("deviations").is_none(), "{answer}");
        sequences.push(answer["sequence"].as_u64().expect("a sequence"));
    }
    assert_ne!(sequences[0], sequences[1], "typing is never deduplicated");
    sequences.push(
        server
            .store(r#"{"ChatEvent": {"Id": 0, "Type": "typing", "Transitive": true}}"#)
            .await,
    );

    // A body with fields of the wrong type is stored, with its deviations in the answer.
    let (status, answer) = server.post_event(odd_body(100)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(paths(&answer), expected(ODD_DEVIATIONS), "{answer}");
    assert_eq!(answer["deviations"][0]["expected"], "int64");
    assert_eq!(answer["deviations"][0]["found"], "a string");
    assert!(
        !answer.to_string().contains("n-15"),
        "deviations never carry values"
    );
    let odd_sequence = answer["sequence"].as_u64().expect("a sequence");
    sequences.push(odd_sequence);
    // Its redelivery is a duplicate, still reporting the deviations.
    let (_, again) = server.post_event(odd_body(100)).await;
    assert_eq!(
        (again["sequence"].as_u64(), &again["duplicate"]),
        (Some(odd_sequence), &json!(true))
    );
    assert_eq!(paths(&again), expected(ODD_DEVIATIONS));

    // The poison body is stored with its opaque value cut.
    let (status, answer) = server.post_event(poison_body(101)).await;
    assert_eq!(status, 200, "{answer}");
    let cut = paths(&answer);
    assert_eq!(cut.len(), 1, "{answer}");
    assert!(
        cut[0].0.starts_with("Rels.Projects[0].Options[0]"),
        "{answer}"
    );
    assert_eq!(cut[0].1, "cut");
    let poison_sequence = answer["sequence"].as_u64().expect("a sequence");
    sequences.push(poison_sequence);
    sequences.push(server.store(MESSAGE_CREATED.to_vec()).await);
    let (status, answer) = server.post_event(EVERY_FIELD.to_vec()).await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        answer.get("deviations").is_none(),
        "every field is typed: {answer}"
    );
    let every_field_sequence = answer["sequence"].as_u64().expect("a sequence");
    sequences.push(every_field_sequence);

    // A non-transitive event still needs its id.
    let (status, answer) = server
        .post_event(r#"{"ChatEvent": {"Type": "chat_closed"}}"#)
        .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["path"], "ChatEvent.Id", "{answer}");

    // Typed gRPC Publish: without an id only when transitive, and then never deduplicated.
    let mut client = server.grpc().await;
    let typed = |id: i64, transitive: bool| PublishRequest {
        event: Some(publish_request::Event::Envelope(Envelope {
            chat_event: Some(ChatEvent {
                id,
                r#type: "typing".into(),
                transitive,
                ..Default::default()
            }),
            rels: None,
        })),
        ..Default::default()
    };
    let refused = client
        .publish(typed(0, false))
        .await
        .expect_err("no id, not transitive");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("ChatEvent.Id"), "{refused:?}");
    for _ in 0..2 {
        let published = client
            .publish(typed(0, true))
            .await
            .expect("a transitive typed publish")
            .into_inner();
        assert!(!published.duplicate);
        sequences.push(published.sequence);
    }
    // A raw JSON Publish reports deviations like HTTP.
    let published = client
        .publish(PublishRequest {
            event: Some(publish_request::Event::RawJson(odd_body(102).into_bytes())),
            ..Default::default()
        })
        .await
        .expect("raw publish")
        .into_inner();
    assert_eq!(published.deviations.len(), ODD_DEVIATIONS.len());
    assert_eq!(published.deviations[0].outcome(), DeviationOutcome::Dropped);
    let odd_published = published.sequence;
    sequences.push(odd_published);
    let mut sorted = sequences.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted, sequences,
        "every event got its own, increasing sequence"
    );

    // gRPC from the beginning (prost, default limits): every event, the poison one readable.
    let mut stream = subscribe(
        &mut client,
        subscription(
            Filter::default(),
            Some(subscribe_request::Start::Beginning(())),
        ),
    )
    .await;
    let mut typing = 0;
    for &sequence in &sequences {
        let event = next_event(&mut stream).await;
        assert_eq!(event.sequence, sequence);
        let envelope = event.envelope.as_ref().expect("typed");
        let chat_event = envelope.chat_event.as_ref().expect("ChatEvent");
        if chat_event.r#type == "typing" {
            typing += 1;
        }
        if sequence == odd_sequence || sequence == odd_published {
            let got: Vec<(String, DeviationOutcome)> = event
                .deviations
                .iter()
                .map(|d| (d.path.clone(), d.outcome()))
                .collect();
            assert_eq!(got.len(), ODD_DEVIATIONS.len(), "{got:?}");
            assert_eq!(got[0].0, ODD_DEVIATIONS[0].0);
            let rels = envelope.rels.as_ref().expect("Rels");
            assert_eq!(rels.chats[0].ticket_id, Some(84));
            assert_eq!(rels.users[0].role_id, 1);
            assert!(rels.users[0].online);
            assert_eq!(rels.chat_messages[0].notice_id, None);
            assert_eq!(rels.chat_messages[0].text, "Здравствуйте");
        } else if sequence == every_field_sequence {
            let want = iqchannels_gateway::decode::decode(EVERY_FIELD)
                .expect("decodes")
                .envelope;
            assert_eq!(envelope, &want, "every field arrives typed over gRPC");
            assert!(event.deviations.is_empty());
        } else if sequence == poison_sequence {
            assert_eq!(event.deviations.len(), 1);
            assert_eq!(event.deviations[0].outcome(), DeviationOutcome::Cut);
            let rels = envelope.rels.as_ref().expect("Rels");
            assert_eq!(rels.projects[0].name, "Проект");
            assert!(rels.projects[0].options.is_some());
        } else {
            assert!(event.deviations.is_empty(), "{:?}", event.deviations);
        }
    }
    assert_eq!(typing, 5, "every typing event reached the subscriber");
    let fetched = common::get_by_sequence(&mut client, poison_sequence, true)
        .await
        .expect("GetEvent reads the poison event");
    assert_eq!(
        fetched.raw_json,
        poison_body(101).into_bytes(),
        "raw JSON kept whole"
    );

    // SSE from the beginning: the same events, deviations beside the body.
    let mut response = reqwest::Client::new()
        .get(server.url("/v1/events:stream?from=beginning"))
        .send()
        .await
        .expect("SSE connects");
    assert_eq!(response.status(), 200);
    let events = read_events(&mut response, sequences.len()).await;
    let ids: Vec<u64> = events.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, sequences);
    for (id, data) in &events {
        if *id == odd_sequence || *id == odd_published {
            assert_eq!(paths(data), expected(ODD_DEVIATIONS), "{data}");
            assert_eq!(data["event"]["Rels"]["Chats"][0]["TicketId"], "84");
        } else if *id == poison_sequence {
            assert_eq!(paths(data).len(), 1, "{data}");
        } else {
            assert!(data.get("deviations").is_none(), "{data}");
        }
    }
    assert_eq!(
        events.iter().filter(|(_, d)| d["type"] == "typing").count(),
        5,
        "every typing event, typed ones included"
    );

    // Metrics count deviations by field pattern, with indices removed.
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    for line in [
        r#"iqgw_decode_deviations_total{path="Rels.ChatMessages[].NoticeId",outcome="dropped"} 3"#,
        r#"iqgw_decode_deviations_total{path="Rels.Chats[].TicketId",outcome="coerced"} 3"#,
        r#"iqgw_decode_deviations_total{path="Rels.Projects[].Options",outcome="cut"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    server.stop().await;
}

#[tokio::test]
async fn typing_odd_fields_and_a_poison_body_all_reach_subscribers_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let log = EmbeddedLog::open(dir.path(), Retention::default()).expect("the store opens");
    scenario(Arc::new(log)).await;
}

#[tokio::test]
async fn typing_odd_fields_and_a_poison_body_all_reach_subscribers_on_jetstream() {
    let Some((log, _stream)) = common::jetstream_log().await else {
        return;
    };
    scenario(log).await;
}

#[tokio::test]
async fn strict_decode_refuses_any_deviation_naming_its_path_but_still_takes_typing() {
    let server = TestServer::with_config(ServerConfig {
        decode_policy: Policy::Strict,
        ..ServerConfig::default()
    })
    .await;
    let (status, answer) = server.post_event(odd_body(1)).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["path"], "Rels.ChatMessages[0].NoticeId", "{answer}");
    let (status, answer) = server.post_event(poison_body(2)).await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["path"], "Rels.Projects[0].Options", "{answer}");
    let first = server.store(TYPING).await;
    let second = server.store(TYPING).await;
    assert_eq!(second, first + 1);
    // Batches follow the same policy, item by item.
    let batch = format!("[{}, {TYPING}]", odd_body(3));
    let (status, answer) = server
        .post("/v1/events:batch", Some("application/json"), batch)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["rejected"], 1, "{answer}");
    assert_eq!(answer["stored"], 1, "{answer}");
}

#[tokio::test]
async fn a_batch_reports_deviations_per_item() {
    let server = TestServer::start().await;
    let batch = format!("[{}, {TYPING}, {TYPING}]", odd_body(1));
    let (status, answer) = server
        .post("/v1/events:batch", Some("application/json"), batch)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stored"], 3, "{answer}");
    assert_eq!(paths(&answer["results"][0]), expected(ODD_DEVIATIONS));
    assert!(answer["results"][1].get("deviations").is_none());
    let ndjson = format!("{}\n{TYPING}\n", odd_body(2));
    let (status, answer) = server
        .post("/v1/events:batch", Some("application/x-ndjson"), ndjson)
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["stored"], 2, "{answer}");
    assert_eq!(paths(&answer["results"][0]), expected(ODD_DEVIATIONS));
}

/// Half an emoji (an unpaired surrogate escape: valid JSON, but no protobuf string can hold it)
/// in a message's text: stored, typed with U+FFFD in its place, reported as `replaced`, delivered
/// with the raw JSON byte for byte; sent again, it is a duplicate, not a conflict.
#[tokio::test]
async fn half_an_emoji_in_a_text_is_stored_replaced_in_the_typed_form_and_kept_in_the_raw_json() {
    let server = TestServer::start().await;
    let body = r#"{"ChatEvent": {"Id": 41, "Type": "message_created", "ChatId": 13, "MessageId": 5},
        "Rels": {"ChatMessages": [{"Id": 5, "ChatId": 13, "Text": "Спасибо \ud83d"}]}}"#;
    let (status, answer) = server.post_event(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        paths(&answer),
        expected(&[("Rels.ChatMessages[0].Text", "replaced")])
    );
    let (status, again) = server.post_event(body).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["sequence"], answer["sequence"], "{again}");
    assert!(again.get("conflict").is_none(), "{again}");

    let mut client = server.grpc().await;
    let mut stream = subscribe(
        &mut client,
        SubscribeRequest {
            include_raw_json: true,
            ..subscription(
                Filter::default(),
                Some(subscribe_request::Start::Beginning(())),
            )
        },
    )
    .await;
    let event = next_event(&mut stream).await;
    assert_eq!(event.raw_json, body.as_bytes());
    assert_eq!(event.deviations.len(), 1, "{:?}", event.deviations);
    assert_eq!(event.deviations[0].outcome(), DeviationOutcome::Replaced);
    let rels = event
        .envelope
        .as_ref()
        .and_then(|e| e.rels.as_ref())
        .expect("Rels");
    assert_eq!(rels.chat_messages[0].text, "Спасибо \u{FFFD}");
    server.stop().await;
}

/// Keys spelled as the vendor's SDKs have spelled them (issue 19, point 8): typed into the usual
/// fields, each reported `respelled` with the key as sent, and the raw JSON kept byte for byte.
#[tokio::test]
async fn keys_spelled_as_the_vendors_sdks_spelled_them_are_typed_and_kept_as_sent() {
    let server = TestServer::start().await;
    let body = r#"{"ChatEvent": {"Id": 42, "Type": "message_created", "ChatId": 13, "IsPublic": true},
        "Rels": {"Clients": [{"Id": 7, "PersonalManagerID": 99, "Details": {"BirthDay": "13.08.1899"}}],
                 "ChatMessages": [{"Id": 5, "SingleChoices": [{"id": 3, "chatMessageId": 5, "title": "Да"}]}]}}"#;
    let (status, answer) = server.post_event(body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        paths(&answer),
        expected(&[
            ("ChatEvent.IsPublic", "respelled"),
            ("Rels.Clients[0].PersonalManagerID", "respelled"),
            ("Rels.Clients[0].Details.BirthDay", "respelled"),
            ("Rels.ChatMessages[0].SingleChoices[0].id", "respelled"),
            (
                "Rels.ChatMessages[0].SingleChoices[0].chatMessageId",
                "respelled"
            ),
        ])
    );
    let mut client = server.grpc().await;
    let mut stream = subscribe(
        &mut client,
        SubscribeRequest {
            include_raw_json: true,
            ..subscription(
                Filter::default(),
                Some(subscribe_request::Start::Beginning(())),
            )
        },
    )
    .await;
    let event = next_event(&mut stream).await;
    assert_eq!(event.raw_json, body.as_bytes());
    assert!(event
        .deviations
        .iter()
        .all(|d| d.outcome() == DeviationOutcome::Respelled));
    let envelope = event.envelope.expect("typed");
    assert!(envelope.chat_event.expect("ChatEvent").public);
    let rels = envelope.rels.expect("Rels");
    assert_eq!(rels.clients[0].personal_manager_id, Some(99));
    assert_eq!(
        rels.clients[0].details.as_ref().expect("Details").birthday,
        "13.08.1899"
    );
    let choice = &rels.chat_messages[0].single_choices[0];
    assert_eq!((choice.id, choice.chat_message_id), (3, 5));
}
