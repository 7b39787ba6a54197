//! End to end over real sockets: the real server on 127.0.0.1:0, HTTP/1.1 ingest with reqwest and
//! gRPC on the same port with the generated client, as a webhook sender and a downstream service
//! would use them.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use iqchannels_gateway::pb::client::{
    publish_request, subscribe_request::Start, Filter, PublishRequest,
};
use iqchannels_gateway::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

fn beginning() -> Option<Start> {
    Some(Start::Beginning(()))
}

#[tokio::test]
async fn posted_fixtures_arrive_typed_on_a_subscription_filtered_by_event_type() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let mut messages = subscribe(
        &mut client,
        subscription(
            Filter {
                event_types: vec!["message_created".into()],
                ..Filter::default()
            },
            None,
        ),
    )
    .await;
    let mut everything = subscribe(&mut client, subscription(Filter::default(), None)).await;

    assert_eq!(server.store(CHAT_CLOSED).await, 1);
    assert_eq!(server.store(MESSAGE_CREATED).await, 2);

    let event = next_event(&mut messages).await;
    assert_eq!(event.sequence, 2);
    assert!(event.received_at.is_some());
    assert!(event.raw_json.is_empty(), "raw JSON only when asked for");
    let envelope = event.envelope.expect("typed envelope");
    let chat_event = envelope.chat_event.expect("ChatEvent");
    assert_eq!(chat_event.id, 608);
    assert_eq!(chat_event.r#type, "message_created");
    assert_eq!(chat_event.message_id, Some(300));
    assert_eq!(chat_event.client_id, None);
    let rels = envelope.rels.expect("Rels");
    assert_eq!(
        rels.chat_messages[0].file_id.as_deref(),
        Some("6054cfb4-ee70-11e8-8b35-3fa764e1543e.json")
    );
    assert_eq!(rels.files[0].name, "example-request.json");
    assert_eq!(rels.projects[0].name, "Физические лица");

    let first = next_event(&mut everything).await;
    assert_eq!((first.sequence, event_type(&first)), (1, "chat_closed"));
    let closed = first.envelope.expect("envelope");
    assert_eq!(closed.rels.expect("Rels").clients[0].name, "Альфред Хичкок");
    assert_eq!(
        event_type(&next_event(&mut everything).await),
        "message_created"
    );

    // The filtered stream skipped chat_closed: the next thing it sees is the next match.
    server
        .store(event_json(9001, "message_created", 13, "client", 1))
        .await;
    let next = next_event(&mut messages).await;
    assert_eq!((next.sequence, event_id(&next)), (3, 9001));
}

/// The event ids a filter lets through, from the beginning of the log: `want` events, then
/// nothing more for a while.
async fn filtered_ids(server: &TestServer, filter: Filter, want: usize) -> Vec<i64> {
    let mut client = server.grpc().await;
    let mut stream = subscribe(&mut client, subscription(filter, beginning())).await;
    let mut ids = Vec::new();
    for _ in 0..want {
        ids.push(event_id(&next_event(&mut stream).await));
    }
    if let Ok(extra) = tokio::time::timeout(Duration::from_millis(200), stream.message()).await {
        panic!("more than {want} events: {ids:?} then {extra:?}");
    }
    ids
}

