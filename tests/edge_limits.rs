//! What arrives is bounded in bytes before it is checked (issue 18, points 2 and 8), over real
//! sockets: request bodies share one byte budget (`--request-body-memory`), health and
//! reflection have small message limits and a cap on open calls, and no error text repeats a
//! client's input at length.

mod common;

use std::time::{Duration, Instant};

use common::{TestServer, WAIT};
use iqchannels_gateway::pb::client::{publish_request, PublishRequest};
use iqchannels_gateway::server::ServerConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const MIB: usize = 1 << 20;

/// A tiny deterministic generator (xorshift64*), so each run tries the same varied cases.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A metric's value in the `/metrics` text.
async fn metric(server: &TestServer, name: &str) -> f64 {
    let text = reqwest::get(server.url("/metrics"))
        .await
        .expect("metrics answer")
        .text()
        .await
        .expect("metrics text");
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// Waits until the bytes request bodies hold are `expected`.
async fn body_bytes_become(server: &TestServer, expected: usize) {
    let started = Instant::now();
    loop {
        let held = metric(server, "iqgw_request_body_bytes").await as usize;
        if held == expected {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "request bodies hold {held} bytes; expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The head of a POST of `length` bytes to `/v1/events` (chunked when `None`).
fn head(length: Option<usize>) -> String {
    let framing = match length {
        Some(length) => format!("content-length: {length}"),
        None => "transfer-encoding: chunked".to_owned(),
    };
    format!("POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{framing}\r\n\r\n")
}

/// An upload of `length` bytes that sends all but its last byte and stalls.
async fn stalled_upload(server: &TestServer, length: usize) -> TcpStream {
    let mut stream = TcpStream::connect(server.addr).await.expect("connect");
    stream
        .write_all(head(Some(length)).as_bytes())
        .await
        .expect("send head");
    stream
        .write_all(&vec![b' '; length - 1])
        .await
        .expect("send all but the last byte");
    stream
}

/// The answer on `stream` (status line, headers and body) once the server has closed it or
/// sent a whole small answer, within `wait`.
async fn answer_on(stream: &mut TcpStream, wait: Duration) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
            let text = String::from_utf8_lossy(&answer);
            if text.contains("\r\n\r\n") && text.trim_end().ends_with('}') {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(wait, read).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// Asserts that `answer` is the refusal of a body the budget cannot hold.
fn assert_refused_for_memory(answer: &str) {
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after: 1"),
        "{answer:?}"
    );
    assert!(answer.contains("--request-body-memory"), "{answer:?}");
}

/// A valid event of about `bytes` bytes (a long message text in `Rels`).
fn event_of(id: i64, bytes: usize) -> Vec<u8> {
    let mut value: serde_json::Value =
        serde_json::from_str(&common::event_json(id, "message_created", 1, "client", 1))
            .expect("JSON");
    value["Rels"]["ChatMessages"] = serde_json::json!([{
        "Id": 1, "ChatId": 1, "Author": "client", "Payload": "text", "Text": "x".repeat(bytes)
    }]);
    serde_json::to_vec(&value).expect("serializes")
}

const BUDGET: usize = 4 * MIB;

fn budgeted() -> ServerConfig {
    ServerConfig {
        max_body_bytes: MIB,
        request_body_memory: BUDGET,
        ..ServerConfig::default()
    }
}

/// Random sizes, tiny and huge in random orders: every upload that fits beside the stalled
/// ones is held (the gauge is the model's sum), every one that does not is refused at once with
/// 429, and the bytes come back as the stalled uploads go away in random order, after which a
/// large event is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_uploads_never_hold_more_than_the_request_budget() {
    for seed in [1u64, 7, 42, 1234] {
        let server = TestServer::with_config(budgeted()).await;
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        let mut held: Vec<(TcpStream, usize)> = Vec::new();
        let mut model = 0usize;
        let mut refused = 0;
        for _ in 0..14 {
            let length = match rng.below(4) {
                0 => 1 + rng.below(2048) as usize,
                1 => MIB,
                _ => 1 + rng.below(MIB as u64) as usize,
            };
            if model + length <= BUDGET {
                let stream = stalled_upload(&server, length).await;
                model += length;
                held.push((stream, length));
                body_bytes_become(&server, model).await;
            } else {
                // Refused before its body: the head alone gets the answer.
                let mut stream = TcpStream::connect(server.addr).await.expect("connect");
                stream
                    .write_all(head(Some(length)).as_bytes())
                    .await
                    .expect("send head");
                let started = Instant::now();
                let answer = answer_on(&mut stream, WAIT).await;
                assert_refused_for_memory(&answer);
                assert!(
                    started.elapsed() < Duration::from_secs(2),
                    "refused at once"
                );
                refused += 1;
            }
            // Now and then a stalled upload goes away.
            if !held.is_empty() && rng.below(5) == 0 {
                let (stream, length) = held.swap_remove(rng.below(held.len() as u64) as usize);
                drop(stream);
                model -= length;
                body_bytes_become(&server, model).await;
            }
        }
        // A chunked upload grows its reservation as it arrives, and is refused at the chunk
        // that does not fit (the budget first filled to less than half a body's room).
        while BUDGET - model >= MIB / 2 {
            held.push((stalled_upload(&server, MIB / 2).await, MIB / 2));
            model += MIB / 2;
            body_bytes_become(&server, model).await;
        }
        let room = BUDGET - model;
        let mut chunked = TcpStream::connect(server.addr).await.expect("connect");
        chunked
            .write_all(head(None).as_bytes())
            .await
            .expect("send head");
        let first = room.min(1000);
        if first > 0 {
            chunked
                .write_all(format!("{first:x}\r\n{}\r\n", " ".repeat(first)).as_bytes())
                .await
                .expect("first chunk");
            body_bytes_become(&server, model + first).await;
        }
        let over = room - first + 1;
        // Written in the background: the server stops reading at the refusal.
        let body = format!("{over:x}\r\n{}\r\n", " ".repeat(over));
        let (mut reader, mut writer) = chunked.into_split();
        let writing = tokio::spawn(async move {
            let _ = writer.write_all(body.as_bytes()).await;
            writer
        });
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, reader.read_to_end(&mut answer)).await;
        assert_refused_for_memory(&String::from_utf8_lossy(&answer));
        drop(writing);
        body_bytes_become(&server, model).await;

        // Everything released in random order; then a large event is stored.
        while !held.is_empty() {
            let (stream, length) = held.swap_remove(rng.below(held.len() as u64) as usize);
            drop(stream);
            model -= length;
            body_bytes_become(&server, model).await;
        }
        let (status, answer) = server.post_event(event_of(seed as i64, MIB - 2000)).await;
        assert_eq!(status, 200, "{answer}");
        body_bytes_become(&server, 0).await;
        assert!(
            metric(&server, "iqgw_request_bodies_refused_total").await >= f64::from(refused),
            "refusals are counted"
        );
    }
}

/// gRPC Publish shares the budget: refused with RESOURCE_EXHAUSTED naming the flag while
/// stalled HTTP uploads hold it, stored once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_that_does_not_fit_the_budget_is_refused_then_stored_once_there_is_room() {
    let server = TestServer::with_config(budgeted()).await;
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(stalled_upload(&server, MIB - 10).await);
    }
    body_bytes_become(&server, 4 * (MIB - 10)).await;
    let mut client = server.grpc().await;
    let publish = |id| PublishRequest {
        event: Some(publish_request::Event::RawJson(event_of(id, 100 << 10))),
        ..Default::default()
    };
    let refused = client.publish(publish(9)).await.expect_err("no room");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--request-body-memory"),
        "{refused:?}"
    );
    assert!(
        !refused.message().contains("too large"),
        "the CLI would take it for a refusal of the event: {refused:?}"
    );
    drop(stalled.pop());
    let stored = client.publish(publish(9)).await.expect("room now");
    assert_eq!(stored.into_inner().sequence, 1);
    drop(stalled);
    body_bytes_become(&server, 0).await;
}

