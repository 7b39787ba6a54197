//! A downstream service's event loop, in Rust: subscribe with a filter, handle each event, and
//! survive disconnects without repeating or skipping an event.
//!
//! What it shows:
//! - the generated client (`iqchannels_gateway::pb::client`) and a `SubscribeRequest` with a
//!   `Filter` (event types and chat ids; values within a field are ORed, fields are ANDed);
//! - the cursor: the consumer remembers the sequence of the last event it handled, and on any
//!   stream error, disconnect or gateway restart it reconnects with exponential backoff and
//!   resumes with `after_sequence = last`. The gateway sends events in sequence order without
//!   gaps, so the resumed stream neither repeats nor skips. A real service stores the cursor
//!   with the effect of handling the event and passes it back as `--after` when it restarts;
//! - which errors to retry: `UNAVAILABLE` (gateway draining or down), transport errors and a
//!   stream that ends are retried; `OUT_OF_RANGE` (the cursor was removed by retention),
//!   `INVALID_ARGUMENT` and authentication errors are not, since retrying cannot fix them.
//!
//! It prints one line per event, `SEQUENCE TYPE chat=CHAT actor=ACTOR` (`-` for a missing chat
//! or an anonymous actor), and reconnects quietly on stderr.
//!
//! ```sh
//! cargo run --example consumer -- --server http://127.0.0.1:8080 --type message_created --after 0
//! ```
//!
//! `examples/run.sh` runs it (and the Python consumer beside it) against a real gateway in CI.

use std::time::Duration;

use clap::Parser;
use iqchannels_gateway::pb::client::event_gateway_client::EventGatewayClient;
use iqchannels_gateway::pb::client::{subscribe_request::Start, Event, Filter, SubscribeRequest};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Prints the events an iqchannels-gateway streams, resuming after disconnects.
#[derive(Parser)]
struct Args {
    /// The gateway's gRPC address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    server: String,
    /// Only events of these types (repeat or comma-separate), e.g. `message_created`.
    #[arg(long = "type", value_delimiter = ',')]
    types: Vec<String>,
    /// Only events of these chats (repeat or comma-separate).
    #[arg(long = "chat", value_delimiter = ',')]
    chats: Vec<i64>,
    /// Start after this sequence (the cursor a previous run printed last); 0 or absent: from the
    /// oldest retained event.
    #[arg(long)]
    after: Option<u64>,
    /// Bearer token with the `subscribe` scope, when the gateway requires one.
    #[arg(long, env = "IQGW_TOKEN")]
    token: Option<String>,
    /// Exit (status 0) after printing this many events.
    #[arg(long)]
    exit_after: Option<u64>,
}

/// The shortest and longest wait between reconnect attempts.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let channel = Endpoint::from_shared(args.server.clone())?
        .connect_timeout(Duration::from_secs(5))
        // Lazy: the channel connects on first use and reconnects by itself after a failure, so
        // one channel serves every attempt below.
        .connect_lazy();
    let mut client = EventGatewayClient::new(channel);
    let filter = Filter {
        event_types: args.types.clone(),
        chat_ids: args.chats.clone(),
        ..Filter::default()
    };

    let mut cursor = Cursor {
        last: args.after.filter(|&sequence| sequence > 0),
        store: None,
        printed: 0,
    };
    let mut backoff = BACKOFF.0;
    loop {
        let printed_before = cursor.printed;
        let error = match follow(&mut client, &args, &filter, &mut cursor).await {
            End::Done => return Ok(()),
            End::Failed(status) => status,
        };
        if undecodable(&error) {
            // The same event would fail again after a reconnect: stop, saying where.
            let after = cursor
                .last
                .map_or("the start".into(), |s| format!("sequence {s}"));
            anyhow::bail!(
                "the event after {after} cannot be decoded ({}); stopping (its raw JSON: \
                 `iqchannels-gateway get --sequence N`)",
                error.message()
            );
        }
        if is_fatal(error.code()) {
            anyhow::bail!(
                "subscription failed: {:?}: {}",
                error.code(),
                error.message()
            );
        }
        if cursor.printed > printed_before {
            backoff = BACKOFF.0;
        }
        let resume = cursor
            .last
            .map_or("the beginning".into(), |s| format!("sequence {s}"));
        eprintln!(
            "consumer: {:?}: {}; resuming after {resume} in {backoff:?}",
            error.code(),
            error.message()
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF.1);
    }
}