#[tokio::test]
async fn filters_by_chat_project_actor_user_and_type_combine_with_and() {
    let server = TestServer::start().await;
    server.store(CHAT_CLOSED).await; // 4622: chat 13, project 1, user 1, actor user
    server.store(MESSAGE_CREATED).await; // 608: chat 21, project 1, user 1, actor user
    server
        .store(event_json(1, "message_created", 13, "client", 1))
        .await;
    server.store(event_json(2, "typing", 13, "client", 1)).await;
    server
        .store(event_json(3, "chat_closed", 77, "system", 5))
        .await;

    let cases: Vec<(&str, Filter, Vec<i64>)> = vec![
        ("no filter", Filter::default(), vec![4622, 608, 1, 2, 3]),
        (
            "chat 13",
            Filter {
                chat_ids: vec![13],
                ..Filter::default()
            },
            vec![4622, 1, 2],
        ),
        (
            "chat 21 or 77",
            Filter {
                chat_ids: vec![21, 77],
                ..Filter::default()
            },
            vec![608, 3],
        ),
        (
            "project 1",
            Filter {
                project_ids: vec![1],
                ..Filter::default()
            },
            vec![4622, 608, 1, 2],
        ),
        (
            "project 5",
            Filter {
                project_ids: vec![5],
                ..Filter::default()
            },
            vec![3],
        ),
        (
            "actor user or system",
            Filter {
                actors: vec!["user".into(), "system".into()],
                ..Filter::default()
            },
            vec![4622, 608, 3],
        ),
        (
            "user 1",
            Filter {
                user_ids: vec![1],
                ..Filter::default()
            },
            vec![4622, 608],
        ),
        (
            "chat 13 and actor client or user and type chat_closed or message_created",
            Filter {
                chat_ids: vec![13],
                actors: vec!["client".into(), "user".into()],
                event_types: vec!["chat_closed".into(), "message_created".into()],
                ..Filter::default()
            },
            vec![4622, 1],
        ),
        (
            "no match",
            Filter {
                event_types: vec!["typing".into()],
                actors: vec!["user".into()],
                ..Filter::default()
            },
            vec![],
        ),
    ];
    for (name, filter, want) in cases {
        assert_eq!(
            filtered_ids(&server, filter, want.len()).await,
            want,
            "{name}"
        );
    }
}

#[tokio::test]
async fn start_positions_beginning_after_sequence_since_time_and_live() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    server.store(CHAT_CLOSED).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let between = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970");
    tokio::time::sleep(Duration::from_millis(20)).await;
    server.store(MESSAGE_CREATED).await;

    let mut from_start = subscribe(&mut client, subscription(Filter::default(), beginning())).await;
    assert_eq!(next_event(&mut from_start).await.sequence, 1);
    assert_eq!(next_event(&mut from_start).await.sequence, 2);

    let mut after = subscribe(
        &mut client,
        subscription(Filter::default(), Some(Start::AfterSequence(1))),
    )
    .await;
    assert_eq!(next_event(&mut after).await.sequence, 2);

    let since = prost_types::Timestamp {
        seconds: between.as_secs() as i64,
        nanos: between.subsec_nanos() as i32,
    };
    let mut since_time = subscribe(
        &mut client,
        subscription(Filter::default(), Some(Start::SinceTime(since))),
    )
    .await;
    let event = next_event(&mut since_time).await;
    assert_eq!((event.sequence, event_id(&event)), (2, 608));

    // The received_at of an event is a valid since_time that includes it.
    let second = get_by_sequence(&mut client, 2, false).await.expect("found");
    let mut exact = subscribe(
        &mut client,
        subscription(
            Filter::default(),
            Some(Start::SinceTime(second.received_at.expect("received_at"))),
        ),
    )
    .await;
    assert_eq!(next_event(&mut exact).await.sequence, 2);

    let mut live = subscribe(&mut client, subscription(Filter::default(), None)).await;
    server.store(event_json(5, "typing", 13, "client", 1)).await;
    let event = next_event(&mut live).await;
    assert_eq!(
        (event.sequence, event_id(&event)),
        (3, 5),
        "only the new one"
    );

    // Every stream continues live after its catch-up.
    for stream in [&mut from_start, &mut after, &mut since_time, &mut exact] {
        assert_eq!(next_event(stream).await.sequence, 3);
    }
}

#[tokio::test]
async fn include_raw_json_returns_the_exact_posted_bytes() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    // Odd but valid formatting that a re-encode would change.
    let body =
        b"  {\"ChatEvent\":{\"Id\":7,\"Type\":\"typing\",\"Extra\":{\"\xd0\x96\":1.50}}\n}\n";
    server.store(&body[..]).await;
    server.store(CHAT_CLOSED).await;
    let mut stream = subscribe(
        &mut client,
        iqchannels_gateway::pb::client::SubscribeRequest {
            filter: None,
            start: beginning(),
            include_raw_json: true,
            include_references: false,
            ..Default::default()
        },
    )
    .await;
    assert!(next_event(&mut stream).await.raw_json == body, "first body");
    assert!(
        next_event(&mut stream).await.raw_json == CHAT_CLOSED,
        "fixture"
    );
    let with_raw = get_by_sequence(&mut client, 2, true).await.expect("found");
    assert!(with_raw.raw_json == CHAT_CLOSED, "GetEvent raw JSON");
    let without = get_by_sequence(&mut client, 2, false).await.expect("found");
    assert!(without.raw_json.is_empty());
}

