//! `GET /v1/events:stream` (Server-Sent Events) over a real socket: filters, start positions,
//! `Last-Event-ID` resume, live delivery, and `/v1/stats`.

mod common;

use std::time::Duration;

use common::{event_json, read_events, TestServer};

#[tokio::test]
async fn sse_streams_filtered_events_resumes_from_last_event_id_and_follows_live() {
    let server = TestServer::start().await;
    server
        .store(event_json(1, "chat_closed", 13, "user", 1))
        .await;
    server
        .store(event_json(2, "message_created", 21, "client", 1))
        .await;
    server
        .store(event_json(3, "message_created", 22, "user", 1))
        .await;
    let http = reqwest::Client::new();

    let mut filtered = http
        .get(server.url("/v1/events:stream?from=beginning&type=message_created&actor=user"))
        .send()
        .await
        .unwrap();
    assert_eq!(filtered.status(), 200);
    assert_eq!(filtered.headers()["content-type"], "text/event-stream");
    let events = read_events(&mut filtered, 1).await;
    assert_eq!(events[0].0, 3);
    assert_eq!(events[0].1["type"], "message_created");
    assert_eq!(
        events[0].1["event"]["ChatEvent"]["Id"], 3,
        "the webhook body as sent"
    );

    let mut resumed = http
        .get(server.url("/v1/events:stream"))
        .header("last-event-id", "1")
        .send()
        .await
        .unwrap();
    let ids: Vec<u64> = read_events(&mut resumed, 2)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(ids, vec![2, 3], "Last-Event-ID resumes right after it");

    let mut live = http
        .get(server.url("/v1/events:stream"))
        .send()
        .await
        .unwrap();
    let mut tail = http
        .get(server.url("/v1/events:stream?tail=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        read_events(&mut tail, 1).await[0].0,
        3,
        "tail=1 starts with the newest event"
    );
    server
        .store(event_json(4, "chat_assigned", 22, "system", 1))
        .await;
    assert_eq!(
        read_events(&mut live, 1).await[0].0,
        4,
        "a live stream gets only new events"
    );

    let bad = http
        .get(server.url("/v1/events:stream?after=x"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    let stats: serde_json::Value = http
        .get(server.url("/v1/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["stored"], 4);
    assert_eq!(stats["last_sequence"], 4);
    assert!(
        stats["subscribers"].as_array().unwrap().len() >= 3,
        "{stats}"
    );
}

#[tokio::test]
async fn a_tail_beyond_retention_keeps_its_filter_and_an_expired_last_event_id_is_refused() {
    use iqchannels_gateway::log::memory::MemoryLog;
    let server = TestServer::with_log(
        std::sync::Arc::new(MemoryLog::new(Some(5))),
        iqchannels_gateway::server::ServerConfig::default(),
    )
    .await;
    for id in 1..=10 {
        let kind = if id % 2 == 0 {
            "chat_closed"
        } else {
            "message_created"
        };
        server.store(event_json(id, kind, 13, "user", 1)).await;
    }
    // Retained: 6..10; of those, chat_closed are 6, 8, 10.
    let mut response = reqwest::get(server.url("/v1/events:stream?type=chat_closed&tail=100"))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = read_events(&mut response, 3).await;
    let ids: Vec<u64> = events.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, vec![6, 8, 10]);
    assert!(events.iter().all(|(_, data)| data["type"] == "chat_closed"));
    // A reconnecting EventSource whose Last-Event-ID was removed by retention.
    let response = reqwest::Client::new()
        .get(server.url("/v1/events:stream?type=chat_closed&tail=100"))
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        410,
        "explicitly out of range, not restarted"
    );
}

#[tokio::test]
async fn sse_sends_every_stored_body_never_null() {
    use iqchannels_gateway::pb::client::{publish_request, PublishRequest};
    use iqchannels_gateway::pb::webhook::v1::{ChatEvent, Envelope};
    let server = TestServer::start().await;
    // Valid JSON that serde_json's Value cannot hold: a lone surrogate, a number beyond a double.
    let odd = r#"{"ChatEvent": {"Id": 1, "Type": "chat_closed"}, "Extra": "\ud800", "Big": 1e400}"#;
    server.store(odd).await;
    // A typed gRPC Publish has no original body.
    let mut client = server.grpc().await;
    client
        .publish(PublishRequest {
            event: Some(publish_request::Event::Envelope(Envelope {
                chat_event: Some(ChatEvent {
                    id: 9_007_199_254_740_993,
                    r#type: "chat_opened".into(),
                    chat_id: Some(13),
                    ..ChatEvent::default()
                }),
                rels: None,
            })),
            ..Default::default()
        })
        .await
        .expect("typed publish");
    let mut response = reqwest::get(server.url("/v1/events:stream?from=beginning"))
        .await
        .unwrap();
    // The raw frames, to see the body's exact text.
    let mut text = String::new();
    while text.matches("\n\n").count() < 2 {
        let chunk = tokio::time::timeout(Duration::from_secs(5), response.chunk())
            .await
            .expect("in time")
            .unwrap()
            .expect("not ended");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(
        text.contains(
            r#""event":{"ChatEvent":{"Id":1,"Type":"chat_closed"},"Extra":"\ud800","Big":1e400}"#
        ),
        "the raw body as received: {text}"
    );
    assert!(
        text.contains(
            r#""event":{"ChatEvent":{"Id":9007199254740993,"Type":"chat_opened","ChatId":13}}"#
        ),
        "the typed envelope's JSON mapping, wire names, exact ids: {text}"
    );
    assert!(!text.contains(r#""event":null"#), "{text}");
}

/// `since=` takes the times gRPC's `since_time` takes (issue 19, point 8: SSE refused any time
/// before 1970 while gRPC took year 1): from 0001-01-01 to 9999-12-31, before 1970 too; before
/// year 1 is refused by both.
#[tokio::test]
async fn sse_since_takes_the_range_grpc_takes() {
    let server = TestServer::start().await;
    server
        .store(event_json(1, "chat_closed", 13, "user", 1))
        .await;
    let http = reqwest::Client::new();
    for since in [
        "0001-01-01T00:00:00Z",
        "1969-07-20T20:17:40.5Z",
        "1970-01-01T00:00:00Z",
        "2000-01-01 00:00:00Z",
    ] {
        let mut stream = http
            .get(server.url(&format!("/v1/events:stream?since={since}")))
            .send()
            .await
            .unwrap();
        assert_eq!(stream.status(), 200, "{since}");
        let events = read_events(&mut stream, 1).await;
        assert_eq!(events[0].0, 1, "{since}: every event is after it");
    }
    let refused = http
        .get(server.url("/v1/events:stream?since=0000-12-31T00:00:00Z"))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let text = refused.text().await.unwrap();
    assert!(text.contains("since"), "{text}");
    // gRPC answers the same times the same way.
    let mut grpc = server.grpc().await;
    let before_year_1 = grpc
        .subscribe(iqchannels_gateway::pb::client::SubscribeRequest {
            start: Some(
                iqchannels_gateway::pb::client::subscribe_request::Start::SinceTime(
                    prost_types::Timestamp {
                        seconds: -62_135_596_801,
                        nanos: 0,
                    },
                ),
            ),
            ..Default::default()
        })
        .await;
    assert_eq!(
        before_year_1.err().map(|s| s.code()),
        Some(tonic::Code::InvalidArgument)
    );
}
