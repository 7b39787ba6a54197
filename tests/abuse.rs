//! Hostile clients at the connection and request level (issue 12), over real sockets: slow
//! unauthenticated uploads, connections that never speak, more connections than the cap, batch
//! answers that would amplify what was sent.

mod common;

use std::time::{Duration, Instant};

use common::{event_json, TestServer};
use iqchannels_gateway::auth::{GrpcAuth, IngestAuth};
use iqchannels_gateway::pb::client::{publish_request, PublishRequest};
use iqchannels_gateway::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Opens a connection and sends the head of a POST to `/v1/events` announcing a 100-byte body,
/// plus `body_start` of it; the rest never comes.
async fn slow_upload(server: &TestServer, extra_headers: &str, body_start: &str) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
         content-length: 100\r\n{extra_headers}\r\n{body_start}"
    );
    stream.write_all(head.as_bytes()).await.expect("send head");
    stream
}

/// The status line the server sent on `stream`, within `wait`.
async fn status_line(stream: &mut TcpStream, wait: Duration) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    let read = async {
        while !answer.windows(2).any(|w| w == b"\r\n") {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or("").to_owned()
}

fn token_auth() -> IngestAuth {
    IngestAuth::new(Some("t0ken".into()), &[], Duration::from_secs(300)).expect("auth")
}

#[tokio::test]
async fn slow_unauthenticated_uploads_do_not_starve_an_authenticated_sender() {
    let server = TestServer::with_config(ServerConfig {
        ingest_auth: token_auth(),
        max_in_flight: 4,
        ..ServerConfig::default()
    })
    .await;
    // Many more slow unauthenticated uploads than there are ingest slots.
    let mut slow = Vec::new();
    for _ in 0..32 {
        slow.push(slow_upload(&server, "", "{").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let response = reqwest::Client::new()
        .post(server.url("/v1/events"))
        .header("content-type", "application/json")
        .bearer_auth("t0ken")
        .body(event_json(1, "chat_closed", 1, "user", 1))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), 200, "an authenticated sender is served");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "and quickly: {:?}",
        started.elapsed()
    );
    for stream in &mut slow {
        assert!(
            status_line(stream, Duration::from_secs(2))
                .await
                .starts_with("HTTP/1.1 401"),
            "each slow unauthenticated upload is refused without waiting for its body"
        );
    }
}

#[tokio::test]
async fn an_unauthenticated_upload_gets_401_before_sending_its_body() {
    let server = TestServer::with_config(ServerConfig {
        ingest_auth: token_auth(),
        ..ServerConfig::default()
    })
    .await;
    for (headers, what) in [
        ("", "no token"),
        ("authorization: Bearer nope\r\n", "a wrong token"),
    ] {
        let mut stream = slow_upload(&server, headers, "").await;
        let started = Instant::now();
        let status = status_line(&mut stream, Duration::from_secs(3)).await;
        assert!(status.starts_with("HTTP/1.1 401"), "{what}: {status:?}");
        assert!(started.elapsed() < Duration::from_secs(2), "{what}");
    }
    // The query parameter is checked before the body too.
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(
            b"POST /v1/events?token=nope HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
              content-length: 100\r\n\r\n",
        )
        .await
        .expect("send head");
    let status = status_line(&mut stream, Duration::from_secs(3)).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");
}

#[tokio::test]
async fn uploads_awaiting_a_signature_check_do_not_take_the_slots_of_authenticated_publishers() {
    let secret = format!(
        "whsec_{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            b"0123456789abcdef0123456789abcdef"
        )
    );
    let server = TestServer::with_config(ServerConfig {
        ingest_auth: IngestAuth::new(None, &[secret], Duration::from_secs(300)).expect("auth"),
        grpc_auth: GrpcAuth::new(&["publish:writer".into()]).expect("tokens"),
        max_in_flight: 2,
        ..ServerConfig::default()
    })
    .await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    // Well-formed signature headers: only the body can tell the signature is wrong.
    let signed = format!(
        "webhook-id: msg_1\r\nwebhook-timestamp: {now}\r\n\
         webhook-signature: v1,c2lnbmF0dXJlLW9mLTMyLWJ5dGVzLi4uLi4uLi4uLi4=\r\n"
    );
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(slow_upload(&server, &signed, "{").await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A token-authenticated gRPC Publish still gets a slot.
    let mut client = server.grpc().await;
    let mut request = tonic::Request::new(PublishRequest {
        event: Some(publish_request::Event::RawJson(
            event_json(1, "chat_closed", 1, "user", 1).into_bytes(),
        )),
        ..Default::default()
    });
    request
        .metadata_mut()
        .insert("authorization", "Bearer writer".parse().expect("metadata"));
    let published = tokio::time::timeout(Duration::from_secs(2), client.publish(request))
        .await
        .expect("Publish answers in time");
    assert_eq!(
        published
            .expect("Publish is not shed")
            .into_inner()
            .sequence,
        1
    );

    // An upload without signature headers is refused before its body.
    let mut unsigned = slow_upload(&server, "", "").await;
    let status = status_line(&mut unsigned, Duration::from_secs(3)).await;
    assert!(status.starts_with("HTTP/1.1 401"), "{status:?}");
    // The budget of uploads awaiting their signature check is bounded on its own.
    let mut third = slow_upload(&server, &signed, "").await;
    let status = status_line(&mut third, Duration::from_secs(3)).await;
    assert!(status.starts_with("HTTP/1.1 429"), "{status:?}");
}

