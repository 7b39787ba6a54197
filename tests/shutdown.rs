//! SIGTERM on the real binary during ingest: in-flight requests finish, every acknowledged event
//! is durable, subscriber streams end with UNAVAILABLE (so clients reconnect), the process exits.

mod binary;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::{subscribe_request::Start, GetEventRequest, SubscribeRequest};
use tokio_stream::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_ingest_and_ends_streams_with_unavailable() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::embedded(dir.path(), &["--shutdown-grace-secs", "5"]);
    let mut client = process.grpc().await;
    let request = SubscribeRequest {
        start: Some(Start::Beginning(())),
        ..SubscribeRequest::default()
    };
    let mut stream = client.subscribe(request).await.unwrap().into_inner();
    let ended = tokio::spawn(async move {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status.code()),
                None => return None,
            }
        }
    });

    let acked: Arc<Mutex<HashMap<i64, u64>>> = Arc::default();
    let writers = binary::spawn_writers(process.url("/v1/events"), 8, 0, 1_000_000, acked.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    process.terminate();
    let status = tokio::time::timeout(Duration::from_secs(10), ended)
        .await
        .expect("the stream ends")
        .unwrap();
    assert_eq!(
        status,
        Some(tonic::Code::Unavailable),
        "streams end with UNAVAILABLE, never OK"
    );
    for writer in writers {
        writer.await.unwrap();
    }
    let exit = process
        .wait_exit(Duration::from_secs(10))
        .expect("the process exits within the grace period");
    assert!(exit.success(), "clean exit after draining: {exit:?}");

    let acked = acked.lock().unwrap().clone();
    assert!(!acked.is_empty());
    let restarted = Process::embedded(dir.path(), &[]);
    let mut client = restarted.grpc().await;
    for (id, sequence) in acked {
        let request = GetEventRequest {
            key: Some(iqchannels_gateway::pb::client::get_event_request::Key::EventId(id)),
            include_raw_json: false,
            include_references: false,
        };
        let found = client
            .get_event(request)
            .await
            .expect("acknowledged event survived")
            .into_inner();
        assert_eq!(found.sequence, sequence);
    }
}

/// The grace period of the gateways whose streams must end well before it.
const LONG_GRACE: Duration = Duration::from_secs(20);

/// A gateway with [`LONG_GRACE`] and a gRPC channel to it.
async fn with_long_grace() -> (tempfile::TempDir, Process, tonic::transport::Channel) {
    let dir = tempfile::tempdir().unwrap();
    let process = Process::embedded(
        dir.path(),
        &["--shutdown-grace-secs", &LONG_GRACE.as_secs().to_string()],
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", process.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    (dir, process, channel)
}

/// The process exits cleanly within 5 s of `signalled`, with `open` still open.
fn exits_soon(process: &mut Process, signalled: std::time::Instant, open: &str) {
    let exit = process
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the process exits with {open} open"));
    assert!(exit.success(), "{exit:?}");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "SIGTERM to exit took {took:?}, grace period {LONG_GRACE:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_health_watch_reports_not_serving_ends_and_does_not_hold_the_shutdown() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

    let (_dir, mut process, channel) = with_long_grace().await;
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("Watch is served")
        .into_inner();
    let first = watch.next().await.expect("a first status").unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);

    let signalled = std::time::Instant::now();
    process.terminate();
    let mut seen = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match watch.next().await {
                Some(Ok(response)) => seen.push(response.status),
                Some(Err(status)) => return Some(status.code()),
                None => return None,
            }
        }
    })
    .await
    .expect("the watch ends well before the grace period");
    assert_eq!(
        seen.last(),
        Some(&(ServingStatus::NotServing as i32)),
        "NOT_SERVING is reported before the watch ends: {seen:?}, then {end:?}"
    );
    assert_eq!(end, Some(tonic::Code::Unavailable), "never OK");
    exits_soon(&mut process, signalled, "the watch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_while_draining_is_refused_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::embedded(dir.path(), &["--shutdown-grace-secs", "10"]);
    // A request whose body is still coming keeps the drain going.
    let mut slow = tokio::net::TcpStream::connect(process.addr).await.unwrap();
    slow.write_all(
        b"POST /v1/events HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
          content-length: 1000\r\n\r\n{\"ChatEvent\":",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    process.terminate();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        process.wait_exit(Duration::ZERO).is_none(),
        "still draining the slow request"
    );

    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(3), async {
        let mut fresh = match tokio::net::TcpStream::connect(process.addr).await {
            Ok(fresh) => fresh,
            Err(error) => return Err(error.kind()),
        };
        // Accepted after all: it must at least be closed at once, not left waiting.
        let _ = fresh
            .write_all(b"GET /healthz HTTP/1.1\r\nhost: gateway\r\n\r\n")
            .await;
        let mut answer = Vec::new();
        match fresh.read_to_end(&mut answer).await {
            Ok(_) if answer.is_empty() => Err(std::io::ErrorKind::UnexpectedEof),
            Ok(_) => Ok(String::from_utf8_lossy(&answer).into_owned()),
            Err(error) => Err(error.kind()),
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "a new connection during draining hung for {:?}",
            started.elapsed()
        )
    });
    assert!(
        outcome.is_err(),
        "a new connection during draining is refused, not served: {outcome:?}"
    );
    drop(slow);
}

