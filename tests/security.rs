//! Authentication and limits over real sockets: ingest token and Standard Webhooks signatures,
//! gRPC token scopes, load shedding, slow bodies.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use common::{event_json, TestServer};
use hmac::Mac;
use iqchannels_gateway::auth::{GrpcAuth, IngestAuth};
use iqchannels_gateway::pb::client::{publish_request, PublishRequest, SubscribeRequest};
use iqchannels_gateway::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

const SECRET_KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn secret() -> String {
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(SECRET_KEY)
    )
}

fn sign(id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET_KEY).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
    )
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

async fn server_with(ingest: IngestAuth, grpc: GrpcAuth) -> TestServer {
    TestServer::with_config(ServerConfig {
        ingest_auth: ingest,
        grpc_auth: grpc,
        ..ServerConfig::default()
    })
    .await
}

#[tokio::test]
async fn the_ingest_token_is_required_as_bearer_or_query_parameter() {
    let auth = IngestAuth::new(Some("t0ken".into()), &[], Duration::from_secs(300)).unwrap();
    let server = server_with(auth, GrpcAuth::default()).await;
    let http = reqwest::Client::new();
    let post = |url: String, body: String| {
        http.post(url)
            .header("content-type", "application/json")
            .body(body)
    };

    let missing = post(
        server.url("/v1/events"),
        event_json(1, "chat_closed", 1, "user", 1),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(missing.status(), 401);
    assert_eq!(missing.headers()["www-authenticate"], "Bearer");
    let body: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(
        body["error"], "missing or invalid credentials",
        "no hint about which part was wrong"
    );
    let wrong = post(
        server.url("/v1/events"),
        event_json(1, "chat_closed", 1, "user", 1),
    )
    .bearer_auth("nope")
    .send()
    .await
    .unwrap();
    assert_eq!(wrong.status(), 401);

    let bearer = post(
        server.url("/v1/events"),
        event_json(1, "chat_closed", 1, "user", 1),
    )
    .bearer_auth("t0ken")
    .send()
    .await
    .unwrap();
    assert_eq!(bearer.status(), 200);
    let query = post(
        server.url("/v1/events?token=t0ken"),
        event_json(2, "chat_closed", 1, "user", 1),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(query.status(), 200);
    // Batches need it too.
    let batch = http
        .post(server.url("/v1/events:batch"))
        .header("content-type", "application/x-ndjson")
        .body(event_json(3, "chat_closed", 1, "user", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(batch.status(), 401);
    assert_eq!(
        server.log.bounds().next,
        3,
        "only the two authenticated events are stored"
    );
}

#[tokio::test]
async fn standard_webhooks_signatures_are_verified_on_the_raw_body() {
    let auth = IngestAuth::new(
        None,
        &["whsec_b2xkLXJvdGF0ZWQta2V5".into(), secret()],
        Duration::from_secs(300),
    )
    .unwrap();
    let server = server_with(auth, GrpcAuth::default()).await;
    let http = reqwest::Client::new();
    let body = event_json(7, "message_created", 1, "client", 1);
    let send = |id: &str, timestamp: i64, signature: String, body: String| {
        http.post(server.url("/v1/events"))
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(body)
            .send()
    };

    let good = sign("msg_1", now(), &body);
    let accepted = send("msg_1", now(), format!("v1,bm9wZQ== {good}"), body.clone())
        .await
        .unwrap();
    assert_eq!(
        accepted.status(),
        200,
        "one valid signature among several is enough"
    );

    let tampered = body.replace("message_created", "chat_closed");
    assert_eq!(
        send("msg_1", now(), good.clone(), tampered)
            .await
            .unwrap()
            .status(),
        401
    );
    let stale = now() - 600;
    assert_eq!(
        send("msg_1", stale, sign("msg_1", stale, &body), body.clone())
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        send("msg_2", now(), good, body.clone())
            .await
            .unwrap()
            .status(),
        401,
        "the id is signed"
    );
    let unsigned = http
        .post(server.url("/v1/events"))
        .header("content-type", "application/json")
        .body(body)
        .send();
    assert_eq!(unsigned.await.unwrap().status(), 401);
    assert_eq!(server.log.bounds().next, 2);
}

#[tokio::test]
async fn grpc_tokens_are_checked_with_their_scopes() {
    let grpc =
        GrpcAuth::new(&["subscribe:reader".into(), "subscribe,publish:writer".into()]).unwrap();
    let server = server_with(IngestAuth::default(), grpc).await;
    let mut client = server.grpc().await;
    let with_token = |token: &str, mut request: tonic::Request<PublishRequest>| {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    let publish = || {
        tonic::Request::new(PublishRequest {
            event: Some(publish_request::Event::RawJson(
                event_json(1, "chat_closed", 1, "user", 1).into_bytes(),
            )),
            ..Default::default()
        })
    };
    let none = client.publish(publish()).await.unwrap_err();
    assert_eq!(none.code(), Code::Unauthenticated);
    let wrong = client
        .publish(with_token("guess", publish()))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(
        none.message(),
        wrong.message(),
        "no hint about which part was wrong"
    );
    let reader = client
        .publish(with_token("reader", publish()))
        .await
        .unwrap_err();
    assert_eq!(reader.code(), Code::PermissionDenied);
    let writer = client
        .publish(with_token("writer", publish()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(writer.sequence, 1);

    let unauthenticated = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(unauthenticated.code(), Code::Unauthenticated);
    let mut subscribe = tonic::Request::new(SubscribeRequest::default());
    subscribe
        .metadata_mut()
        .insert("authorization", "Bearer reader".parse().unwrap());
    assert!(client.subscribe(subscribe).await.is_ok());

    // Health stays open for load balancers.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let check = tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    };
    assert!(health.check(check).await.is_ok());
}

#[tokio::test]
async fn requests_beyond_the_in_flight_limit_are_shed_with_429_and_retry_after() {
    let server = TestServer::with_config(ServerConfig {
        max_in_flight: 1,
        ..ServerConfig::default()
    })
    .await;
    // One request holds the only slot by sending its body slowly.
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
    slow.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let http = reqwest::Client::new();
    let shed = http
        .post(server.url("/v1/events"))
        .header("content-type", "application/json")
        .body(event_json(1, "chat_closed", 1, "user", 1))
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status(), 429);
    assert_eq!(shed.headers()["retry-after"], "1");
    drop(slow);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, _) = server
        .post_event(event_json(1, "chat_closed", 1, "user", 1))
        .await;
    assert_eq!(
        status, 200,
        "the slot is free again once the slow client is gone"
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_body_gets_408_and_frees_its_slot() {
    let config = ServerConfig {
        request_timeout: Duration::from_millis(300),
        max_in_flight: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::with_config(config).await;
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let head = "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
    slow.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 1024];
    let read = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer[..read]).starts_with("HTTP/1.1 408"));
    let (status, _) = server
        .post_event(event_json(1, "chat_closed", 1, "user", 1))
        .await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    let config = ServerConfig {
        request_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    };
    let server = TestServer::with_config(config).await;
    let mut slow = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    slow.write_all(b"POST /v1/events HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut answer)).await;
    assert!(
        closed.is_ok(),
        "the server closes a connection whose headers never complete"
    );
}