/// A health check and a reflection request over the small limit are refused at once, naming
/// the limit that applies; around the limit, random sizes are refused exactly when over it, and
/// a reflection NOT_FOUND never repeats the symbol at length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_messages_are_bounded_and_their_errors_small() {
    let limit = 4096;
    let server = TestServer::with_config(ServerConfig {
        max_health_reflection_message_bytes: limit,
        ..ServerConfig::default()
    })
    .await;
    let channel = server.channel().await;
    let mut health = HealthClient::new(channel.clone());
    let refused = health
        .check(HealthCheckRequest {
            service: "x".repeat(MIB),
        })
        .await
        .expect_err("a 1 MiB health check is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("--max-health-reflection-message-bytes")
            && refused.message().contains(&limit.to_string())
            && !refused.message().contains("--max-body-bytes"),
        "{}",
        refused.message()
    );

    let mut reflection = ServerReflectionClient::new(channel.clone());
    let mut rng = Rng(99);
    let mut sizes = vec![MIB, limit - 3, limit - 2, 0, 17];
    sizes.extend((0..12).map(|_| rng.below(2 * limit as u64) as usize));
    for size in sizes {
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("y".repeat(size))),
        };
        let encoded = prost::Message::encoded_len(&request);
        let status = reflect(&mut reflection, request).await;
        if encoded <= limit {
            assert_eq!(status.code(), Code::NotFound, "{size}: {status:?}");
            assert!(status.message().contains("not found"), "{status:?}");
        } else {
            assert_eq!(status.code(), Code::ResourceExhausted, "{size}: {status:?}");
            assert!(
                status
                    .message()
                    .contains("--max-health-reflection-message-bytes"),
                "{status:?}"
            );
        }
        assert!(
            status.message().len() <= iqchannels_gateway::decode::MAX_ERROR_TEXT + 40,
            "{size}: a {} byte message",
            status.message().len()
        );
    }

    // The older reflection service and an unknown health service name, just under the limit.
    let mut alpha =
        tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest as AlphaRequest;
    let request = tonic_reflection::pb::v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(AlphaRequest::FileContainingSymbol("a".repeat(limit - 3))),
    };
    let mut stream = alpha
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect("the stream opens")
        .into_inner();
    let status = loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("no error for an unknown symbol"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(
        status.message().len() <= iqchannels_gateway::decode::MAX_ERROR_TEXT + 40,
        "{status:?}"
    );
    let unknown = health
        .check(HealthCheckRequest {
            service: "z".repeat(limit - 3),
        })
        .await
        .expect_err("an unknown service");
    assert_eq!(unknown.code(), Code::NotFound, "{unknown:?}");
    assert!(unknown.message().len() <= iqchannels_gateway::decode::MAX_ERROR_TEXT);

    // The channel still works.
    let serving = health
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("a small check is answered");
    assert_eq!(serving.into_inner().status, 1);
}