#[tokio::test]
async fn a_redelivered_event_is_stored_once_and_answered_as_a_duplicate() {
    let server = TestServer::start().await;
    let (status, first) = server.post_event(CHAT_CLOSED).await;
    assert_eq!(status, 200);
    assert_eq!(
        first,
        serde_json::json!({"sequence": 1, "duplicate": false})
    );
    let (status, again) = server.post_event(CHAT_CLOSED).await;
    assert_eq!(status, 200);
    assert_eq!(again, serde_json::json!({"sequence": 1, "duplicate": true}));
    // Same id, different body: still the same event, and the answer says the content differs.
    let (status, same_id) = server
        .post_event(event_json(4622, "chat_closed", 1, "system", 1))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        same_id,
        serde_json::json!({"sequence": 1, "duplicate": true, "conflict": true})
    );
    assert_eq!(server.store(MESSAGE_CREATED).await, 2);
}

#[tokio::test]
async fn publish_takes_raw_json_or_a_typed_envelope() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let raw = client
        .publish(PublishRequest {
            event: Some(publish_request::Event::RawJson(CHAT_CLOSED.to_vec())),
            ..Default::default()
        })
        .await
        .expect("raw JSON publish")
        .into_inner();
    assert_eq!((raw.sequence, raw.duplicate), (1, false));

    let mut envelope = iqchannels_gateway::decode::decode(MESSAGE_CREATED)
        .expect("decodes")
        .envelope;
    let publish = |envelope| PublishRequest {
        event: Some(publish_request::Event::Envelope(envelope)),
        ..Default::default()
    };
    let typed = client
        .publish(publish(envelope.clone()))
        .await
        .expect("envelope publish")
        .into_inner();
    assert_eq!((typed.sequence, typed.duplicate), (2, false));
    let again = client
        .publish(publish(envelope.clone()))
        .await
        .expect("duplicate publish")
        .into_inner();
    assert_eq!((again.sequence, again.duplicate), (2, true));
    let over_http = server.post_event(MESSAGE_CREATED).await;
    assert_eq!(
        over_http,
        (200, serde_json::json!({"sequence": 2, "duplicate": true}))
    );

    let stored = get_by_event_id(&mut client, 608).await.expect("found");
    assert_eq!(stored.envelope.as_ref(), Some(&envelope));
    let stored = get_by_sequence(&mut client, 2, true).await.expect("found");
    assert!(
        stored.raw_json.is_empty(),
        "a typed publish has no JSON body"
    );

    // Bad publishes are INVALID_ARGUMENT naming the field; nothing is stored.
    let bad_json = client
        .publish(PublishRequest {
            event: Some(publish_request::Event::RawJson(
                br#"{"ChatEvent": {"Id": "x", "Type": "typing"}}"#.to_vec(),
            )),
            ..Default::default()
        })
        .await
        .expect_err("wrong type");
    assert_eq!(bad_json.code(), Code::InvalidArgument);
    assert!(
        bad_json.message().starts_with("ChatEvent.Id:"),
        "{bad_json:?}"
    );
    envelope.chat_event.as_mut().expect("event").r#type.clear();
    envelope.chat_event.as_mut().expect("event").id = 1;
    let no_type = client
        .publish(publish(envelope))
        .await
        .expect_err("no type");
    assert_eq!(no_type.code(), Code::InvalidArgument);
    assert!(no_type.message().contains("ChatEvent.Type"), "{no_type:?}");
    let empty = client
        .publish(PublishRequest {
            event: None,
            ..Default::default()
        })
        .await
        .expect_err("no event");
    assert_eq!(empty.code(), Code::InvalidArgument);
    assert_eq!(
        get_by_sequence(&mut client, 3, false)
            .await
            .expect_err("nothing more stored")
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn get_event_by_sequence_and_by_event_id() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    server.store(CHAT_CLOSED).await;
    server.store(MESSAGE_CREATED).await;
    let by_sequence = get_by_sequence(&mut client, 2, false).await.expect("found");
    assert_eq!((by_sequence.sequence, event_id(&by_sequence)), (2, 608));
    let by_id = get_by_event_id(&mut client, 4622).await.expect("found");
    assert_eq!((by_id.sequence, event_type(&by_id)), (1, "chat_closed"));
    assert_eq!(by_id.received_at, {
        let first = get_by_sequence(&mut client, 1, false).await.expect("found");
        first.received_at
    });
    for missing in [
        get_by_sequence(&mut client, 0, false).await,
        get_by_sequence(&mut client, 3, false).await,
        get_by_sequence(&mut client, u64::MAX, false).await,
        get_by_event_id(&mut client, 9_007_199_254_740_993).await,
    ] {
        assert_eq!(
            missing.expect_err("not stored").code(),
            Code::NotFound,
            "unknown keys are NOT_FOUND"
        );
    }
    let no_key = client
        .get_event(iqchannels_gateway::pb::client::GetEventRequest {
            key: None,
            include_raw_json: false,
            include_references: false,
        })
        .await
        .expect_err("no key");
    assert_eq!(no_key.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn batch_of_a_json_array_stores_every_item() {
    let server = TestServer::start().await;
    let mut body = b"[".to_vec();
    body.extend_from_slice(CHAT_CLOSED);
    body.extend_from_slice(b",\n");
    body.extend_from_slice(MESSAGE_CREATED);
    body.extend_from_slice(b",");
    body.extend_from_slice(CHAT_CLOSED);
    body.extend_from_slice(b"]");
    let response = reqwest::Client::new()
        .post(server.url("/v1/events:batch"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let (status, json) = answer(response).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        json,
        serde_json::json!({
            "stored": 2, "duplicates": 1, "rejected": 0,
            "results": [
                {"sequence": 1, "duplicate": false},
                {"sequence": 2, "duplicate": false},
                {"sequence": 1, "duplicate": true},
            ]
        })
    );
    // Each item keeps its own exact bytes.
    let mut client = server.grpc().await;
    let stored = get_by_sequence(&mut client, 2, true).await.expect("found");
    // The item's bytes: the fixture without its final newline, which is outside the array item.
    assert!(
        stored.raw_json == MESSAGE_CREATED.trim_ascii_end(),
        "raw JSON of item 2 is not its exact bytes: {}",
        String::from_utf8_lossy(&stored.raw_json)
    );
}

#[tokio::test]
async fn batch_of_ndjson_answers_a_bad_item_and_stores_the_others() {
    let server = TestServer::start().await;
    let compact = |body: &[u8]| {
        serde_json::to_string(&serde_json::from_slice::<serde_json::Value>(body).expect("JSON"))
            .expect("serializes")
    };
    let body = format!(
        "{}\n{{\"ChatEvent\": {{\"Id\": \"oops\", \"Type\": \"typing\"}}}}\n\n{}\n",
        compact(CHAT_CLOSED),
        compact(MESSAGE_CREATED)
    );
    let response = reqwest::Client::new()
        .post(server.url("/v1/events:batch"))
        .header("content-type", "application/x-ndjson")
        .body(body)
        .send()
        .await
        .expect("request");
    let (status, json) = answer(response).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["stored"], 2, "{json}");
    assert_eq!(json["rejected"], 1, "{json}");
    let results = json["results"].as_array().expect("results");
    assert_eq!(results.len(), 3, "blank lines are not items: {json}");
    assert_eq!(
        results[0],
        serde_json::json!({"sequence": 1, "duplicate": false})
    );
    assert_eq!(results[1]["path"], "ChatEvent.Id", "{json}");
    assert!(
        results[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("positive integer")),
        "{json}"
    );
    assert_eq!(
        results[2],
        serde_json::json!({"sequence": 2, "duplicate": false})
    );

    let mut client = server.grpc().await;
    assert_eq!(
        event_id(&get_by_sequence(&mut client, 2, false).await.expect("found")),
        608
    );
    assert_eq!(
        get_by_sequence(&mut client, 3, false)
            .await
            .expect_err("the bad item was not stored")
            .code(),
        Code::NotFound
    );

    // A body that cannot be split into items is rejected as a whole.
    let response = reqwest::Client::new()
        .post(server.url("/v1/events:batch"))
        .header("content-type", "application/json")
        .body(r#"{"ChatEvent": {"Id": 1, "Type": "typing"}}"#)
        .send()
        .await
        .expect("request");
    let (status, json) = answer(response).await;
    assert_eq!(status, 400, "{json}");
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| e.contains("expected a JSON array")),
        "{json}"
    );
}

/// One bad request and the answer it must get.
struct Bad {
    name: &'static str,
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    /// For 400s: the field path the answer must name.
    error_path: Option<&'static str>,
}

fn bad(name: &'static str, body: &[u8], status: u16, error_path: Option<&'static str>) -> Bad {
    Bad {
        name,
        method: "POST",
        path: "/v1/events",
        content_type: Some("application/json"),
        body: body.to_vec(),
        status,
        error_path,
    }
}

/// Body limit of the server in the bad-input test.
const SMALL_LIMIT: usize = 16 * 1024;

fn bad_inputs() -> Vec<Bad> {
    let mut oversize = br#"{"ChatEvent": {"Id": 1, "Type": "typing", "Pad": ""#.to_vec();
    oversize.resize(SMALL_LIMIT + 100, b'x');
    oversize.extend_from_slice(b"\"}}");
    vec![
        bad(
            "malformed JSON",
            b"{\"ChatEvent\": {",
            400,
            Some("ChatEvent"),
        ),
        bad("missing colon", b"{\"ChatEvent\" 1}", 400, Some(".")),
        bad("an array", b"[]", 400, Some(".")),
        bad("a string", b"\"event\"", 400, Some(".")),
        bad("a number", b"4622", 400, Some(".")),
        bad("null", b"null", 400, Some(".")),
        bad("an empty body", b"", 400, Some(".")),
        bad("no ChatEvent", b"{\"Rels\": {}}", 400, Some("ChatEvent")),
        bad(
            "ChatEvent null",
            b"{\"ChatEvent\": null}",
            400,
            Some("ChatEvent"),
        ),
        bad(
            "no Id",
            b"{\"ChatEvent\": {\"Type\": \"typing\"}}",
            400,
            Some("ChatEvent.Id"),
        ),
        bad(
            "no Type",
            b"{\"ChatEvent\": {\"Id\": 1}}",
            400,
            Some("ChatEvent.Type"),
        ),
        bad(
            "Id as a word",
            b"{\"ChatEvent\": {\"Id\": \"one\", \"Type\": \"typing\"}}",
            400,
            Some("ChatEvent.Id"),
        ),
        bad(
            "Rels as a list",
            b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"typing\"}, \"Rels\": []}",
            400,
            Some("Rels"),
        ),
        bad(
            "Type as a number",
            b"{\"ChatEvent\": {\"Id\": 1, \"Type\": 7}}",
            400,
            Some("ChatEvent.Type"),
        ),
        bad(
            "invalid UTF-8",
            b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"typ\xffing\"}}",
            400,
            Some("ChatEvent.Type"),
        ),
        bad(
            "trailing garbage",
            b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"typing\"}} {",
            400,
            Some("."),
        ),
        bad("over the body limit", &oversize, 413, None),
        Bad {
            content_type: Some("text/plain"),
            ..bad("text/plain", CHAT_CLOSED, 415, None)
        },
        Bad {
            content_type: None,
            ..bad("no content type", CHAT_CLOSED, 415, None)
        },
        Bad {
            content_type: Some("application/x-www-form-urlencoded"),
            ..bad("a form", b"a=1", 415, None)
        },
        Bad {
            method: "GET",
            content_type: None,
            ..bad("GET /v1/events", b"", 405, None)
        },
        Bad {
            method: "PUT",
            ..bad("PUT /v1/events", CHAT_CLOSED, 405, None)
        },
        Bad {
            method: "DELETE",
            path: "/v1/events:batch",
            ..bad("DELETE /v1/events:batch", b"", 405, None)
        },
        Bad {
            path: "/v1/event",
            ..bad("unknown path", CHAT_CLOSED, 404, None)
        },
        Bad {
            method: "GET",
            path: "/v2/",
            content_type: None,
            ..bad("unknown GET path", b"", 404, None)
        },
        Bad {
            method: "POST",
            path: "/",
            ..bad("POST to the console page", CHAT_CLOSED, 405, None)
        },
    ]
}

#[tokio::test]
async fn bad_inputs_get_their_4xx_while_the_server_keeps_serving_and_stores_nothing() {
    let server = TestServer::with_config(ServerConfig {
        max_body_bytes: SMALL_LIMIT,
        ..ServerConfig::default()
    })
    .await;
    let http = reqwest::Client::new();
    let mut failures = Vec::new();
    for case in bad_inputs() {
        let method = reqwest::Method::from_bytes(case.method.as_bytes()).expect("method");
        let mut request = http
            .request(method, server.url(case.path))
            .body(case.body.clone());
        if let Some(content_type) = case.content_type {
            request = request.header("content-type", content_type);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                failures.push(format!("{}: request failed: {error}", case.name));
                continue;
            }
        };
        let is_json = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        let (status, json) = answer(response).await;
        if status != case.status {
            failures.push(format!(
                "{}: status {status}, want {} ({json})",
                case.name, case.status
            ));
        }
        if !is_json || !json["error"].is_string() {
            failures.push(format!(
                "{}: answer is not JSON with an \"error\": {json}",
                case.name
            ));
        }
        if let Some(path) = case.error_path {
            if json["path"] != path {
                failures.push(format!(
                    "{}: path {}, want {path:?}",
                    case.name, json["path"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));

    // Still serving, and none of the above was stored.
    let (status, json) = server.post_event(CHAT_CLOSED).await;
    assert_eq!(
        (status, json),
        (200, serde_json::json!({"sequence": 1, "duplicate": false}))
    );
    let mut client = server.grpc().await;
    let mut stream = subscribe(&mut client, subscription(Filter::default(), beginning())).await;
    let first = next_event(&mut stream).await;
    assert_eq!((first.sequence, event_id(&first)), (1, 4622));
    assert_eq!(
        get_by_sequence(&mut client, 2, false)
            .await
            .expect_err("nothing else stored")
            .code(),
        Code::NotFound
    );
    assert_eq!(
        get_by_event_id(&mut client, 1)
            .await
            .expect_err("no bad event stored")
            .code(),
        Code::NotFound
    );
}

#[tokio::test]
async fn a_chunked_body_over_the_limit_gets_413() {
    let server = TestServer::with_config(ServerConfig {
        max_body_bytes: 1024,
        ..ServerConfig::default()
    })
    .await;
    // No Content-Length: the limit must hold while reading.
    let mut stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let chunk = vec![b' '; 800];
    let mut request = format!(
        "POST /v1/events HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
        server.addr
    )
    .into_bytes();
    for _ in 0..2 {
        request.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        request.extend_from_slice(&chunk);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    stream.write_all(&request).await.expect("write");
    let mut response = vec![0; 1024];
    let n = tokio::time::timeout(WAIT, stream.read(&mut response))
        .await
        .expect("answer in time")
        .expect("read");
    let response = String::from_utf8_lossy(&response[..n]);
    assert!(
        response.starts_with("HTTP/1.1 413"),
        "want 413, got {response}"
    );
    assert_eq!(
        server.store(event_json(1, "typing", 13, "client", 1)).await,
        1,
        "still serving"
    );
}

#[tokio::test]
async fn health_endpoints_and_grpc_health_report_serving() {
    let server = TestServer::start().await;
    for path in ["/healthz", "/readyz"] {
        let response = reqwest::get(server.url(path)).await.expect("request");
        assert_eq!(response.status().as_u16(), 200, "{path}");
    }
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    for service in ["", "iqchannels.gateway.v1.EventGateway"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect("health check answers")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "service {service:?}"
        );
    }
}

#[tokio::test]
async fn server_reflection_v1_and_v1alpha_list_and_describe_the_service() {
    let server = TestServer::start().await;
    let channel = server.channel().await;
    {
        use tonic_reflection::pb::v1::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new(channel.clone());
        let requests = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "iqchannels.gateway.v1.Event".into(),
                )),
            },
        ];
        let mut responses = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .expect("v1 reflection answers")
            .into_inner();
        match responses
            .message()
            .await
            .expect("ok")
            .map(|r| r.message_response)
        {
            Some(Some(MessageResponse::ListServicesResponse(list))) => {
                let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
                for want in [
                    "iqchannels.gateway.v1.EventGateway",
                    "grpc.health.v1.Health",
                ] {
                    assert!(names.iter().any(|n| n == want), "v1 lists {names:?}");
                }
            }
            other => panic!("v1: expected a service list, got {other:?}"),
        }
        match responses
            .message()
            .await
            .expect("ok")
            .map(|r| r.message_response)
        {
            Some(Some(MessageResponse::FileDescriptorResponse(files))) => {
                assert!(!files.file_descriptor_proto.is_empty())
            }
            other => panic!("v1: expected file descriptors, got {other:?}"),
        }
    }
    {
        use tonic_reflection::pb::v1alpha::{
            server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut responses = client
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .expect("v1alpha reflection answers")
            .into_inner();
        match responses
            .message()
            .await
            .expect("ok")
            .map(|r| r.message_response)
        {
            Some(Some(MessageResponse::ListServicesResponse(list))) => {
                assert!(
                    list.service
                        .iter()
                        .any(|s| s.name == "iqchannels.gateway.v1.EventGateway"),
                    "v1alpha lists {list:?}"
                );
            }
            other => panic!("v1alpha: expected a service list, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn shutdown_ends_open_streams_with_unavailable_and_serve_returns() {
    let server = TestServer::with_config(ServerConfig {
        grace: Duration::from_secs(5),
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.grpc().await;
    let mut stream = subscribe(&mut client, subscription(Filter::default(), None)).await;
    server.store(CHAT_CLOSED).await;
    assert_eq!(next_event(&mut stream).await.sequence, 1);
    let stopping = tokio::spawn(server.stop());
    let ended = tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("the stream ends in time");
    match ended {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(other) => panic!("expected UNAVAILABLE, got {other:?}"),
    }
    tokio::time::timeout(WAIT, stopping)
        .await
        .expect("serve returns within the grace period")
        .expect("no panic");
}

#[tokio::test]
async fn a_different_event_reusing_an_id_is_a_duplicate_marked_as_a_conflict() {
    let server = TestServer::start().await;
    let first = server.store(CHAT_CLOSED.to_vec()).await;
    // The same body again: a plain redelivery.
    let (status, again) = server.post_event(CHAT_CLOSED.to_vec()).await;
    assert_eq!(status, 200);
    assert_eq!(
        again,
        serde_json::json!({"sequence": first, "duplicate": true})
    );
    // Another event under the same id (4622).
    let typing = r#"{"ChatEvent": {"Id": 4622, "Type": "typing", "ChatId": 13}}"#;
    let (status, conflict) = server.post_event(typing).await;
    assert_eq!(status, 200, "{conflict}");
    assert_eq!(
        conflict,
        serde_json::json!({"sequence": first, "duplicate": true, "conflict": true})
    );
    let mut client = server.grpc().await;
    let published = client
        .publish(PublishRequest {
            event: Some(publish_request::Event::RawJson(typing.as_bytes().to_vec())),
            ..Default::default()
        })
        .await
        .expect("publish")
        .into_inner();
    assert!(published.duplicate && published.conflict, "{published:?}");
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("iqgw_duplicate_conflicts_total 2"),
        "{metrics}"
    );
    // The first event stays what it was.
    let stored = get_by_sequence(&mut client, first, false)
        .await
        .expect("stored");
    assert_eq!(event_type(&stored), "chat_closed");
}

#[tokio::test]
async fn since_a_future_time_streams_nothing_received_before_it_over_grpc_and_sse() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    let future = prost_types::Timestamp {
        seconds: 4_070_908_800, // 2099-01-01T00:00:00Z
        nanos: 0,
    };
    let mut stream = subscribe(
        &mut client,
        subscription(Filter::default(), Some(Start::SinceTime(future))),
    )
    .await;
    let mut sse = reqwest::Client::new()
        .get(server.url("/v1/events:stream?since=2099-01-01T00:00:00Z"))
        .send()
        .await
        .expect("SSE connects");
    assert_eq!(sse.status(), 200);
    server.store(CHAT_CLOSED.to_vec()).await;
    let grpc = tokio::time::timeout(Duration::from_millis(500), stream.message()).await;
    assert!(
        grpc.is_err(),
        "gRPC streamed an event received before 2099: {grpc:?}"
    );
    let chunk = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            match sse.chunk().await {
                Ok(Some(chunk)) if chunk.starts_with(b":") => continue, // keep-alive comment
                other => return other,
            }
        }
    })
    .await;
    assert!(
        chunk.is_err(),
        "SSE streamed an event received before 2099: {chunk:?}"
    );
}

#[tokio::test]
async fn a_cursor_ahead_of_the_newest_event_is_refused_with_out_of_range() {
    let server = TestServer::start().await;
    server.store(CHAT_CLOSED.to_vec()).await;
    let mut client = server.grpc().await;
    let status = client
        .subscribe(subscription(
            Filter::default(),
            Some(Start::AfterSequence(41)),
        ))
        .await
        .expect_err("a cursor from an older store's future");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("ahead"), "{status:?}");
    let response = reqwest::get(server.url("/v1/events:stream?after=41"))
        .await
        .expect("SSE answers");
    assert_eq!(response.status(), 416);
}

