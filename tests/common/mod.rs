//! Helpers shared by the end-to-end tests: a real server on 127.0.0.1:0 over a [`MemoryLog`] (or
//! any store), HTTP and gRPC clients pointed at it, and the shared fixtures.

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use iqchannels_gateway::log::memory::MemoryLog;
use iqchannels_gateway::log::SharedLog;
use iqchannels_gateway::pb::client::event_gateway_client::EventGatewayClient;
use iqchannels_gateway::pb::client::{
    get_event_request, subscribe_request, Event, Filter, GetEventRequest, SubscribeRequest,
};
use iqchannels_gateway::server::{serve, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// The 2021 sample: `chat_closed`, chat 13, project 1, actor user, event id 4622.
pub const CHAT_CLOSED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/chat_closed.json"
));
/// The 2018 sample: `message_created` with a file, chat 21, project 1, event id 608.
pub const MESSAGE_CREATED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/message_created_file.json"
));

/// How long any single wait in a test may take before the test fails.
pub const WAIT: Duration = Duration::from_secs(10);

/// A gateway serving a bound port in this process. Dropping it signals shutdown.
pub struct TestServer {
    /// Where it listens (HTTP and gRPC).
    pub addr: SocketAddr,
    /// The log behind it, for direct inspection.
    pub log: SharedLog,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    /// A server with the default configuration.
    pub async fn start() -> Self {
        Self::with_config(ServerConfig::default()).await
    }

    /// A server with `config`; the listener is bound before this returns, so clients may
    /// connect at once.
    pub async fn with_config(config: ServerConfig) -> Self {
        Self::with_log(Arc::new(MemoryLog::default()), config).await
    }