/// What the consumer has handled: where to resume, and how many for `--exit-after`.
struct Cursor {
    /// The sequence of the last event printed; `None` before the first when started without
    /// `--after`. A real service stores it together with the effect of handling the event.
    last: Option<u64>,
    /// The store `last` belongs to (the `iqgw-store` header of the first subscription), sent
    /// back with every resume: a gateway serving another store refuses it.
    store: Option<String>,
    /// Events printed so far.
    printed: u64,
}

/// Why one subscription ended.
enum End {
    /// `--exit-after` events were printed.
    Done,
    /// The stream failed or ended; `follow` again, unless the error is fatal.
    Failed(Status),
}

/// Subscribes once, resuming after `cursor.last`, and prints events until the stream ends.
async fn follow(
    client: &mut EventGatewayClient<Channel>,
    args: &Args,
    filter: &Filter,
    cursor: &mut Cursor,
) -> End {
    let start = match cursor.last {
        Some(sequence) => Start::AfterSequence(sequence),
        None => Start::Beginning(()),
    };
    let request = SubscribeRequest {
        filter: Some(filter.clone()),
        start: Some(start),
        include_raw_json: false,
        include_references: false,
        store: cursor.store.clone().unwrap_or_default(),
    };
    let mut events = match stream(client, request, args.token.as_deref()).await {
        Ok((events, store)) => {
            cursor.store = cursor.store.take().or(store);
            events
        }
        Err(status) => return End::Failed(status),
    };
    loop {
        match events.message().await {
            Ok(Some(event)) => {
                println!("{}", line(&event));
                cursor.last = Some(event.sequence);
                cursor.printed += 1;
                if args.exit_after.is_some_and(|n| cursor.printed >= n) {
                    return End::Done;
                }
            }
            Ok(None) => return End::Failed(Status::unavailable("the stream ended")),
            Err(status) => return End::Failed(status),
        }
    }
}

/// Opens one Subscribe stream.
async fn stream(
    client: &mut EventGatewayClient<Channel>,
    request: SubscribeRequest,
    token: Option<&str>,
) -> Result<(tonic::Streaming<Event>, Option<String>), Status> {
    let mut request = Request::new(request);
    if let Some(token) = token {
        let value = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::invalid_argument("the token is not valid in a header"))?;
        request.metadata_mut().insert("authorization", value);
    }
    let response = client.subscribe(request).await?;
    let store = response
        .metadata()
        .get("iqgw-store")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    Ok((response.into_inner(), store))
}

/// A failure of this client to decode an event (tonic reports it as INTERNAL).
fn undecodable(status: &Status) -> bool {
    status.code() == Code::Internal && status.message().contains("decode")
}

/// Errors that retrying cannot fix.
fn is_fatal(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::OutOfRange
            | Code::FailedPrecondition
            | Code::DataLoss
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::Unimplemented
    )
}

/// `SEQUENCE TYPE chat=CHAT actor=ACTOR`, `-` for what the event lacks.
fn line(event: &Event) -> String {
    let chat_event = event.envelope.as_ref().and_then(|e| e.chat_event.as_ref());
    let kind = chat_event.map_or("-", |c| c.r#type.as_str());
    let chat = chat_event
        .and_then(|c| c.chat_id)
        .map_or("-".to_owned(), |id| id.to_string());
    let actor = chat_event
        .map(|c| c.actor.as_str())
        .filter(|a| !a.is_empty())
        .unwrap_or("-");
    format!("{} {kind} chat={chat} actor={actor}", event.sequence)
}