/// A reflection stream a client keeps open (it may ask more later) ends with UNAVAILABLE when the
/// gateway drains, instead of holding the shutdown for the whole grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_reflection_stream_ends_with_unavailable_and_does_not_hold_the_shutdown() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let (_dir, mut process, channel) = with_long_grace().await;
    let mut reflection = ServerReflectionClient::new(channel);
    // The sending half stays open for as long as `requests` lives.
    let (requests, outgoing) = tokio::sync::mpsc::channel(1);
    requests
        .send(ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        })
        .await
        .unwrap();
    let mut responses = reflection
        .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(outgoing))
        .await
        .expect("reflection is served")
        .into_inner();
    let listed = responses.next().await.expect("an answer").unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response else {
        panic!("a service list: {listed:?}");
    };
    assert!(list
        .service
        .iter()
        .any(|s| s.name == "iqchannels.gateway.v1.EventGateway"));

    let signalled = std::time::Instant::now();
    process.terminate();
    let end = tokio::time::timeout(Duration::from_secs(10), responses.next())
        .await
        .expect("the stream ends well before the grace period");
    let status = match end {
        Some(Err(status)) => status,
        other => panic!("expected UNAVAILABLE, got {other:?}"),
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    exits_soon(&mut process, signalled, "the reflection stream");
    drop(requests);
}

/// A gRPC Publish whose message is still arriving when draining starts is not cut: it finishes
/// within the grace period, is answered OK and stored (only calls already answered, and waiting
/// on a stream, are ended at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_still_arriving_when_draining_starts_finishes_and_is_stored() {
    use iqchannels_gateway::pb::client::{publish_request, PublishRequest};
    use prost::Message;

    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::embedded(dir.path(), &["--shutdown-grace-secs", "10"]);
    let tcp = tokio::net::TcpStream::connect(process.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!(
        "http://{}/iqchannels.gateway.v1.EventGateway/Publish",
        process.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    let message = PublishRequest {
        event: Some(publish_request::Event::RawJson(binary::event(7))),
        ..Default::default()
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    let rest = framed.split_off(framed.len() / 2);
    send.send_data(framed.into(), false).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    process.terminate();
    tokio::time::sleep(Duration::from_millis(700)).await;
    send.send_data(rest.into(), true).unwrap();

    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("answered")
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut answer = Vec::new();
    while let Some(chunk) = body.data().await {
        answer.extend_from_slice(&chunk.unwrap());
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..]),
        "{trailers:?}"
    );
    let answer = iqchannels_gateway::pb::client::PublishResponse::decode(&answer[5..])
        .expect("a PublishResponse");
    assert_eq!(answer.sequence, 1);
    let exit = process
        .wait_exit(Duration::from_secs(10))
        .expect("the process exits once the call is done");
    assert!(exit.success(), "{exit:?}");

    let restarted = Process::embedded(dir.path(), &[]);
    let mut client = restarted.grpc().await;
    let stored = client
        .get_event(GetEventRequest {
            key: Some(iqchannels_gateway::pb::client::get_event_request::Key::EventId(7)),
            include_raw_json: false,
            include_references: false,
        })
        .await
        .expect("the event is stored")
        .into_inner();
    assert_eq!(stored.sequence, 1);
}
