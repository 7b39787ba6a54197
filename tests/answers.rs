//! Answers that say what is wrong (issue 12), over real sockets: query tokens that need
//! decoding.

mod common;

use std::time::Duration;

use common::*;
use iqchannels_gateway::auth::{GrpcAuth, IngestAuth};
use iqchannels_gateway::server::ServerConfig;

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
