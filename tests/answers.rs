//! Answers that say what is wrong (issue 12), over real sockets: an id of `-0`, a byte-order
//! mark, compressed bodies and other charsets, gRPC status codes for bodies it cannot read,
//! invalid timestamps, conflicting SSE start parameters, and query tokens that need decoding.

mod common;

use std::time::Duration;

use common::*;
use http_body_util::BodyExt;
use iqchannels_gateway::auth::{GrpcAuth, IngestAuth};
use iqchannels_gateway::pb::client::{
    publish_request, subscribe_request::Start, Filter, PublishRequest,
};
use iqchannels_gateway::server::ServerConfig;
use tonic::Code;

#[tokio::test]
async fn an_id_of_minus_zero_is_refused_as_not_a_positive_integer() {
    let server = TestServer::start().await;
    for id in ["-0", "-0.0", "\"-0\"", "0"] {
        let body = format!("{{\"ChatEvent\": {{\"Id\": {id}, \"Type\": \"chat_closed\"}}}}");
        let (status, json) = server.post_event(body).await;
        assert_eq!(status, 400, "Id {id}: {json}");
        assert_eq!(json["path"], "ChatEvent.Id", "Id {id}: {json}");
        let error = json["error"].as_str().expect("an error");
        assert!(error.contains("positive integer"), "Id {id}: {error}");
        assert!(!error.contains("floating"), "Id {id}: {error}");
    }
}

const BOM: &[u8] = b"\xef\xbb\xbf";

#[tokio::test]
async fn a_leading_byte_order_mark_is_skipped_and_not_stored() {
    let server = TestServer::start().await;
    let (status, json) = server.post_event([BOM, CHAT_CLOSED].concat()).await;
    assert_eq!(status, 200, "{json}");
    let mut client = server.grpc().await;
    let stored = get_by_sequence(&mut client, 1, true).await.expect("stored");
    assert_eq!(stored.raw_json, CHAT_CLOSED, "stored without the mark");

    let ndjson = [BOM, event_json(2, "typing", 1, "user", 1).as_bytes()].concat();
    let (status, json) = server
        .post("/v1/events:batch", Some("application/x-ndjson"), ndjson)
        .await;
    assert_eq!((status, &json["stored"]), (200, &1.into()), "{json}");
    let array = [
        BOM,
        format!("[{}]", event_json(3, "typing", 1, "user", 1)).as_bytes(),
    ]
    .concat();
    let (status, json) = server
        .post("/v1/events:batch", Some("application/json"), array)
        .await;
    assert_eq!((status, &json["stored"]), (200, &1.into()), "{json}");

    // Only one mark, and only at the start.
    let (status, _) = server.post_event([BOM, BOM, CHAT_CLOSED].concat()).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_compressed_body_is_refused_with_415() {
    let server = TestServer::start().await;
    let http = reqwest::Client::new();
    for (path, encoding) in [
        ("/v1/events", "gzip"),
        ("/v1/events", "deflate"),
        ("/v1/events:batch", "gzip"),
        ("/v1/events", "br"),
    ] {
        let response = http
            .post(server.url(path))
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(b"\x1f\x8b\x08\x00\x00\x00\x00\x00".to_vec())
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 415, "{path} {encoding}");
        assert_eq!(
            response.headers()["accept-encoding"],
            "identity",
            "says what it takes"
        );
        let (_, json) = answer(response).await;
        assert!(
            json["error"]
                .as_str()
                .is_some_and(|e| e.contains("content encoding")),
            "{json}"
        );
    }
    let identity = http
        .post(server.url("/v1/events"))
        .header("content-type", "application/json")
        .header("content-encoding", "identity")
        .body(CHAT_CLOSED)
        .send()
        .await
        .expect("request");
    assert_eq!(identity.status(), 200);
}