/// Reads until the server closes `stream`; `None` if it is still open after `wait`.
async fn closed_within(stream: &mut TcpStream, wait: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut sink = Vec::new();
    match tokio::time::timeout(wait, stream.read_to_end(&mut sink)).await {
        Ok(_) => Some(started.elapsed()),
        Err(_) => None,
    }
}

fn short_timeouts() -> ServerConfig {
    ServerConfig {
        request_timeout: Duration::from_millis(500),
        ..ServerConfig::default()
    }
}

#[tokio::test]
async fn a_connection_that_never_sends_anything_is_closed_after_the_header_timeout() {
    let server = TestServer::with_config(short_timeouts()).await;
    let mut silent = TcpStream::connect(server.addr).await.expect("connect");
    let closed = closed_within(&mut silent, Duration::from_secs(5)).await;
    let after = closed.expect("the server closes a connection that never speaks");
    assert!(
        after >= Duration::from_millis(400),
        "not before the bound: {after:?}"
    );
}

#[tokio::test]
async fn a_connection_that_sends_only_part_of_the_http2_preface_is_closed() {
    let server = TestServer::with_config(short_timeouts()).await;
    let mut partial = TcpStream::connect(server.addr).await.expect("connect");
    partial
        .write_all(b"PRI * HTTP/2.0\r\n")
        .await
        .expect("send");
    assert!(
        closed_within(&mut partial, Duration::from_secs(5))
            .await
            .is_some(),
        "the server closes a connection stuck in the HTTP/2 preface"
    );
}

#[tokio::test]
async fn a_grpc_connection_idle_after_its_preface_is_kept() {
    let server = TestServer::with_config(short_timeouts()).await;
    let mut client = server.grpc().await;
    // Longer than the bound on the first bytes: the preface was complete, the connection stays.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    assert!(health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_ok());
    let missing = common::get_by_sequence(&mut client, 1, false).await;
    assert_eq!(
        missing.expect_err("nothing stored").code(),
        tonic::Code::NotFound,
        "the first channel still works"
    );
}

/// Sends `GET /healthz` on a kept-alive connection; returns the status line.
async fn health_on(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .expect("send");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    // The answer is small: headers and `{"status":"ok"}`.
    while !answer.ends_with(b"}") {
        let n = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut buffer))
            .await
            .expect("an answer in time")
            .expect("read");
        if n == 0 {
            break;
        }
        answer.extend_from_slice(&buffer[..n]);
    }
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or("").to_owned()
}

