//! The client commands of the binary (`subscribe`, `publish`, `get`), over the gateway's gRPC API.
//! They print to stdout (data) and stderr (progress, cursor, errors).

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use owo_colors::{OwoColorize, Stream as ColorStream};
use prost::Message;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Status};

mod input;
mod tls;

use crate::pb::client::event_gateway_client::EventGatewayClient;
use crate::pb::client::{
    get_event_request, publish_request, subscribe_request, Event, Filter, GetEventRequest,
    PublishRequest, SubscribeRequest,
};

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address or TLS settings are unusable, or it cannot be reached (the causes,
    /// such as a refused certificate, are its sources).
    #[error("connection: {0}")]
    Connect(#[from] tonic::transport::Error),
    /// The server refused or failed the call.
    #[error("{}: {}", .0.code(), .0.message())]
    Status(#[from] Status),
    /// Reading input or writing output failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A flag value is unusable.
    #[error("{0}")]
    Usage(String),
    /// An event could not be printed as JSON.
    #[error(transparent)]
    Json(#[from] crate::pb::JsonError),
}

/// How to reach the gateway.
#[derive(Debug, Clone)]
pub struct Connection {
    /// `http://host:port` or `https://host:port`.
    pub server: String,
    /// Bearer token sent as `authorization` metadata.
    pub token: Option<String>,
    /// CA certificate (PEM) to verify an `https` server.
    pub ca_cert: Option<std::path::PathBuf>,
}

type Client = EventGatewayClient<InterceptedService<Channel, Authorization>>;

/// Adds the bearer token to every call.
#[derive(Clone)]
pub struct Authorization(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Authorization {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

impl Connection {
    async fn connect(&self) -> Result<Client, ClientError> {
        Ok(EventGatewayClient::new(self.service().await?).max_decoding_message_size(MAX_MESSAGE))
    }

    /// Subscribes, receiving each event's bytes undecoded: an event this client cannot decode
    /// is then one event to report, not a stream error that a reconnect would meet again.
    async fn subscribe_raw(
        &self,
        request: SubscribeRequest,
    ) -> Result<(tonic::Streaming<Bytes>, Option<String>), ClientError> {
        let mut grpc =
            tonic::client::Grpc::new(self.service().await?).max_decoding_message_size(MAX_MESSAGE);
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
        let path =
            http::uri::PathAndQuery::from_static("/iqchannels.gateway.v1.EventGateway/Subscribe");
        let response = grpc
            .server_streaming(tonic::Request::new(request), path, raw::Codec)
            .await?;
        let store = response
            .metadata()
            .get(crate::grpc::STORE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        Ok((response.into_inner(), store))
    }

    async fn service(&self) -> Result<InterceptedService<Channel, Authorization>, ClientError> {
        let mut endpoint =
            Endpoint::from_shared(self.server.clone())?.connect_timeout(Duration::from_secs(5));
        if self.server.starts_with("https://") {
            endpoint = match &self.ca_cert {
                Some(path) => {
                    let pem = std::fs::read(path).map_err(|e| {
                        std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                    let verifier = tls::verifier(&pem).map_err(|why| {
                        ClientError::Usage(format!("--ca-cert {}: {why}", path.display()))
                    })?;
                    endpoint.tls_config_with_verifier(ClientTlsConfig::new(), verifier)?
                }
                None => endpoint.tls_config(ClientTlsConfig::new())?,
            };
        }
        let token = match &self.token {
            Some(token) => Some(format!("Bearer {token}").parse().map_err(|_| {
                ClientError::Usage("the token has characters a header cannot carry".into())
            })?),
            None => None,
        };
        let channel = endpoint.connect().await?;
        Ok(InterceptedService::new(channel, Authorization(token)))
    }
}

/// The largest event the client reads.
const MAX_MESSAGE: usize = 64 << 20;

/// A gRPC codec that sends a `SubscribeRequest` and hands over each response's bytes.
mod raw {
    use bytes::{Buf, Bytes};
    use prost::Message;
    use tonic::codec::{DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    use crate::pb::client::SubscribeRequest;

    pub struct Codec;

    impl tonic::codec::Codec for Codec {
        type Encode = SubscribeRequest;
        type Decode = Bytes;
        type Encoder = Codec;
        type Decoder = Codec;

        fn encoder(&mut self) -> Self::Encoder {
            Codec
        }

        fn decoder(&mut self) -> Self::Decoder {
            Codec
        }
    }

    impl Encoder for Codec {
        type Item = SubscribeRequest;
        type Error = Status;

        fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            item.encode(dst)
                .map_err(|e| Status::internal(format!("encoding the request: {e}")))
        }
    }

    impl Decoder for Codec {
        type Item = Bytes;
        type Error = Status;

        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
            Ok(Some(src.copy_to_bytes(src.remaining())))
        }
    }
}

/// The sequence of an event that does not decode: field 1 alone (prost skips the other fields
/// without descending into them).
/// Moves the cursor `last` to `sequence`, the next event's: only forward. A server that sends
/// sequence 0 or one that does not increase is refused (DATA_LOSS, which stops the client):
/// printing it, or resuming after it, would repeat events or skip others.
fn move_cursor(last: &mut Option<u64>, sequence: u64) -> Result<(), ClientError> {
    if sequence == 0 || last.is_some_and(|last| sequence <= last) {
        let after = last.map_or("the start".to_owned(), |last| format!("sequence {last}"));
        return Err(Status::data_loss(format!(
            "the server sent sequence {sequence} after {after}: sequences only increase; \
             stopped without printing it (resume with --after {})",
            last.unwrap_or(0)
        ))
        .into());
    }
    *last = Some(sequence);
    Ok(())
}

fn sequence_of(bytes: Bytes) -> Option<u64> {
    #[derive(Clone, PartialEq, Message)]
    struct Sequence {
        #[prost(uint64, tag = "1")]
        sequence: u64,
    }
    Sequence::decode(bytes).ok().map(|s| s.sequence)
}

/// How events are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// One readable line per event (coloured on a terminal).
    Lines,
    /// One JSON line per event in the webhook's own shape (the original body when stored),
    /// with the resolved references under `references` when they were asked for.
    Json,
    /// Length-delimited `iqchannels.gateway.v1.Event` protobuf.
    Proto,
}

/// `subscribe`: what to follow and how.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Which events.
    pub filter: Filter,
    /// Where to start.
    pub start: Option<subscribe_request::Start>,
    /// Output format.
    pub output: Output,
    /// Stop after this many events.
    pub exit_after: Option<u64>,
    /// Reconnect after errors (resuming from the last sequence).
    pub reconnect: bool,
    /// Ask for the entities each event points at (`include_references`).
    pub references: bool,
    /// The store the cursor came from (`--store-id`): sent with the resume, which another store
    /// refuses. Learnt from the first subscription otherwise, and sent with every reconnection.
    pub store: Option<String>,
}

/// Follows the gateway's events until interrupted (or `exit_after`), reconnecting and resuming
/// from the last sequence after errors. Prints the cursor (the last sequence) to stderr on exit.
pub async fn subscribe(
    connection: &Connection,
    options: SubscribeOptions,
) -> Result<(), ClientError> {
    let mut printer = Printer::new(options.output);
    // The cursor: never earlier than the one it started from, even when nothing arrives.
    let mut last: Option<u64> = match options.start {
        Some(subscribe_request::Start::AfterSequence(sequence)) => Some(sequence),
        _ => None,
    };
    let mut stop = stop_signal()?;
    let mut store = options.store.clone();
    let mut received = 0u64;
    let mut backoff = Duration::from_millis(200);
    let outcome = loop {
        let start = match last {
            Some(sequence) => Some(subscribe_request::Start::AfterSequence(sequence)),
            None => options.start,
        };
        let request = SubscribeRequest {
            filter: Some(options.filter.clone()),
            start,
            include_raw_json: options.output == Output::Json,
            include_references: options.references,
            store: store.clone().unwrap_or_default(),
        };
        let attempt = async {
            let (mut stream, serving) = connection.subscribe_raw(request).await?;
            if let Some(serving) = serving {
                store = Some(serving);
            }
            while let Some(bytes) = stream.message().await? {
                let event = match Event::decode(bytes.clone()) {
                    Ok(event) => event,
                    Err(error) => {
                        // Reported and passed: resuming at it would fail the same way forever.
                        let Some(sequence) = sequence_of(bytes) else {
                            return Err(Status::data_loss(format!(
                                "an event that names no sequence does not decode: {error}"
                            ))
                            .into());
                        };
                        move_cursor(&mut last, sequence)?;
                        eprintln!("event {sequence} cannot be decoded ({error}); skipped");
                        continue;
                    }
                };
                move_cursor(&mut last, event.sequence)?;
                match printer.render(&event) {
                    Ok(text) => printer.write(&text)?,
                    // Reported and passed, like an event that does not decode.
                    Err(error) => {
                        eprintln!(
                            "event {} cannot be printed ({error}); skipped",
                            event.sequence
                        )
                    }
                }
                received += 1;
                if options.exit_after.is_some_and(|n| received >= n) {
                    return Ok::<bool, ClientError>(true);
                }
            }
            Err(Status::unavailable("the stream ended").into())
        };
        let result = tokio::select! {
            result = attempt => result,
            _ = stop.wait_for(|stopped| *stopped) => Ok(true),
        };
        match result {
            Ok(_) => break Ok(()),
            Err(error) if !options.reconnect || fatal(&error) => break Err(error),
            Err(error) => {
                eprintln!("subscription interrupted ({error}); reconnecting in {backoff:?}");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|stopped| *stopped) => break Ok(()),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    };
    match last {
        Some(sequence) => eprintln!("cursor: {sequence}"),
        None => eprintln!("cursor: none (no event received)"),
    }
    if let Some(store) = &store {
        eprintln!("store: {store}");
    }
    outcome
}

/// Becomes `true` at the first SIGINT or SIGTERM. Listening from the start, so a signal that
/// arrives between two waits is not lost.
fn stop_signal() -> Result<tokio::sync::watch::Receiver<bool>, ClientError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        let _ = tx.send(true);
        // Keep the handlers installed (and the receiver's sender alive) until exit.
        std::future::pending::<()>().await;
    });
    Ok(rx)
}

/// Errors that reconnecting cannot fix.
fn fatal(error: &ClientError) -> bool {
    match error {
        ClientError::Status(status) => matches!(
            status.code(),
            Code::InvalidArgument
                | Code::DataLoss
                | Code::OutOfRange
                | Code::Unauthenticated
                | Code::PermissionDenied
                | Code::NotFound
                | Code::FailedPrecondition
        ),
        ClientError::Io(_) | ClientError::Usage(_) | ClientError::Json(_) => true,
        ClientError::Connect(_) => false,
    }
}

/// Prints events in one of the [`Output`] formats.
struct Printer {
    output: Output,
    stdout: std::io::Stdout,
}

impl Printer {
    fn new(output: Output) -> Self {
        Self {
            output,
            stdout: std::io::stdout(),
        }
    }

    fn print(&mut self, event: &Event) -> Result<(), ClientError> {
        let text = self.render(event)?;
        self.write(&text)
    }

    /// The bytes `event` prints as; an error for an event this output cannot show (a number
    /// JSON has no form for, stored by an earlier release).
    fn render(&self, event: &Event) -> Result<Vec<u8>, ClientError> {
        Ok(match self.output {
            Output::Proto => event.encode_length_delimited_to_vec(),
            Output::Json => format!("{}\n", webhook_json(event)?).into_bytes(),
            Output::Lines => format!("{}\n", line(event)).into_bytes(),
        })
    }

    fn write(&mut self, bytes: &[u8]) -> Result<(), ClientError> {
        let mut out = self.stdout.lock();
        out.write_all(bytes)?;
        out.flush()?;
        Ok(())
    }
}

/// The event as the webhook sent it, on one line: the original body when the gateway has it
/// (compacted as text, so its fields and escapes stay as sent: a `serde_json::Value` would refuse
/// an unpaired surrogate escape), else the protobuf JSON mapping of the envelope (numbers as
/// numbers); plus `references` (the protobuf JSON mapping of the resolved entities) when the
/// gateway sent them.
fn webhook_json(event: &Event) -> Result<String, ClientError> {
    let body = std::str::from_utf8(&event.raw_json)
        .ok()
        .and_then(crate::decode::compact_json)
        .filter(|text| text.starts_with('{') && text.ends_with('}'));
    let mut text = match body {
        Some(text) => text,
        None => {
            let envelope = event.envelope.clone().unwrap_or_default();
            crate::pb::to_json("iqchannels.webhook.v1.Envelope", &envelope.encode_to_vec())?
                .to_string()
        }
    };
    if let Some(references) = &event.references {
        let references = crate::pb::to_json(
            "iqchannels.gateway.v1.References",
            &references.encode_to_vec(),
        )?;
        // The last member of the object: `{...}` becomes `{...,"references":{...}}`.
        text.pop();
        if !text.ends_with('{') {
            text.push(',');
        }
        text.push_str("\"references\":");
        text.push_str(&references.to_string());
        text.push('}');
    }
    Ok(text)
}

/// Characters of a message's text a readable line shows at most.
const TEXT_CHARS: usize = 60;

/// `#12 2026-11-24T21:01:42.372Z message_created id=608 chat=21 user=1 actor=user text="Hello"`
fn line(event: &Event) -> String {
    let chat_event = event
        .envelope
        .as_ref()
        .and_then(|e| e.chat_event.clone())
        .unwrap_or_default();
    let time = event
        .received_at
        .as_ref()
        .and_then(|t| {
            time::OffsetDateTime::from_unix_timestamp_nanos(
                i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos),
            )
            .ok()
        })
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default();
    let mut text = format!(
        "{} {} {}",
        format!("#{}", event.sequence).if_supports_color(ColorStream::Stdout, |s| s.bold()),
        time.if_supports_color(ColorStream::Stdout, |s| s.dimmed()),
        chat_event
            .r#type
            .if_supports_color(ColorStream::Stdout, |s| s.cyan()),
    );
    let mut field = |name: &str, value: Option<i64>| {
        if let Some(value) = value {
            text.push_str(&format!(" {name}={value}"));
        }
    };
    field("id", Some(chat_event.id));
    field("chat", chat_event.chat_id);
    field("client", chat_event.client_id);
    field("user", chat_event.user_id);
    if !chat_event.actor.is_empty() {
        text.push_str(&format!(" actor={}", chat_event.actor));
    }
    if let Some(message) = message_text(event).and_then(|t| shorten(t, TEXT_CHARS)) {
        // Debug quoting: quotes and control characters in the text stay visible and harmless.
        text.push_str(&format!(" text={message:?}"));
    }
    text
}

/// The text of the message the event is about: from the resolved reference when the gateway
/// sent one, else looked up in the envelope's `Rels` by `ChatEvent.MessageId`.
fn message_text(event: &Event) -> Option<&str> {
    let resolved = event
        .references
        .as_ref()
        .and_then(|references| references.message.as_ref());
    let message = resolved.or_else(|| {
        let envelope = event.envelope.as_ref()?;
        let id = envelope.chat_event.as_ref()?.message_id?;
        let rels = envelope.rels.as_ref()?;
        rels.chat_messages.iter().find(|message| message.id == id)
    })?;
    Some(message.text.as_str())
}

/// `text` on one line (every run of whitespace one space), at most `max` characters with an
/// ellipsis when it was longer; `None` when there is no text.
fn shorten(text: &str, max: usize) -> Option<String> {
    let mut words = text.split_whitespace();
    let mut line = words.next()?.to_owned();
    for word in words {
        line.push(' ');
        line.push_str(word);
    }
    if line.chars().count() <= max {
        return Some(line);
    }
    let mut short: String = line.chars().take(max.saturating_sub(1)).collect();
    short.truncate(short.trim_end().len());
    short.push('…');
    Some(short)
}

/// `publish` totals.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PublishSummary {
    /// Newly stored events.
    pub stored: u64,
    /// Events the gateway already had.
    pub duplicates: u64,
    /// Events whose id the gateway already had with another `ChatEvent` (a sender reusing
    /// ids): not stored, the first event stays.
    pub conflicts: u64,
    /// Where the first [`LISTED`] of them are.
    pub conflicts_listed: Vec<String>,
    /// Events the gateway refused (invalid, or over its size limit); the events after each are
    /// still sent.
    pub rejected: u64,
    /// `(where, why)` for the first [`LISTED`] of them: the rest are only counted, so that
    /// memory stays small whatever the input.
    pub rejected_listed: Vec<(String, String)>,
    /// Set when sending stopped early, on an error that is not about one event (the gateway
    /// unreachable, a token refused, ...): the events from there on were not sent.
    pub stopped: Option<Stopped>,
}

/// Rejected events (and conflicts) `publish` lists at most; the others are counted.
pub const LISTED: usize = 1000;

impl PublishSummary {
    fn reject(&mut self, place: String, reason: String) {
        self.rejected += 1;
        if self.rejected_listed.len() < LISTED {
            self.rejected_listed.push((place, reason));
        }
    }

    fn conflict(&mut self, place: String) {
        self.conflicts += 1;
        if self.conflicts_listed.len() < LISTED {
            self.conflicts_listed.push(place);
        }
    }
}

/// Where `publish` stopped, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stopped {
    /// The first event not sent (or not known to be stored).
    pub at: String,
    /// How many events were not sent, that one included.
    pub unsent: u64,
    /// The error.
    pub reason: String,
}