/// The status a one-request reflection stream ends with (an answer instead of an error: OK).
async fn reflect(
    client: &mut ServerReflectionClient<tonic::transport::Channel>,
    request: ServerReflectionRequest,
) -> tonic::Status {
    let stream = match client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return status,
    };
    let mut stream = stream;
    loop {
        match stream.message().await {
            Ok(Some(_)) => continue,
            Ok(None) => return tonic::Status::ok(""),
            Err(status) => return status,
        }
    }
}

/// Health and reflection calls are capped and counted: with the cap's worth of watches open,
/// a check is refused (naming the flag) until one of them ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_calls_beyond_the_cap_are_refused_and_counted() {
    let server = TestServer::with_config(ServerConfig {
        max_health_reflection_calls: 3,
        ..ServerConfig::default()
    })
    .await;
    let mut health = HealthClient::new(server.channel().await);
    let check = HealthCheckRequest {
        service: String::new(),
    };
    let mut watches = Vec::new();
    for _ in 0..3 {
        let mut watch = health
            .watch(check.clone())
            .await
            .expect("a watch opens")
            .into_inner();
        watch
            .message()
            .await
            .expect("a first status")
            .expect("sent");
        watches.push(watch);
    }
    let refused = health.check(check.clone()).await.expect_err("over the cap");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("--max-health-reflection-calls"),
        "{refused:?}"
    );
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let status = reflect(
        &mut reflection,
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
    )
    .await;
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(
        metric(
            &server,
            "iqgw_health_reflection_calls_total{service=\"health\",result=\"refused\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(&server, "iqgw_health_reflection_calls_open").await,
        3.0
    );

    drop(watches.pop());
    let started = Instant::now();
    loop {
        match health.check(check.clone()).await {
            Ok(_) => break,
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted);
                assert!(started.elapsed() < WAIT, "the slot never came back");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert_eq!(
        metric(
            &server,
            "iqgw_health_reflection_calls_total{service=\"health\",result=\"admitted\"}"
        )
        .await,
        4.0
    );
}

mod binary;

/// What README promises an HTTP/1.1 connection may cost beyond the budgets, at most: hyper's
/// read buffer (64 KiB) and the connection's task. (An HTTP/2 connection may also hold its
/// 1 MiB receive window of data not yet read; see README.)
const PER_CONNECTION_KIB: u64 = 64;

/// On the real binary, with only `--webhook-secret` set (bodies wait for their signature) and
/// forged but well-formed `webhook-*` headers: 96 health checks of 4 MiB each, 200 uploads of
/// 1 MiB that stall before their last byte, and 100 gRPC Publish messages of 1 MiB that stall
/// the same way, cost at most the body budget plus a constant per connection. (Before, each
/// check took up to 4 MiB, each upload and message 1 MiB.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_binary_holds_at_most_the_budget_for_stalled_uploads_and_huge_checks() {
    const BUDGET_MIB: usize = 16;
    const UPLOADS: usize = 200;
    const CHECKS: usize = 96;
    const CHANNELS: usize = 8;
    let secret = format!(
        "whsec_{}",
        base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            b"0123456789abcdef0123456789abcdef"
        )
    );
    let budget = (BUDGET_MIB * MIB).to_string();
    let gateway = binary::Process::start(&[
        "--store",
        "memory",
        "--webhook-secret",
        &secret,
        "--max-body-bytes",
        "1048576",
        "--request-body-memory",
        &budget,
    ]);
    let addr = gateway.addr;
    // Warm up: the allocator's arenas and the runtime's threads.
    for _ in 0..4 {
        let _ = reqwest::get(gateway.url("/metrics")).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Health checks of 4 MiB, concurrently on a few connections.
    let peak_before = peak_rss_kib(&gateway);
    let mut channels = Vec::new();
    for _ in 0..CHANNELS {
        channels.push(
            tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .expect("URI")
                .connect()
                .await
                .expect("gRPC connects"),
        );
    }
    let checks: Vec<_> = (0..CHECKS)
        .map(|i| {
            let mut health = HealthClient::new(channels[i % CHANNELS].clone());
            tokio::spawn(async move {
                health
                    .check(HealthCheckRequest {
                        service: "h".repeat(4 * MIB - 64),
                    })
                    .await
            })
        })
        .collect();
    for check in checks {
        let refused = check
            .await
            .expect("no panic")
            .expect_err("a 4 MiB check is refused");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    }
    let peak_grown = peak_rss_kib(&gateway).saturating_sub(peak_before);
    drop(channels);
    // Each connection may hold its 1 MiB HTTP/2 receive window while a check is refused.
    let bound = CHANNELS as u64 * (1024 + H2_PER_CONNECTION_KIB) + 8192;
    eprintln!("{CHECKS} checks of 4 MiB: peak RSS grew by {peak_grown} KiB (bound {bound} KiB)");
    assert!(
        peak_grown <= bound,
        "{CHECKS} checks of 4 MiB took the peak RSS up by {peak_grown} KiB (bound {bound} KiB)"
    );

    // Uploads of 1 MiB that stall before their last byte.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = gateway.rss_kib();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let uploads: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let head = format!(
                "POST /v1/events HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n\
                 content-length: {MIB}\r\nwebhook-id: msg_{i}\r\nwebhook-timestamp: {now}\r\n\
                 webhook-signature: v1,c2lnbmF0dXJlLW9mLTMyLWJ5dGVzLi4uLi4uLi4uLi4=\r\n\r\n"
            );
            tokio::spawn(async move {
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                let _ = stream.write_all(head.as_bytes()).await;
                // Refused uploads are closed by the gateway: the write fails, which is fine.
                let _ = tokio::time::timeout(WAIT, stream.write_all(&vec![b' '; MIB - 1])).await;
                stream
            })
        })
        .collect();
    let mut streams = Vec::new();
    for upload in uploads {
        streams.push(upload.await.expect("no panic"));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = gateway.rss_kib();
    let grown = stalled.saturating_sub(baseline);
    let bound = (BUDGET_MIB as u64) * 1024 + UPLOADS as u64 * PER_CONNECTION_KIB;
    eprintln!(
        "{UPLOADS} stalled uploads of 1 MiB: RSS {baseline} -> {stalled} KiB, grew by {grown} KiB \
         (bound {bound} KiB)"
    );
    assert!(
        grown <= bound,
        "{UPLOADS} stalled uploads of 1 MiB took RSS up by {grown} KiB (bound {bound} KiB)"
    );
    let text = reqwest::get(gateway.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let held: usize = text
        .lines()
        .find_map(|line| line.strip_prefix("iqgw_request_body_bytes "))
        .and_then(|value| value.trim().parse().ok())
        .expect("the gauge");
    assert!(held <= BUDGET_MIB * MIB, "{held}");
    assert!(held >= (BUDGET_MIB - 1) * MIB, "the budget is used: {held}");
    drop(streams);

    // gRPC Publish messages of 1 MiB that stall before their last byte, each on its own HTTP/2
    // connection (tokens set or not, a message is held while it arrives).
    body_bytes_settle(&gateway, 0).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = gateway.rss_kib();
    let mut publishes = Vec::new();
    for _ in 0..PUBLISHES {
        publishes.push(stalled_publish(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let stalled = gateway.rss_kib();
    let grown = stalled.saturating_sub(baseline);
    let bound = (BUDGET_MIB as u64) * 1024 + PUBLISHES as u64 * H2_PER_CONNECTION_KIB;
    eprintln!(
        "{PUBLISHES} stalled Publish messages of 1 MiB: RSS {baseline} -> {stalled} KiB, grew by \
         {grown} KiB (bound {bound} KiB)"
    );
    assert!(
        grown <= bound,
        "{PUBLISHES} stalled Publish messages of 1 MiB took RSS up by {grown} KiB (bound {bound} KiB)"
    );
    drop(publishes);
    body_bytes_settle(&gateway, 0).await;
}

/// The peak resident memory (`VmHWM`) of `process` so far, KiB.
fn peak_rss_kib(process: &binary::Process) -> u64 {
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", process.pid())).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Stalled gRPC Publish calls of the binary test.
const PUBLISHES: usize = 100;

/// What an HTTP/2 connection may cost beyond the budget with one stalled stream: h2's and
/// hyper's state and buffers (its receive window is taken by the message, in the budget).
const H2_PER_CONNECTION_KIB: u64 = 128;

/// Waits until the gateway's bodies hold `expected` bytes.
async fn body_bytes_settle(gateway: &binary::Process, expected: usize) {
    let started = Instant::now();
    loop {
        let text = reqwest::get(gateway.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        let held: usize = text
            .lines()
            .find_map(|line| line.strip_prefix("iqgw_request_body_bytes "))
            .and_then(|value| value.trim().parse().ok())
            .expect("the gauge");
        if held == expected {
            return;
        }
        assert!(started.elapsed() < WAIT, "bodies hold {held} bytes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A Publish whose 1 MiB message stops one byte short, on a new HTTP/2 connection; kept open
/// while the returned value lives.
async fn stalled_publish(addr: std::net::SocketAddr) -> StalledPublish {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("ready");
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{addr}/iqchannels.gateway.v1.EventGateway/Publish"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (response, mut stream) = client.send_request(request, false).expect("sent");
    let mut message = vec![0u8];
    message.extend_from_slice(&(MIB as u32).to_be_bytes());
    message.resize(5 + MIB - 1, b' ');
    // Refused ones are reset by the gateway: the data is then not sent, which is fine.
    let _ = stream.send_data(bytes::Bytes::from(message), false);
    StalledPublish {
        _client: client,
        _stream: stream,
        _response: response,
        _connection: AbortOnDrop(connection),
    }
}

/// What keeps a stalled Publish open.
struct StalledPublish {
    _client: h2::client::SendRequest<bytes::Bytes>,
    _stream: h2::SendStream<bytes::Bytes>,
    _response: h2::client::ResponseFuture,
    _connection: AbortOnDrop,
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A budget smaller than one body of the largest accepted size could never take that body: the
/// gateway refuses to start, naming both flags.
#[test]
fn a_request_budget_below_the_largest_body_stops_the_gateway_at_start() {
    let (status, said) = binary::serve_to_exit(
        &[
            "--store",
            "memory",
            "--max-body-bytes",
            "2000000",
            "--request-body-memory",
            "1000000",
        ],
        &[],
        WAIT,
    );
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(
        said.contains("--request-body-memory") && said.contains("--max-body-bytes"),
        "{said}"
    );
    let (status, said) = binary::serve_to_exit(
        &["--store", "memory"],
        &[("IQGW_REQUEST_BODY_MEMORY", "1000")],
        WAIT,
    );
    assert_eq!(status.code(), Some(1), "the env var is read too: {said}");
}

/// A Publish whose message stalls is refused once `--request-timeout` has passed
/// (DEADLINE_EXCEEDED) and gives its reservation back (found from outside: 70 such streams of
/// a 5-byte header each held 64 MiB of the budget for as long as they stayed open, and every
/// larger webhook got 429); an HTTP upload of the same size is stored after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_whose_message_stalls_is_refused_at_the_request_timeout() {
    let server = TestServer::with_config(ServerConfig {
        request_timeout: Duration::from_secs(1),
        ..budgeted()
    })
    .await;
    let started = Instant::now();
    let stalled = stalled_publish(server.addr).await;
    body_bytes_become(&server, MIB).await;
    let response = tokio::time::timeout(WAIT, stalled._response)
        .await
        .expect("answered in time")
        .expect("a response");
    body_bytes_become(&server, 0).await;
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the timeout: {:?}",
        started.elapsed()
    );
    // Trailers-only, or trailers after the headers: grpc-status 4 (DEADLINE_EXCEEDED).
    let mut status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    let message = response
        .headers()
        .get("grpc-message")
        .map(|v| v.to_str().unwrap_or_default().to_owned());
    if status.is_none() {
        let mut body = response.into_body();
        while let Some(Ok(_)) = body.data().await {}
        let trailers = body.trailers().await.expect("trailers").expect("some");
        status = trailers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap_or_default().to_owned());
    }
    assert_eq!(status.as_deref(), Some("4"), "{message:?}");
    drop((stalled._client, stalled._stream, stalled._connection));
    let (code, _) = server.post_event(event_of(9, MIB - 4096)).await;
    assert_eq!(code, 200);
}

/// An unknown `grpc-encoding` is refused (UNIMPLEMENTED) with the header's first bytes only
/// (found from outside: an 8,000-byte value came back as about 770 bytes of the status text).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_grpc_encoding_is_refused_without_echoing_it_whole() {
    let server = TestServer::with_config(budgeted()).await;
    let tcp = TcpStream::connect(server.addr).await.expect("connect");
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2");
    let _connection = AbortOnDrop(tokio::spawn(async move {
        let _ = connection.await;
    }));
    let mut client = client.ready().await.expect("ready");
    for path in [
        "/iqchannels.gateway.v1.EventGateway/Publish",
        "/grpc.health.v1.Health/Check",
    ] {
        let request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{}{path}", server.addr))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-encoding", "g".repeat(8000))
            .body(())
            .expect("request");
        let (response, mut stream) = client.send_request(request, false).expect("sent");
        let _ = stream.send_data(bytes::Bytes::from_static(&[1, 0, 0, 0, 1, 0]), true);
        let response = tokio::time::timeout(WAIT, response)
            .await
            .expect("answered")
            .expect("a response");
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or_default().to_owned())
                .unwrap_or_default()
        };
        assert_eq!(header("grpc-status"), "12", "{path}");
        let message = header("grpc-message");
        assert!(
            message.len() < 400 && message.contains("ggg"),
            "{path}: {} bytes: {message}",
            message.len()
        );
    }
}