#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once_while_the_first_ones_work() {
    let server = TestServer::with_config(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    })
    .await;
    let mut first = TcpStream::connect(server.addr).await.expect("connect");
    let mut second = TcpStream::connect(server.addr).await.expect("connect");
    assert!(health_on(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(health_on(&mut second).await.starts_with("HTTP/1.1 200"));

    let mut third = TcpStream::connect(server.addr)
        .await
        .expect("the kernel accepts");
    assert!(
        closed_within(&mut third, Duration::from_secs(2))
            .await
            .is_some(),
        "the connection over the cap is closed at once"
    );
    assert!(health_on(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(health_on(&mut second).await.starts_with("HTTP/1.1 200"));

    // A slot frees when a connection ends.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut next = TcpStream::connect(server.addr).await.expect("connect");
        let _ = next
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await;
        if status_line(&mut next, Duration::from_secs(1))
            .await
            .starts_with("HTTP/1.1 200")
        {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot is reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// POSTs a batch; returns the status, the answer's size and the answer.
async fn post_batch(
    server: &TestServer,
    content_type: &str,
    body: Vec<u8>,
) -> (u16, usize, serde_json::Value) {
    let response = reqwest::Client::new()
        .post(server.url("/v1/events:batch"))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let bytes = response.bytes().await.expect("answer");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, bytes.len(), json)
}

/// Rejected items answered in full before the rest are only counted.
const DETAILED: usize = 100;

#[tokio::test]
async fn a_batch_of_a_million_broken_items_gets_an_answer_of_bounded_size() {
    let server = TestServer::start().await;
    let limit = ServerConfig::default().max_body_bytes;
    // As many items as fit the body limit: 2 bytes each.
    let cases = [
        ("application/x-ndjson", b"{\n".repeat(limit / 2)),
        ("application/json", {
            let mut body = b"[".to_vec();
            body.extend(b"1,".repeat((limit - 1) / 2 - 1));
            body.extend_from_slice(b"1]");
            body
        }),
    ];
    for (content_type, body) in cases {
        let items = body.len() / 2;
        let sent = body.len();
        let (status, size, json) = post_batch(&server, content_type, body).await;
        assert_eq!(status, 200, "{content_type}");
        assert!(
            size <= 64 * 1024,
            "{content_type}: {size} bytes answered to {sent} sent"
        );
        assert_eq!(json["rejected"], items, "{content_type}");
        assert_eq!(json["omitted_errors"], items - DETAILED, "{content_type}");
        let results = json["results"].as_array().expect("results");
        assert_eq!(results.len(), DETAILED, "the first items one by one");
        assert!(
            results.iter().all(|r| r["error"].is_string()),
            "the first items in error in full"
        );
        // The rest: one run of items with the same error.
        let omitted = json["omitted"].as_array().expect("omitted");
        assert_eq!(omitted.len(), 1, "{content_type}: {omitted:?}");
        assert_eq!(
            (&omitted[0]["from"], &omitted[0]["to"]),
            (&DETAILED.into(), &(items - 1).into())
        );
        assert_eq!(omitted[0]["error"], results[DETAILED - 1]["error"]);
    }
    // Nothing was stored, and the server still serves.
    assert_eq!(server.log.bounds().next, 1);
    server
        .store(event_json(1, "chat_closed", 1, "user", 1))
        .await;
}

/// 1-based line and column of byte `offset` in `text`, in bytes.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, offset - line_start + 1)
}

#[tokio::test]
async fn batch_errors_give_their_line_and_column_in_the_whole_body() {
    let good = |id: i64| event_json(id, "chat_closed", 1, "user", 1);

    // NDJSON: the line is the body's line (blank lines count), the column the line's.
    let server = TestServer::start().await;
    let deep = format!(
        "{{\"ChatEvent\": {{\"Id\": 9, \"Type\": \"x\"}}, \"Deep\": {}{}}}",
        "[".repeat(130),
        "]".repeat(130)
    );
    let ndjson = format!("{}\n\n{{\n{}\n", good(1), deep);
    let (status, _, json) =
        post_batch(&server, "application/x-ndjson", ndjson.clone().into()).await;
    assert_eq!(status, 200, "{json}");
    let truncated = &json["results"][1];
    assert_eq!(
        (truncated["line"].as_u64(), truncated["column"].as_u64()),
        (Some(3), Some(1)),
        "{json}"
    );
    // The 127th `[` of the line is the first one nested deeper than 127 (the object is one).
    let at = ndjson.find(&"[".repeat(130)).expect("the deep part") + 126;
    let (line, column) = position(&ndjson, at);
    assert_eq!(line, 4);
    let too_deep = &json["results"][2];
    assert_eq!(
        (too_deep["line"].as_u64(), too_deep["column"].as_u64()),
        (Some(line as u64), Some(column as u64)),
        "{json}"
    );

    // A JSON array whose bad item starts in the middle of line 3: an error the parser places
    // is placed in the body; one it does not (a field the gateway needs) at the item's start.
    let bad_id = r#"{"ChatEvent": {"Id": "x", "Type": "t"}}"#;
    let array = format!("[\n  {},\n  {}, {bad_id}\n]", good(2), good(3));
    let item_start = array.find(bad_id).expect("the bad item");
    let (line, column) = position(&array, item_start);
    assert_eq!((line, column), (3, 3 + good(3).len() + 2));
    let (status, _, json) = post_batch(&server, "application/json", array.clone().into()).await;
    assert_eq!(status, 200, "{json}");
    let refused = &json["results"][2];
    assert_eq!(refused["path"], "ChatEvent.Id", "{json}");
    assert_eq!(
        (refused["line"].as_u64(), refused["column"].as_u64()),
        (Some(line as u64), Some(column as u64)),
        "{json}"
    );

    let strict = TestServer::with_config(ServerConfig {
        decode_policy: iqchannels_gateway::decode::Policy::Strict,
        ..ServerConfig::default()
    })
    .await;
    let (status, alone) = strict.post_event(bad_id).await;
    assert_eq!(status, 400);
    assert_eq!(alone["line"], 1, "{alone}");
    let within = alone["column"].as_u64().expect("a column") as usize;
    let (status, _, json) = post_batch(&strict, "application/json", array.into()).await;
    assert_eq!(status, 200, "{json}");
    let refused = &json["results"][2];
    assert_eq!(
        (refused["line"].as_u64(), refused["column"].as_u64()),
        (Some(3), Some((column + within - 1) as u64)),
        "{json}"
    );
}