/// `publish`: sends every event of every input (`-` = stdin) through gRPC Publish, in order,
/// reading the inputs as it goes ([`input`]: at most a few MiB of events read ahead of the
/// one being sent, so memory stays small whatever the size of the input). An event the gateway
/// cannot take for now (busy, its store unavailable, or the gateway unreachable) is sent again,
/// with a growing pause, for up to `retry_for`; redelivery is safe, the gateway deduplicates by
/// event id (and a transitive event by the idempotency key each event is sent with, unique to
/// this run). Shows a progress bar for large inputs on a terminal; returns the totals.
pub async fn publish(
    connection: &Connection,
    inputs: &[String],
    retry_for: Duration,
) -> Result<PublishSummary, ClientError> {
    let (opened, total_bytes) = input::open(inputs)?;
    let mut events = input::spawn_reader(opened);
    let progress = progress_bar(total_bytes);
    let mut summary = PublishSummary::default();
    let mut retry = Retry::new(retry_for);
    // Each event's idempotency key is this run's and its place in the run.
    let run = format!("publish-{}", nuid::next());
    let mut sent = 0u64;
    let mut client = loop {
        match connection.connect().await {
            Ok(client) => break client,
            Err(error) if may_pass(&error) && retry.wait().await => {}
            Err(error) if !may_pass(&error) => return Err(error),
            Err(error) => match events.recv().await {
                Some(Ok(first)) => {
                    progress.abandon();
                    summary.stopped = Some(Stopped {
                        at: first.place,
                        unsent: 1 + count_rest(&mut events).await,
                        reason: error.to_string(),
                    });
                    return Ok(summary);
                }
                Some(Err(read)) => return Err(read.into()),
                _ => return Err(error),
            },
        }
    };
    while let Some(item) = events.recv().await {
        let item = item?;
        let body = match item.body {
            Ok(body) => body,
            Err(reason) => {
                summary.reject(item.place, reason);
                advance(&progress, item.read, total_bytes);
                continue;
            }
        };
        sent += 1;
        let request = PublishRequest {
            event: Some(publish_request::Event::RawJson(body.to_vec())),
            // Resent after an unknown outcome, a transitive event is still stored once.
            idempotency_key: format!("{run}-{sent}"),
        };
        drop(body);
        let mut retry = Retry::new(retry_for);
        let answer = loop {
            match client.publish(request.clone()).await {
                Err(status) if transient(&status) && retry.wait().await => {}
                answer => break answer,
            }
        };
        let place = item.place;
        match answer {
            Ok(answer) if answer.get_ref().conflict => summary.conflict(place),
            Ok(answer) if answer.get_ref().duplicate => summary.duplicates += 1,
            Ok(_) => summary.stored += 1,
            Err(status) if refuses_the_event(&status) => {
                summary.reject(place, status.message().to_owned());
            }
            Err(status) => {
                progress.abandon();
                summary.stopped = Some(Stopped {
                    at: place,
                    unsent: 1 + count_rest(&mut events).await,
                    reason: ClientError::from(status).to_string(),
                });
                return Ok(summary);
            }
        }
        advance(&progress, item.read, total_bytes);
    }
    progress.finish_and_clear();
    Ok(summary)
}

