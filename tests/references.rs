//! Typed references end to end over real sockets: webhook bodies posted over HTTP come out of
//! gRPC Subscribe, GetEvent and SSE with the entities their `ChatEvent` points at, resolved once
//! at ingest and sent as the same stored bytes to every stream that asks for them. On the memory
//! store (the server in process), the embedded store and JetStream (the real binary).

mod binary;
mod common;

use std::net::SocketAddr;

use bytes::{Buf, BufMut};
use common::{read_events, TestServer, CHAT_CLOSED, MESSAGE_CREATED, WAIT};
use iqchannels_gateway::pb::client::{
    get_event_request::Key, subscribe_request::Start, Event, GetEventRequest, References,
    SubscribeRequest,
};
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// A gRPC codec that passes messages through as their bytes, so the test sees exactly what the
/// server wrote.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// `EventGateway` calls whose answers are the bytes on the wire.
struct RawClient(tonic::client::Grpc<tonic::transport::Channel>);

impl RawClient {
    async fn connect(addr: SocketAddr) -> Self {
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("valid URI")
            .connect()
            .await
            .expect("gRPC connects");
        Self(tonic::client::Grpc::new(channel))
    }

    async fn subscribe(&mut self, request: SubscribeRequest) -> tonic::Streaming<Vec<u8>> {
        self.0.ready().await.expect("channel ready");
        let path =
            http::uri::PathAndQuery::from_static("/iqchannels.gateway.v1.EventGateway/Subscribe");
        let request = tonic::Request::new(request.encode_to_vec());
        tokio::time::timeout(WAIT, self.0.server_streaming(request, path, RawCodec))
            .await
            .expect("Subscribe answers")
            .expect("Subscribe accepted")
            .into_inner()
    }

    async fn get_event(&mut self, key: Key, include_references: bool) -> Vec<u8> {
        self.0.ready().await.expect("channel ready");
        let path =
            http::uri::PathAndQuery::from_static("/iqchannels.gateway.v1.EventGateway/GetEvent");
        let request = GetEventRequest {
            key: Some(key),
            include_raw_json: false,
            include_references,
        };
        self.0
            .unary(tonic::Request::new(request.encode_to_vec()), path, RawCodec)
            .await
            .expect("GetEvent finds the event")
            .into_inner()
    }
}

async fn next_bytes(stream: &mut tonic::Streaming<Vec<u8>>) -> Vec<u8> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("an event arrives in time")
        .expect("the stream goes on")
        .expect("the stream has not ended")
}

fn subscribe_request(include_references: bool, start: Option<Start>) -> SubscribeRequest {
    SubscribeRequest {
        include_references,
        start,
        ..SubscribeRequest::default()
    }
}

/// `Event` field 6 as the server appends it: its tag, its length, the stored `References`.
fn field_6(references: &References) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::message::encode(6, references, &mut out);
    out
}