/// A redelivery with the same `ChatEvent` and other `Rels` (the vendor builds `Rels` when it
/// sends: a retry may carry a newer snapshot of the chat or the client) is the same event: a
/// duplicate without `conflict`, counted apart (issue 19, point 8: it was a conflict, logged as
/// a sender bug). Another `ChatEvent` under the id still is one; over HTTP and gRPC alike.
#[tokio::test]
async fn a_redelivery_with_refreshed_rels_is_no_conflict_another_chat_event_is() {
    let server = TestServer::start().await;
    let body =
        |rels: &str, chat_event: &str| format!(r#"{{"ChatEvent":{chat_event},"Rels":{rels}}}"#);
    let chat_event = r#"{"Id":77,"Type":"message_created","ChatId":13,"MessageId":5}"#;
    let first = server
        .store(body(r#"{"Chats":[{"Id":13,"Open":true}]}"#, chat_event))
        .await;
    // Newer snapshots in Rels, and its keys in another order.
    let (status, refreshed) = server
        .post_event(body(
            r#"{"Clients":[{"Id":3,"Name":"Ann"}],"Chats":[{"Id":13,"Open":false}]}"#,
            chat_event,
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        refreshed,
        serde_json::json!({"sequence": first, "duplicate": true})
    );
    let mut client = server.grpc().await;
    let published = client
        .publish(PublishRequest {
            event: Some(publish_request::Event::RawJson(
                body("null", chat_event).into_bytes(),
            )),
            ..Default::default()
        })
        .await
        .expect("publish")
        .into_inner();
    assert!(published.duplicate && !published.conflict, "{published:?}");
    // Another ChatEvent under the same id is a conflict.
    let (status, conflict) = server
        .post_event(body(
            r#"{"Chats":[{"Id":13}]}"#,
            r#"{"Id":77,"Type":"message_created","ChatId":13,"MessageId":6}"#,
        ))
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        conflict,
        serde_json::json!({"sequence": first, "duplicate": true, "conflict": true})
    );
    let metrics = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("iqgw_duplicate_refreshes_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("iqgw_duplicate_conflicts_total 1"),
        "{metrics}"
    );
    // Nothing was decoded again to tell: the digests did.
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("iqgw_conflict_check_decodes_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}