/// Events left in the inputs, read to their end without being kept (a read error ends the
/// count there).
async fn count_rest(events: &mut tokio::sync::mpsc::Receiver<std::io::Result<input::Item>>) -> u64 {
    let mut count = 0;
    while let Some(Ok(_)) = events.recv().await {
        count += 1;
    }
    count
}

/// Inputs of at least this many bytes get a progress bar (on a terminal).
const PROGRESS_BYTES: u64 = 256 << 10;

/// A bar over the inputs' bytes when their size is known and large, a count of events for
/// stdin; hidden otherwise (and by indicatif itself when stderr is not a terminal).
fn progress_bar(total_bytes: Option<u64>) -> indicatif::ProgressBar {
    match total_bytes {
        Some(total) if total >= PROGRESS_BYTES => {
            let bar = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            ) {
                bar.set_style(style);
            }
            bar
        }
        Some(_) => indicatif::ProgressBar::hidden(),
        None => {
            let spinner = indicatif::ProgressBar::new_spinner();
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{spinner} {pos} events {per_sec}")
            {
                spinner.set_style(style);
            }
            spinner
        }
    }
}

/// Moves the progress bar past one event: to the bytes read so far, or one more event.
fn advance(progress: &indicatif::ProgressBar, read: u64, total_bytes: Option<u64>) {
    match total_bytes {
        Some(_) => progress.set_position(read),
        None => progress.inc(1),
    }
}