#[tokio::test]
async fn a_charset_other_than_utf8_is_refused_with_415() {
    let server = TestServer::start().await;
    for (content_type, want) in [
        ("application/json; charset=latin1", 415),
        ("application/json; charset=iso-8859-1", 415),
        ("application/json;charset=utf-16", 415),
        ("application/json; charset=UTF-8", 200),
        ("application/json; charset=\"utf-8\"", 200),
        ("application/json;charset=utf-8", 200),
    ] {
        let id = if want == 200 { 1 } else { 2 };
        let (status, json) = server
            .post(
                "/v1/events",
                Some(content_type),
                event_json(id, "typing", 1, "user", 1),
            )
            .await;
        assert_eq!(status, want, "{content_type}: {json}");
        if want == 415 {
            assert!(
                json["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("charset")),
                "{json}"
            );
        }
    }
    let (status, _) = server
        .post(
            "/v1/events:batch",
            Some("application/x-ndjson; charset=windows-1251"),
            event_json(3, "typing", 1, "user", 1),
        )
        .await;
    assert_eq!(status, 415);
}

/// Sends `message` (already protobuf bytes) as a gRPC request to `method` over a new HTTP/2
/// connection; returns the grpc-status and grpc-message, from the headers or the trailers.
async fn raw_grpc(server: &TestServer, method: &str, message: &[u8]) -> (i32, String) {
    let stream = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .expect("HTTP/2 handshake");
    tokio::spawn(connection);
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    let request = http::Request::post(format!("http://{}{method}", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let field = |name: &str| {
        headers
            .get(name)
            .or_else(|| trailers.get(name))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    (
        field("grpc-status").parse().expect("a grpc-status"),
        field("grpc-message"),
    )
}

#[tokio::test]
async fn grpc_says_resource_exhausted_for_an_oversize_message_and_invalid_argument_for_garbage() {
    let server = TestServer::with_config(ServerConfig {
        max_body_bytes: 64 * 1024,
        ..ServerConfig::default()
    })
    .await;
    let mut client = server.grpc().await;
    let oversize = client
        .publish(PublishRequest {
            event: Some(publish_request::Event::RawJson(vec![b' '; 100 * 1024])),
            ..Default::default()
        })
        .await
        .expect_err("too large");
    assert_eq!(oversize.code(), Code::ResourceExhausted, "{oversize:?}");

    let publish = "/iqchannels.gateway.v1.EventGateway/Publish";
    let (code, message) = raw_grpc(&server, publish, b"\xff\xff\xff\xff").await;
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    let subscribe = "/iqchannels.gateway.v1.EventGateway/Subscribe";
    let (code, message) = raw_grpc(&server, subscribe, b"\x0a\x05\x0a").await;
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");

    // An empty message decodes (every field is optional): the handler says what is missing.
    let (code, message) = raw_grpc(&server, publish, b"").await;
    assert_eq!(code, Code::InvalidArgument as i32, "{message}");
    assert!(message.contains("envelope"), "{message}");
}

#[tokio::test]
async fn retention_still_answers_out_of_range() {
    let log = std::sync::Arc::new(iqchannels_gateway::log::memory::MemoryLog::new(Some(2)));
    let server = TestServer::with_log(log, ServerConfig::default()).await;
    for id in 1..=5 {
        server.store(event_json(id, "typing", 1, "user", 1)).await;
    }
    let mut client = server.grpc().await;
    let request = subscription(Filter::default(), Some(Start::AfterSequence(1)));
    let refused = match client.subscribe(request).await {
        Err(status) => status,
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .expect_err("events removed by retention"),
    };
    assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
}

#[tokio::test]
async fn subscribe_since_an_invalid_timestamp_is_invalid_argument() {
    let server = TestServer::start().await;
    let mut client = server.grpc().await;
    for (seconds, nanos) in [
        (0, -1),
        (0, 2_000_000_000),
        (1_700_000_000, 1_000_000_000),
        (253_402_300_800, 0),
    ] {
        let request = subscription(
            Filter::default(),
            Some(Start::SinceTime(prost_types::Timestamp { seconds, nanos })),
        );
        let refused = client
            .subscribe(request)
            .await
            .expect_err("an invalid timestamp");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{seconds}s {nanos}ns: {refused:?}"
        );
    }
    let valid = subscription(
        Filter::default(),
        Some(Start::SinceTime(prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos: 999_999_999,
        })),
    );
    assert!(client.subscribe(valid).await.is_ok());
}

/// Opens an SSE stream with `query` (and `Last-Event-ID` when given); the status and, for an
/// error, its JSON.
async fn sse(server: &TestServer, query: &str, last_event_id: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(server.url(&format!("/v1/events:stream{query}")));
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let response = request.send().await.expect("response");
    let status = response.status().as_u16();
    if status == 200 {
        return (status, String::new());
    }
    let text = tokio::time::timeout(Duration::from_secs(5), response.text())
        .await
        .expect("an answer in time")
        .expect("body");
    (status, text)
}

#[tokio::test]
async fn sse_refuses_conflicting_or_malformed_start_parameters() {
    let server = TestServer::start().await;
    server.store(CHAT_CLOSED).await;
    for query in [
        "?from=beginning&after=3",
        "?tail=2&from=beginning",
        "?after=1&since=2026-01-01T00:00:00Z",
        "?after=1&after=2",
    ] {
        let (status, text) = sse(&server, query, None).await;
        assert_eq!(status, 400, "{query}: {text}");
        assert!(text.contains("one of"), "{query}: {text}");
    }
    let (status, text) = sse(&server, "", Some("abc")).await;
    assert_eq!(status, 400, "Last-Event-ID abc: {text}");
    assert!(text.contains("Last-Event-ID"), "{text}");
    // The browser's reconnection: Last-Event-ID with the URL's own start position resumes.
    let (status, _) = sse(&server, "?from=beginning", Some("1")).await;
    assert_eq!(status, 200);

    let (status, text) = sse(&server, "?from=now", None).await;
    assert_eq!(status, 400);
    assert!(
        text.contains("from") && text.contains("beginning") && !text.contains("unknown parameter"),
        "says the value is wrong: {text}"
    );
    let long = "x".repeat(8192);
    let (status, text) = sse(&server, &format!("?{long}=1"), None).await;
    assert_eq!(status, 400);
    assert!(text.contains("unknown parameter"), "{text}");
    assert!(
        text.len() < 300,
        "echoes at most a little: {} bytes",
        text.len()
    );
    let (status, text) = sse(&server, &format!("?chat={long}"), None).await;
    assert_eq!(status, 400);
    assert!(text.len() < 300, "{} bytes", text.len());
}

#[tokio::test]
async fn the_query_token_is_percent_decoded_for_ingest_and_sse_alike() {
    let token = "p@ss+w/rd=&x";
    let encoded = "p%40ss%2Bw%2Frd%3D%26x";
    let server = TestServer::with_config(ServerConfig {
        ingest_auth: IngestAuth::new(Some(token.into()), &[], Duration::from_secs(300))
            .expect("auth"),
        grpc_auth: GrpcAuth::new(&[format!("subscribe:{token}")]).expect("tokens"),
        ..ServerConfig::default()
    })
    .await;
    let (status, json) = server
        .post(
            &format!("/v1/events?token={encoded}"),
            Some("application/json"),
            CHAT_CLOSED,
        )
        .await;
    assert_eq!(status, 200, "ingest: {json}");
    let (status, _) = sse(&server, &format!("?from=beginning&token={encoded}"), None).await;
    assert_eq!(status, 200, "SSE");
    // Undecoded, it is another token.
    let (status, _) = server
        .post(
            &format!("/v1/events?token={token}"),
            Some("application/json"),
            CHAT_CLOSED,
        )
        .await;
    assert_eq!(status, 401);
}