async fn post(http: &reqwest::Client, addr: SocketAddr, body: &'static [u8]) -> u64 {
    let response = http
        .post(format!("http://{addr}/v1/events"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("HTTP request completes");
    assert_eq!(response.status(), 200);
    let answer: serde_json::Value = response.json().await.expect("a JSON answer");
    answer["sequence"].as_u64().expect("a sequence")
}

async fn sse(http: &reqwest::Client, addr: SocketAddr, query: &str) -> reqwest::Response {
    let response = http
        .get(format!("http://{addr}/v1/events:stream{query}"))
        .send()
        .await
        .expect("SSE request completes");
    assert_eq!(response.status(), 200);
    response
}

/// What the rules resolve for the two fixtures, from their own `Rels`: message 300 of chat 21
/// with its file, operator 1 (its client 21 is not in its Rels); chat 13 closed by operator 1
/// for client 13 (no message). Both in channel 1 and project 1.
fn expected_references(event: &Event) -> References {
    let envelope = event.envelope.as_ref().expect("typed envelope");
    let chat_event = envelope.chat_event.as_ref().expect("ChatEvent");
    let rels = envelope.rels.as_ref().expect("Rels");
    let common = References {
        chat: Some(rels.chats[0]),
        user: Some(rels.users[0].clone()),
        channel: Some(rels.channels[0].clone()),
        project: Some(rels.projects[0].clone()),
        ..References::default()
    };
    match chat_event.id {
        608 => References {
            message: Some(rels.chat_messages[0].clone()),
            file: Some(rels.files[0].clone()),
            ..common
        },
        4622 => References {
            client: Some(rels.clients[0].clone()),
            ..common
        },
        other => panic!("unexpected event {other}"),
    }
}

/// The links the rules follow hold in what was resolved.
fn assert_linked(event: &Event, references: &References) {
    let chat_event = event
        .envelope
        .as_ref()
        .and_then(|envelope| envelope.chat_event.as_ref())
        .expect("ChatEvent");
    let chat = references.chat.as_ref().expect("the chat");
    assert_eq!(Some(chat.id), chat_event.chat_id);
    assert_eq!(
        references.channel.as_ref().map(|c| c.id),
        Some(chat.channel_id)
    );
    assert_eq!(
        references.project.as_ref().map(|p| p.id),
        Some(chat.project_id)
    );
    assert_eq!(
        references.user.as_ref().map(|u| u.id),
        chat_event.user_id,
        "the acting operator"
    );
    if let Some(message) = &references.message {
        assert_eq!(Some(message.id), chat_event.message_id);
        assert_eq!(
            references.file.as_ref().map(|f| f.id.as_str()),
            message.file_id.as_deref()
        );
    }
    if let Some(client) = &references.client {
        assert_eq!(Some(client.id), chat_event.client_id);
    }
}

/// Every field of `reference` (the protobuf JSON mapping, defaults left out) holds what the
/// webhook body's Rels entry holds under the same wire name.
fn assert_json_within(reference: &serde_json::Value, sent: &serde_json::Value, path: &str) {
    match (reference, sent) {
        (serde_json::Value::Object(fields), serde_json::Value::Object(_)) => {
            for (key, value) in fields {
                assert_json_within(value, &sent[key], &format!("{path}.{key}"));
            }
        }
        _ => assert_eq!(reference, sent, "{path}"),
    }
}

/// The whole check against a gateway at `addr` whose store is empty.
async fn references_reach_grpc_get_event_and_sse_as_one_encoding(addr: SocketAddr) {
    let http = reqwest::Client::new();
    let mut grpc = RawClient::connect(addr).await;
    // Live streams (the hub's shared events), attached before anything is posted.
    let mut live_with = grpc.subscribe(subscribe_request(true, None)).await;
    let mut live_without = grpc.subscribe(subscribe_request(false, None)).await;
    let mut sse_with = sse(&http, addr, "?references=true").await;
    let mut sse_without = sse(&http, addr, "").await;

    let sequences = [
        post(&http, addr, MESSAGE_CREATED).await,
        post(&http, addr, CHAT_CLOSED).await,
    ];

    let mut sent_with = Vec::new();
    for sequence in sequences {
        let with = next_bytes(&mut live_with).await;
        let without = next_bytes(&mut live_without).await;
        let event = Event::decode(with.as_slice()).expect("a valid Event");
        assert_eq!(event.sequence, sequence);
        let references = event
            .references
            .clone()
            .expect("asked for: references are set");
        assert_eq!(references, expected_references(&event), "event {sequence}");
        assert_linked(&event, &references);
        let plain = Event::decode(without.as_slice()).expect("a valid Event");
        assert_eq!(plain.references, None, "not asked for: no references");
        assert_eq!(plain.envelope, event.envelope);

        // One encoding, several forms: the same bytes, with field 6 appended for those who ask.
        let mut expected = without.clone();
        expected.extend_from_slice(&field_6(&references));
        assert_eq!(with, expected, "event {sequence}: with = without + field 6");
        assert_eq!(
            grpc.get_event(Key::Sequence(sequence), true).await,
            with,
            "GetEvent sends what the stream sent"
        );
        let event_id = event
            .envelope
            .and_then(|e| e.chat_event)
            .map_or(0, |c| c.id);
        assert_eq!(grpc.get_event(Key::EventId(event_id), false).await, without);
        sent_with.push(with);
    }

    // A subscriber catching up from the log gets the same bytes as the live tail sent.
    let mut catch_up = grpc
        .subscribe(subscribe_request(true, Some(Start::Beginning(()))))
        .await;
    for expected in &sent_with {
        assert_eq!(&next_bytes(&mut catch_up).await, expected);
    }

    // SSE: the same entities under `references`, in the webhook's wire names.
    let with = read_events(&mut sse_with, 2).await;
    let without = read_events(&mut sse_without, 2).await;
    for ((sequence, data), (_, plain)) in with.iter().zip(&without) {
        assert!(sequences.contains(sequence));
        assert!(plain.get("references").is_none(), "not asked for: {plain}");
        let references = data["references"]
            .as_object()
            .expect("asked for: an object");
        let mut kinds: Vec<&str> = references.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        let rels = &data["event"]["Rels"];
        match data["event"]["ChatEvent"]["Id"].as_i64() {
            Some(608) => {
                assert_eq!(
                    kinds,
                    ["channel", "chat", "file", "message", "project", "user"]
                );
                assert_eq!(references["message"]["Id"], 300);
                assert_eq!(references["file"]["Name"], "example-request.json");
            }
            Some(4622) => {
                assert_eq!(kinds, ["channel", "chat", "client", "project", "user"]);
                assert_eq!(references["client"]["Name"], "Альфред Хичкок");
            }
            other => panic!("unexpected event {other:?}"),
        }
        assert_eq!(references["chat"]["Id"], data["chat_id"]);
        for (kind, key) in [
            ("chat", "Chats"),
            ("message", "ChatMessages"),
            ("file", "Files"),
            ("client", "Clients"),
            ("user", "Users"),
            ("channel", "Channels"),
            ("project", "Projects"),
        ] {
            if let Some(reference) = references.get(kind) {
                assert_json_within(reference, &rels[key][0], &format!("{sequence}.{kind}"));
            }
        }
    }

    let bad = http
        .get(format!("http://{addr}/v1/events:stream?references=yes"))
        .send()
        .await
        .expect("request completes");
    assert_eq!(bad.status(), 400);
    let error: serde_json::Value = bad.json().await.expect("a JSON error");
    assert!(
        error["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("references:")),
        "{error}"
    );
}

#[tokio::test]
async fn references_reach_grpc_get_event_and_sse_as_one_encoding_on_the_memory_store() {
    let server = TestServer::start().await;
    references_reach_grpc_get_event_and_sse_as_one_encoding(server.addr).await;
    server.stop().await;
}

#[tokio::test]
async fn references_reach_grpc_get_event_and_sse_as_one_encoding_on_the_embedded_store() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let process = binary::Process::embedded(dir.path(), &[]);
    references_reach_grpc_get_event_and_sse_as_one_encoding(process.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_reach_grpc_get_event_and_sse_as_one_encoding_on_jetstream() {
    if !common::nats::require(
        "NATS with JetStream on 127.0.0.1:4222",
        common::nats::reachable(common::SHARED_NATS),
    ) {
        return;
    }
    let stream = common::TestStream::new(common::SHARED_NATS);
    let store = format!("nats://{}", common::SHARED_NATS);
    let process = binary::Process::start(&stream.args(&store));
    references_reach_grpc_get_event_and_sse_as_one_encoding(process.addr).await;
}