/// Whether the gateway may take the event if it is sent again a little later: it was busy
/// (RESOURCE_EXHAUSTED "too many requests in flight"), it or its store was unavailable, or the
/// connection broke during the call (the gateway killed or restarted: tonic says UNKNOWN
/// "transport error", or INTERNAL/CANCELLED for an HTTP/2 stream cut without a status). Whether a
/// call cut off was stored is unknown; sending it again is safe, the gateway deduplicates by id.
fn transient(status: &Status) -> bool {
    match status.code() {
        Code::Unavailable => true,
        Code::ResourceExhausted => !refuses_the_event(status),
        Code::Unknown | Code::Internal | Code::Cancelled => broken_connection(status),
        _ => false,
    }
}

/// Whether the status comes from the connection (a transport or HTTP/2 error under it), not from
/// the gateway's answer.
fn broken_connection(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(cause) = source {
        if cause.is::<tonic::transport::Error>() || cause.is::<hyper::Error>() {
            return true;
        }
        source = cause.source();
    }
    false
}

/// Whether connecting failed for a reason that may pass (nothing listening yet, a connection
/// reset, a timeout), not one that will not (a certificate refused, an unusable address).
fn may_pass(error: &ClientError) -> bool {
    use std::io::ErrorKind;
    let ClientError::Connect(error) = error else {
        return false;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(cause) = source {
        if cause.is::<tonic::TimeoutExpired>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                ErrorKind::ConnectionRefused
                    | ErrorKind::ConnectionReset
                    | ErrorKind::ConnectionAborted
                    | ErrorKind::NotConnected
                    | ErrorKind::TimedOut
                    | ErrorKind::HostUnreachable
                    | ErrorKind::NetworkUnreachable
            );
        }
        source = cause.source();
    }
    false
}

