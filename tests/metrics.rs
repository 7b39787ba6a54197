//! `/metrics` over a real socket reflects what happened, and the subscriber cap holds.

mod common;

use common::{event_json, TestServer};
use iqchannels_gateway::pb::client::SubscribeRequest;
use iqchannels_gateway::server::ServerConfig;

async fn scrape(server: &TestServer) -> String {
    let response = reqwest::get(server.url("/metrics")).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    response.text().await.unwrap()
}

fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
}

#[tokio::test]
async fn metrics_count_ingest_results_duplicates_and_subscribers() {
    let server = TestServer::with_config(ServerConfig {
        max_subscribers: 2,
        ..ServerConfig::default()
    })
    .await;
    server
        .store(event_json(1, "chat_closed", 1, "user", 1))
        .await;
    let (status, answer) = server
        .post_event(event_json(1, "chat_closed", 1, "user", 1))
        .await;
    assert_eq!((status, answer["duplicate"].as_bool()), (200, Some(true)));
    server
        .store(event_json(2, "message_created", 1, "client", 1))
        .await;
    let (status, _) = server.post_event("{").await;
    assert_eq!(status, 400);

    let mut client = server.grpc().await;
    let _first = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let _second = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let third = client
        .subscribe(SubscribeRequest::default())
        .await
        .unwrap_err();
    assert_eq!(
        third.code(),
        tonic::Code::ResourceExhausted,
        "the subscriber cap holds"
    );

    let text = scrape(&server).await;
    assert_eq!(
        value(
            &text,
            "iqgw_ingest_requests_total{route=\"events\",result=\"ok\"}"
        ),
        3.0
    );
    assert_eq!(
        value(
            &text,
            "iqgw_ingest_requests_total{route=\"events\",result=\"invalid\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "iqgw_ingest_duration_seconds_count{route=\"events\"}"
        ),
        4.0
    );
    assert_eq!(value(&text, "iqgw_events_stored_total"), 2.0);
    assert_eq!(value(&text, "iqgw_duplicates_total"), 1.0);
    assert_eq!(value(&text, "iqgw_subscribers"), 2.0);
    assert_eq!(value(&text, "iqgw_subscriber_lag_max_events"), 0.0);
    assert!(!text.contains("chat_closed"), "no event content in metrics");
}

/// gRPC `Publish` is counted like HTTP ingest, under `route="publish"` (issue 19, point 8: it
/// made no series), and an HTTP upload whose client went away part way is `abandoned`, not an
/// invalid event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_is_counted_and_an_abandoned_upload_is_not_invalid() {
    use iqchannels_gateway::pb::client::{publish_request, PublishRequest};
    use std::io::Write;
    let server = TestServer::start().await;
    let mut grpc = server.grpc().await;
    let publish = |body: &str| PublishRequest {
        event: Some(publish_request::Event::RawJson(body.as_bytes().to_vec())),
        ..Default::default()
    };
    grpc.publish(publish(&event_json(5, "chat_closed", 1, "user", 1)))
        .await
        .expect("stored");
    for _ in 0..2 {
        let refused = grpc
            .publish(publish(r#"{"ChatEvent":{"Type":"chat_closed"}}"#))
            .await;
        assert_eq!(
            refused.err().map(|s| s.code()),
            Some(tonic::Code::InvalidArgument)
        );
    }
    // An upload that promises 1,000 bytes, sends 20 and goes away.
    let mut socket = std::net::TcpStream::connect(server.addr).expect("connects");
    write!(
        socket,
        "POST /v1/events HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n\
         Content-Length: 1000\r\n\r\n{{\"ChatEvent\":{{\"Id\""
    )
    .expect("sent");
    drop(socket);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let text = loop {
        let text = scrape(&server).await;
        if text.contains("result=\"abandoned\"") || std::time::Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(
        value(
            &text,
            "iqgw_ingest_requests_total{route=\"publish\",result=\"ok\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &text,
            "iqgw_ingest_requests_total{route=\"publish\",result=\"invalid\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &text,
            "iqgw_ingest_requests_total{route=\"events\",result=\"abandoned\"}"
        ),
        1.0
    );
    assert!(
        !text.contains("route=\"events\",result=\"invalid\""),
        "the abandoned upload is no invalid event:\n{text}"
    );
    assert!(
        text.lines().any(
            |line| line.starts_with("iqgw_ingest_duration_seconds_count{")
                && line.contains("route=\"publish\"")
        ),
        "the duration histogram has publish:\n{text}"
    );
}