    /// A server over `log` with `config`.
    pub async fn with_log(log: SharedLog, config: ServerConfig) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let (shutdown, signal) = oneshot::channel::<()>();
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                serve(listener, log, config, async {
                    let _ = signal.await;
                })
                .await
                .expect("server runs until shutdown");
            }
        });
        Self {
            addr,
            log,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// `http://ADDR` plus `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// A gRPC client on a new HTTP/2 connection.
    pub async fn grpc(&self) -> EventGatewayClient<Channel> {
        EventGatewayClient::new(self.channel().await)
    }

    /// A cleartext HTTP/2 channel to the server.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.addr))
            .expect("valid URI")
            .connect()
            .await
            .expect("gRPC connects")
    }

    /// POSTs `body` as `application/json` to `/v1/events`; returns the status and JSON answer.
    pub async fn post_event(&self, body: impl Into<reqwest::Body>) -> (u16, serde_json::Value) {
        let response = reqwest::Client::new()
            .post(self.url("/v1/events"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("HTTP request completes");
        answer(response).await
    }

    /// POSTs `body` to `path` with `content_type` (none when `None`); returns the status and JSON
    /// answer.
    pub async fn post(
        &self,
        path: &str,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (u16, serde_json::Value) {
        let mut request = reqwest::Client::new().post(self.url(path)).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        answer(request.send().await.expect("HTTP request completes")).await
    }

    /// POSTs a body that must be stored; returns its sequence.
    pub async fn store(&self, body: impl Into<reqwest::Body>) -> u64 {
        let (status, json) = self.post_event(body).await;
        assert_eq!(status, 200, "POST /v1/events answered {json}");
        assert_eq!(json["duplicate"], false, "{json}");
        json["sequence"].as_u64().expect("a sequence")
    }

    /// Signals shutdown and waits for `serve` to return.
    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("serve returns after shutdown")
                .expect("server task did not panic");
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }
}

/// Status code and JSON body of a response (`Null` if the body is not JSON).
pub async fn answer(response: reqwest::Response) -> (u16, serde_json::Value) {
    let status = response.status().as_u16();
    let body = response.bytes().await.expect("response body");
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A webhook body with the given id, type, chat, actor and client (chat 13 is in project 1).
pub fn event_json(id: i64, event_type: &str, chat_id: i64, actor: &str, project_id: i64) -> String {
    serde_json::json!({
        "ChatEvent": {"Id": id, "Type": event_type, "ChatId": chat_id, "Actor": actor},
        "Rels": {"Chats": [{"Id": chat_id, "ProjectId": project_id, "ChannelId": 1}]}
    })
    .to_string()
}

/// A subscribe request.
pub fn subscription(filter: Filter, start: Option<subscribe_request::Start>) -> SubscribeRequest {
    SubscribeRequest {
        filter: Some(filter),
        start,
        include_raw_json: false,
        include_references: false,
        ..Default::default()
    }
}

/// Opens a subscription; it is attached to the log when this returns.
pub async fn subscribe(
    client: &mut EventGatewayClient<Channel>,
    request: SubscribeRequest,
) -> tonic::Streaming<Event> {
    tokio::time::timeout(WAIT, client.subscribe(request))
        .await
        .expect("Subscribe answers")
        .expect("Subscribe accepted")
        .into_inner()
}

/// The next event of a stream.
pub async fn next_event(stream: &mut tonic::Streaming<Event>) -> Event {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event arrives in time")
        .expect("the stream goes on")
        .expect("the stream has not ended")
}

/// The `ChatEvent.Type` of an event.
pub fn event_type(event: &Event) -> &str {
    event
        .envelope
        .as_ref()
        .and_then(|envelope| envelope.chat_event.as_ref())
        .map_or("", |chat_event| chat_event.r#type.as_str())
}

/// The `ChatEvent.Id` of an event.
pub fn event_id(event: &Event) -> i64 {
    event
        .envelope
        .as_ref()
        .and_then(|envelope| envelope.chat_event.as_ref())
        .map_or(0, |chat_event| chat_event.id)
}

/// GetEvent by sequence.
pub async fn get_by_sequence(
    client: &mut EventGatewayClient<Channel>,
    sequence: u64,
    include_raw_json: bool,
) -> Result<Event, tonic::Status> {
    client
        .get_event(GetEventRequest {
            key: Some(get_event_request::Key::Sequence(sequence)),
            include_raw_json,
            include_references: false,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// GetEvent by `ChatEvent.Id`.
pub async fn get_by_event_id(
    client: &mut EventGatewayClient<Channel>,
    event_id: i64,
) -> Result<Event, tonic::Status> {
    client
        .get_event(GetEventRequest {
            key: Some(get_event_request::Key::EventId(event_id)),
            include_raw_json: false,
            include_references: false,
        })
        .await
        .map(tonic::Response::into_inner)
}

#[path = "../nats/mod.rs"]
pub mod nats;
pub use nats::{require, TestStream, SHARED_NATS};

/// A JetStream store on a stream no other test uses (deleted when the returned guard drops), or
/// `None` (skipped loudly; a failure under CI) when nats-server is not running.
pub async fn jetstream_log() -> Option<(SharedLog, TestStream)> {
    use iqchannels_gateway::log::jetstream::JetStreamLog;
    let (config, guard) = jetstream_config()?;
    let log = JetStreamLog::connect(config)
        .await
        .expect("the JetStream store connects");
    Some((Arc::new(log), guard))
}

/// The configuration of a JetStream store on the machine's nats-server, with a stream name and
/// subject prefix no other test uses (the stream is deleted when the guard drops), or `None`
/// (skipped loudly; a failure under CI) when nats-server is not running.
pub fn jetstream_config() -> Option<(iqchannels_gateway::log::jetstream::NatsConfig, TestStream)> {
    use iqchannels_gateway::log::jetstream::NatsConfig;
    if !require(
        &format!("nats-server with JetStream on {SHARED_NATS}"),
        nats::reachable(SHARED_NATS),
    ) {
        return None;
    }
    let guard = TestStream::new(SHARED_NATS);
    let mut config = NatsConfig::new(format!("nats://{SHARED_NATS}"));
    config.stream = guard.name().to_owned();
    config.subject_prefix = guard.prefix().to_owned();
    Some((config, guard))
}

/// A JetStream context on the machine's nats-server, to shape or damage a test's stream.
pub async fn nats_admin() -> async_nats::jetstream::Context {
    let client = async_nats::connect(SHARED_NATS)
        .await
        .expect("connects to nats-server");
    async_nats::jetstream::new(client)
}

/// Reads Server-Sent Events frames until `count` events arrived; returns `(id, data)` pairs.
/// Frames are split on bytes and decoded whole (a chunk may end inside a UTF-8 character).
pub async fn read_events(
    response: &mut reqwest::Response,
    count: usize,
) -> Vec<(u64, serde_json::Value)> {
    let mut buffer: Vec<u8> = Vec::new();
    let mut events = Vec::new();
    while events.len() < count {
        let chunk = tokio::time::timeout(WAIT, response.chunk())
            .await
            .expect("an event in time");
        let chunk = chunk.expect("stream open").expect("stream not ended");
        buffer.extend_from_slice(&chunk);
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buffer.drain(..end + 2).collect();
            let frame = String::from_utf8(frame).expect("SSE frames are UTF-8");
            let field = |name: &str| {
                frame
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(|v| v.trim().to_owned())
            };
            if let (Some(id), Some(data)) = (field("id:"), field("data:")) {
                events.push((id.parse().unwrap(), serde_json::from_str(&data).unwrap()));
            }
        }
    }
    events
}