/// Pauses between attempts to send one event: from 100 ms, doubling up to 5 s, while the time
/// since the first attempt stays within the allowance.
struct Retry {
    until: tokio::time::Instant,
    pause: Duration,
}

impl Retry {
    fn new(allowance: Duration) -> Self {
        Self {
            until: tokio::time::Instant::now() + allowance,
            pause: Duration::from_millis(100),
        }
    }

    /// Waits before the next attempt; `false` (at once) when the allowance is spent.
    async fn wait(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        if now >= self.until {
            return false;
        }
        tokio::time::sleep(self.pause.min(self.until - now)).await;
        self.pause = (self.pause * 2).min(Duration::from_secs(5));
        true
    }
}

/// Whether the gateway refused this one event, not every event: it is invalid, or over the
/// gateway's size limit (RESOURCE_EXHAUSTED "request message too large"; OUT_OF_RANGE "decoded
/// message length too large" from a server that keeps tonic's code). Busy (RESOURCE_EXHAUSTED
/// "too many requests in flight") is not about the event.
fn refuses_the_event(status: &Status) -> bool {
    match status.code() {
        Code::InvalidArgument => true,
        Code::ResourceExhausted | Code::OutOfRange => status.message().contains("too large"),
        _ => false,
    }
}

/// `get`: one event by sequence or event id, printed in `output`, with the entities it points
/// at when `references`.
pub async fn get(
    connection: &Connection,
    key: get_event_request::Key,
    output: Output,
    references: bool,
) -> Result<(), ClientError> {
    let mut client = connection.connect().await?;
    let request = GetEventRequest {
        key: Some(key),
        include_raw_json: output == Output::Json,
        include_references: references,
    };
    let event = client.get_event(request).await?.into_inner();
    Printer::new(output).print(&event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_unavailable_are_sent_again_refusals_of_the_event_are_not() {
        let busy = Status::resource_exhausted("too many requests in flight; retry shortly");
        let too_large = Status::resource_exhausted("request message too large: 2097152 > 1048576");
        assert!(transient(&busy) && !refuses_the_event(&busy));
        assert!(!transient(&too_large) && refuses_the_event(&too_large));
        assert!(transient(&Status::unavailable("the store is unavailable")));
        for status in [
            Status::invalid_argument("ChatEvent.Id: expected a positive integer"),
            Status::permission_denied("the token lacks the publish scope"),
            Status::unauthenticated("no token"),
            Status::out_of_range("decoded message length too large"),
        ] {
            assert!(!transient(&status), "{status:?}");
        }
    }

    /// A server sending 5, 3, 5, 0, 2^64-1 had every one printed, and the CLI then resumed
    /// after 2^64-1: the cursor moves forward only, and the first sequence that does not
    /// increase stops the client (DATA_LOSS, fatal) without moving it.
    #[test]
    fn the_cursor_only_moves_forward() {
        let mut last = None;
        let sent = [5u64, 3, 5, 0, u64::MAX];
        let taken: Vec<bool> = sent
            .iter()
            .map(|&sequence| move_cursor(&mut last, sequence).is_ok())
            .collect();
        assert_eq!(taken, [true, false, false, false, true]);
        let mut last = Some(5);
        let error = move_cursor(&mut last, 3).expect_err("backwards");
        assert!(fatal(&error), "{error}");
        assert!(
            error.to_string().contains("sequence 3 after sequence 5"),
            "{error}"
        );
        assert_eq!(last, Some(5), "not moved");
        let mut none = None;
        assert!(move_cursor(&mut none, 0).is_err(), "0 is no sequence");
        assert_eq!(none, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_stops_when_its_allowance_is_spent() {
        let mut none = Retry::new(Duration::ZERO);
        assert!(!none.wait().await);
        let started = tokio::time::Instant::now();
        let mut some = Retry::new(Duration::from_millis(250));
        let mut attempts = 0;
        while some.wait().await {
            attempts += 1;
        }
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(attempts, 2, "100 ms, then the 150 ms left");

        // Pauses double up to 5 s: 0.1 + 0.2 + 0.4 + 0.8 + 1.6 + 3.2 + 5 + 5 = 16.3 s.
        let mut long = Retry::new(Duration::from_millis(16_300));
        let mut attempts = 0;
        while long.wait().await {
            attempts += 1;
        }
        assert_eq!(attempts, 8);
    }

    #[test]
    fn text_is_put_on_one_line_and_shortened_with_an_ellipsis() {
        assert_eq!(
            shorten("  Hello,\n\tworld  ", 60).as_deref(),
            Some("Hello, world")
        );
        assert_eq!(shorten(" \n ", 60), None);
        let long = "Здравствуйте! ".repeat(10);
        let short = shorten(&long, 60).expect("text");
        assert_eq!(short.chars().count(), 60);
        assert!(short.ends_with("! Здр…"), "{short}");
        let exact = "ы".repeat(60);
        assert_eq!(
            shorten(&exact, 60),
            Some(exact.clone()),
            "60 characters fit"
        );
    }

    #[test]
    fn json_output_is_the_body_as_sent_on_one_line_with_the_references_last() {
        use crate::pb::client::References;
        use crate::pb::webhook::v1::{ChatEvent, ChatMessage, Envelope};
        let body = "{\n  \"ChatEvent\": {\"Id\": 608, \"Type\": \"message_created\"},\n  \"Rels\": {\"ChatMessages\": [{\"Id\": 300, \"Text\": \"a b \\ud83d\"}]},\n  \"Unknown\": 1e400\n}\n";
        let mut event = Event {
            sequence: 2,
            envelope: Some(Envelope {
                chat_event: Some(ChatEvent {
                    id: 608,
                    r#type: "message_created".into(),
                    ..Default::default()
                }),
                rels: None,
            }),
            raw_json: body.as_bytes().to_vec(),
            ..Default::default()
        };
        let compact = r#"{"ChatEvent":{"Id":608,"Type":"message_created"},"Rels":{"ChatMessages":[{"Id":300,"Text":"a b \ud83d"}]},"Unknown":1e400}"#;
        assert_eq!(webhook_json(&event).expect("printable"), compact);
        event.references = Some(References {
            message: Some(ChatMessage {
                id: 300,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(
            webhook_json(&event).expect("printable"),
            format!(
                "{},\"references\":{{\"message\":{{\"Id\":300}}}}}}",
                &compact[..compact.len() - 1]
            )
        );
        // Without the body: the protobuf JSON mapping.
        event.raw_json = Default::default();
        event.references = None;
        let mapped: serde_json::Value =
            serde_json::from_str(&webhook_json(&event).expect("printable")).expect("JSON");
        assert_eq!(mapped["ChatEvent"]["Id"], 608);
    }

    #[test]
    fn a_line_shows_the_message_text_from_the_references_else_from_rels() {
        use crate::pb::client::References;
        use crate::pb::webhook::v1::{ChatEvent, ChatMessage, Envelope, Rels};
        let message = |text: &str| ChatMessage {
            id: 300,
            text: text.into(),
            ..Default::default()
        };
        let mut event = Event {
            sequence: 2,
            envelope: Some(Envelope {
                chat_event: Some(ChatEvent {
                    id: 608,
                    r#type: "message_created".into(),
                    message_id: Some(300),
                    ..Default::default()
                }),
                rels: Some(Rels {
                    chat_messages: vec![message("from \"Rels\"\nsecond line")],
                    ..Default::default()
                }),
            }),
            ..Default::default()
        };
        assert!(
            line(&event).ends_with(r#" text="from \"Rels\" second line""#),
            "{}",
            line(&event)
        );
        event.references = Some(References {
            message: Some(message("resolved")),
            ..Default::default()
        });
        assert!(
            line(&event).ends_with(r#" text="resolved""#),
            "{}",
            line(&event)
        );
        event.references = Some(References::default());
        event.envelope = None;
        assert!(!line(&event).contains("text="), "no message, no text");
    }
}
