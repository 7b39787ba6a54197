//! The `iqchannels-gateway` binary: parses flags, sets up logging, binds, serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::builder::BoolishValueParser;
use clap::{Parser, Subcommand, ValueEnum};
use iqchannels_gateway::auth::{GrpcAuth, IngestAuth, MetricsAuth};
use iqchannels_gateway::client;
use iqchannels_gateway::log::embedded::EmbeddedLog;
use iqchannels_gateway::log::jetstream::{parse_servers, JetStreamLog, NatsConfig};
use iqchannels_gateway::log::{memory::MemoryLog, Retention, SharedLog};
use iqchannels_gateway::pb::client::{get_event_request, subscribe_request, Filter};
use iqchannels_gateway::server::{self, ServerConfig};
use iqchannels_gateway::tls::TlsFiles;

/// Receives iQChannels webhook events over HTTP and gRPC, stores each once, and streams them
/// typed to gRPC subscribers.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway: HTTP/1.1 (JSON ingest, health) and gRPC on one address.
    Serve(Box<ServeArgs>),
    /// Follow a gateway's events (gRPC Subscribe), reconnecting and resuming by itself.
    Subscribe(Box<SubscribeArgs>),
    /// Send events from files (JSON, JSON array or NDJSON; `-` = stdin) through gRPC Publish.
    Publish(PublishArgs),
    /// Print one stored event, by sequence or by ChatEvent.Id.
    Get(GetArgs),
    /// Check every record of a stopped gateway's embedded store; list the unreadable ones (exit
    /// status 1 if any).
    Verify(StoreArgs),
    /// Write every readable event of a stopped gateway's embedded store as NDJSON of the original
    /// bodies, in order, and report what was skipped (exit status 1 if anything was); post the
    /// output to a new gateway to rebuild the store.
    Export(ExportArgs),
    /// Copy a JetStream stream of the layout of releases before 0.9 (a subject per event) into a
    /// new stream of today's, in order; run again after an interruption, it goes on. Stop the
    /// gateways writing to the old stream first.
    MigrateStream(Box<MigrateArgs>),
}

#[derive(clap::Args)]
struct MigrateArgs {
    /// NATS server(s) of the old stream (`nats://HOST:PORT`, comma separated).
    #[arg(long, env = "IQGW_STORE", value_parser = parse_nats_store)]
    store: String,
    /// The new stream (created if missing, with the flags' settings: --nats-replicas,
    /// --nats-duplicate-window, --retention-max-age); the old one is --nats-stream.
    #[arg(long)]
    to: String,
    /// The new stream's max_age, as the gateways that will serve it are started with.
    #[arg(long, env = "IQGW_RETENTION_MAX_AGE", value_parser = humantime::parse_duration)]
    retention_max_age: Option<Duration>,
    #[command(flatten)]
    nats: NatsArgs,
}

/// Which embedded store (the gateway must not be running on it).
#[derive(clap::Args)]
struct StoreArgs {
    /// Directory of the embedded store.
    #[arg(long, env = "IQGW_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// Write the NDJSON here instead of stdout.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Read the file record by record for checksummed records, without its index (done by
    /// itself when the index cannot be read): for a store whose export skipped much.
    #[arg(long)]
    salvage: bool,
}

/// Where the gateway is, for the client commands.
#[derive(clap::Args)]
struct ConnectArgs {
    /// Gateway address: `http://HOST:PORT` or `https://HOST:PORT`.
    #[arg(long, env = "IQGW_SERVER", default_value = "http://127.0.0.1:8080")]
    server: String,
    /// gRPC bearer token (a `--grpc-token` of the server with the needed scope).
    #[arg(long, env = "IQGW_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// CA certificate (PEM) to verify an https gateway.
    #[arg(long, env = "IQGW_CA_CERT")]
    ca_cert: Option<PathBuf>,
}

impl ConnectArgs {
    fn connection(&self) -> client::Connection {
        client::Connection {
            server: self.server.clone(),
            token: self.token.clone(),
            ca_cert: self.ca_cert.clone(),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    /// Readable lines, coloured on a terminal.
    Lines,
    /// One JSON object per line, in the webhook's own shape.
    Json,
    /// Length-delimited iqchannels.gateway.v1.Event protobuf.
    Proto,
}

impl From<OutputFormat> for client::Output {
    fn from(format: OutputFormat) -> Self {
        match format {
            OutputFormat::Lines => client::Output::Lines,
            OutputFormat::Json => client::Output::Json,
            OutputFormat::Proto => client::Output::Proto,
        }
    }
}

#[derive(clap::Args)]
struct SubscribeArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Only these event types (ChatEvent.Type), e.g. `message_created`; repeatable.
    #[arg(long = "type")]
    types: Vec<String>,
    /// Only events of these chats; repeatable.
    #[arg(long = "chat")]
    chats: Vec<i64>,
    /// Only events of chats in these projects; repeatable.
    #[arg(long = "project")]
    projects: Vec<i64>,
    /// Only events of chats in these channels; repeatable.
    #[arg(long = "channel")]
    channels: Vec<i64>,
    /// Only events of these clients; repeatable.
    #[arg(long = "client")]
    clients: Vec<i64>,
    /// Only events of these users (operators); repeatable.
    #[arg(long = "user")]
    users: Vec<i64>,
    /// Only events by these actors (`client`, `user`, `system`, `` for anonymous); repeatable.
    #[arg(long = "actor")]
    actors: Vec<String>,
    /// Start with the oldest retained event.
    #[arg(long, conflicts_with_all = ["after", "since"])]
    from_beginning: bool,
    /// Start after this sequence (resume with the cursor printed on exit).
    #[arg(long, conflicts_with = "since")]
    after: Option<u64>,
    /// The store the cursor came from (the `store:` line printed on exit beside `cursor:`): a
    /// gateway serving another store (a restored backup, a stream created again) refuses the
    /// resume instead of starting at a sequence that names other events.
    #[arg(long, requires = "after")]
    store_id: Option<String>,
    /// Start with events received at or after this time (RFC 3339, e.g. 2026-11-24T21:00:00Z).
    #[arg(long, value_parser = humantime::parse_rfc3339_weak)]
    since: Option<std::time::SystemTime>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Lines)]
    output: OutputFormat,
    /// Exit after this many events.
    #[arg(long)]
    exit_after: Option<u64>,
    /// Exit on the first error instead of reconnecting.
    #[arg(long)]
    no_reconnect: bool,
    /// Also receive the entities each event points at (chat, message, file, client, user,
    /// channel, project, rating), resolved from Rels by the gateway; `--output json` prints them
    /// under `references`.
    #[arg(long, env = "IQGW_REFERENCES", value_parser = BoolishValueParser::new())]
    references: bool,
}

#[derive(clap::Args)]
struct PublishArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Files with events: one JSON event, a JSON array, or NDJSON; `-` reads stdin.
    #[arg(required = true)]
    files: Vec<String>,
    /// How long to keep resending an event the gateway cannot take for now (busy, its store
    /// unavailable, the gateway unreachable or restarted) before stopping; 0 stops at once.
    #[arg(long, env = "IQGW_RETRY_FOR", default_value = "30s", value_parser = humantime::parse_duration)]
    retry_for: std::time::Duration,
}

#[derive(clap::Args)]
struct GetArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// The event's sequence.
    #[arg(
        long,
        required_unless_present = "event_id",
        conflicts_with = "event_id"
    )]
    sequence: Option<u64>,
    /// The event's ChatEvent.Id.
    #[arg(long)]
    event_id: Option<i64>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Json)]
    output: OutputFormat,
    /// Also receive the entities the event points at, resolved from Rels by the gateway;
    /// `--output json` prints them under `references`.
    #[arg(long, env = "IQGW_REFERENCES", value_parser = BoolishValueParser::new())]
    references: bool,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on, `HOST:PORT` (a name such as `localhost:8080` is resolved, and the
    /// first of its addresses that can be bound is used); HTTP/1.1 and gRPC (HTTP/2 cleartext)
    /// share it.
    #[arg(long, env = "IQGW_LISTEN", default_value = "127.0.0.1:8080")]
    listen: String,
    /// Where events are stored: `embedded` (durable, in --data-dir), `memory` (lost on exit; for
    /// tests and benchmarks) or `nats://HOST:PORT` (a NATS JetStream stream shared by several
    /// gateway replicas; see the --nats-* flags). For a NATS cluster, list its servers separated
    /// by commas, spaces allowed (quote them in a shell):
    /// `nats://nats-1:4222,nats://nats-2:4222,nats://nats-3:4222`; the gateway connects to any
    /// and fails over to the others. `tls://HOST:PORT` entries connect with TLS.
    #[arg(long, env = "IQGW_STORE", default_value = "embedded", value_parser = parse_store)]
    store: Store,
    /// Directory of the embedded store.
    #[arg(long, env = "IQGW_DATA_DIR", default_value = "./data")]
    data_dir: PathBuf,
    /// Memory the embedded store may use as its page cache, in bytes.
    #[arg(long, env = "IQGW_STORE_CACHE_BYTES", default_value_t = iqchannels_gateway::log::embedded::DEFAULT_CACHE_BYTES)]
    store_cache_bytes: usize,
    /// Retention: keep at most this many events (default: all).
    #[arg(long, env = "IQGW_RETENTION_MAX_EVENTS")]
    retention_max_events: Option<u64>,
    /// Retention: drop events received longer ago than this, e.g. `7d`, `12h` (default: keep).
    /// Checked every second, also while nothing is written; on NATS it is the stream's max_age.
    #[arg(long, env = "IQGW_RETENTION_MAX_AGE", value_parser = humantime::parse_duration)]
    retention_max_age: Option<Duration>,
    /// Retention: keep at most this many bytes of events (default: no limit).
    #[arg(long, env = "IQGW_RETENTION_MAX_BYTES")]
    retention_max_bytes: Option<u64>,
    #[command(flatten)]
    nats: NatsArgs,
    /// Largest accepted request body (HTTP) or message (gRPC), in bytes; larger gets 413.
    #[arg(long, env = "IQGW_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// Events held in the live tail; a subscriber further behind reads from the store instead.
    #[arg(long, env = "IQGW_LIVE_BUFFER", default_value_t = 4096)]
    live_buffer: usize,
    /// Bytes held in the live tail at most (with --live-buffer, whichever is reached first): the
    /// oldest events leave it, and a subscriber further behind reads from the store instead. One
    /// larger event is kept alone.
    #[arg(long, env = "IQGW_LIVE_BUFFER_BYTES", default_value_t = iqchannels_gateway::hub::DEFAULT_LIVE_BYTES)]
    live_buffer_bytes: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "IQGW_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    #[command(flatten)]
    security: SecurityArgs,
    #[command(flatten)]
    limits: LimitArgs,
    /// Log output format.
    #[arg(long, env = "IQGW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Bytes that all subscribers (gRPC and SSE) may hold together outside the live tail: the
    /// pages they read from the store and the events on their way to the socket, e.g. while
    /// their clients do not read. When it is spent, catch-up reads wait; one event larger than it
    /// goes alone.
    #[arg(long, env = "IQGW_CATCH_UP_MEMORY", default_value_t = iqchannels_gateway::subscribe::DEFAULT_CATCH_UP_BYTES)]
    catch_up_memory: usize,
    /// Largest event a subscriber receives, in bytes, with every optional field (typed form, raw
    /// JSON, references, deviations): past it the largest opaque values (Options, Fields, ...)
    /// are cut to null at ingest (a `cut` deviation); an event that still does not fit gets 413.
    /// The default is the message limit of stock gRPC clients.
    #[arg(long, env = "IQGW_MAX_EVENT_BYTES", default_value_t = iqchannels_gateway::fit::DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,
    /// Catch-up reads from the store running at once, over all subscribers: catch-up (filtered
    /// or not) never takes more CPU than this many reads, whatever the number of subscribers.
    #[arg(long, env = "IQGW_CATCH_UP_READS", default_value_t = iqchannels_gateway::subscribe::DEFAULT_CATCH_UP_READS)]
    catch_up_reads: usize,
    /// How long a subscriber's client may read nothing while it holds --catch-up-memory that
    /// other subscribers wait for: past it, its connection is closed (the client resumes from
    /// its cursor) so that the others go on. A client that reads, however slowly, is not
    /// closed; nor is one that stalls while nobody waits.
    #[arg(long, env = "IQGW_SUBSCRIBER_STALL_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    subscriber_stall_timeout: Duration,
    /// Refuse (400 / INVALID_ARGUMENT, naming the field path) any body with a field that does not
    /// fit its proto type. Default: such a field is coerced when that loses nothing, else left
    /// unset (the raw JSON keeps it), and reported as a deviation on the event.
    #[arg(long, env = "IQGW_STRICT_DECODE", value_parser = BoolishValueParser::new())]
    strict_decode: bool,
}

/// Who may ingest and subscribe.
#[derive(clap::Args)]
struct SecurityArgs {
    /// Shared token webhook senders must present, as `Authorization: Bearer TOKEN` or as the
    /// `token` query parameter (`/v1/events?token=TOKEN`).
    #[arg(long, env = "IQGW_INGEST_TOKEN", hide_env_values = true)]
    ingest_token: Option<String>,
    /// Standard Webhooks signing secret (`whsec_...`); repeat during a key rotation (env:
    /// space-separated). Requests must then carry a valid `webhook-signature`.
    #[arg(
        long = "webhook-secret",
        env = "IQGW_WEBHOOK_SECRETS",
        value_delimiter = ' ',
        hide_env_values = true
    )]
    webhook_secrets: Vec<String>,
    /// How far a `webhook-timestamp` may be from now.
    #[arg(long, env = "IQGW_WEBHOOK_TOLERANCE", default_value = "5m", value_parser = humantime::parse_duration)]
    webhook_tolerance: Duration,
    /// gRPC bearer token with its scopes, `SCOPES:TOKEN` (scopes: subscribe, publish; e.g.
    /// `subscribe,publish:s3cret`); repeat for several (env: space-separated). Unset: open.
    #[arg(
        long = "grpc-token",
        env = "IQGW_GRPC_TOKENS",
        value_delimiter = ' ',
        hide_env_values = true
    )]
    grpc_tokens: Vec<String>,
    /// TLS certificate chain (PEM) for the shared port; with --tls-key. Reloaded on SIGHUP and
    /// when the file changes.
    #[arg(long, env = "IQGW_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for the shared port; with --tls-cert.
    #[arg(long, env = "IQGW_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Token Prometheus must present to read `/metrics` (`Authorization: Bearer TOKEN`). Unset:
    /// `/metrics` is open to anyone who can reach the port.
    #[arg(long, env = "IQGW_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// Allow listening on a non-loopback address without ingest and gRPC authentication.
    #[arg(long, env = "IQGW_ALLOW_UNAUTHENTICATED", value_parser = BoolishValueParser::new())]
    allow_unauthenticated: bool,
}

/// Limits that keep the gateway up under load and against slow or hostile clients.
#[derive(clap::Args)]
struct LimitArgs {
    /// Ingest requests (HTTP and gRPC Publish) in flight at once; more are shed with 429 /
    /// RESOURCE_EXHAUSTED and `Retry-After`.
    #[arg(long, env = "IQGW_MAX_IN_FLIGHT", default_value_t = 1024)]
    max_in_flight: usize,
    /// Threads that decode bodies over 16 KiB at once (smaller ones are decoded where they
    /// arrive), apart from the threads that serve requests. Default: one per CPU core.
    #[arg(long, env = "IQGW_DECODE_THREADS", default_value_t = iqchannels_gateway::decode::pool::default_threads())]
    decode_threads: usize,
    /// Bodies over 16 KiB that may wait for a decode thread; more are refused at once with 429 /
    /// RESOURCE_EXHAUSTED and `Retry-After`.
    #[arg(long, env = "IQGW_DECODE_QUEUE", default_value_t = iqchannels_gateway::decode::pool::DEFAULT_QUEUE)]
    decode_queue: usize,
    /// Open Subscribe streams at once; more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "IQGW_MAX_SUBSCRIBERS", default_value_t = 10_000)]
    max_subscribers: usize,
    /// Time a client gets to send a request's headers (at most 10s) and then its body (408). A
    /// new connection gets the same header time to send its first request or HTTP/2 preface;
    /// one that has not is closed.
    #[arg(long, env = "IQGW_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    request_timeout: Duration,
    /// Open client connections at once; a connection beyond it is closed as soon as it is
    /// accepted (logged at most every 10s, counted in iqgw_connections_refused_total). Keep it
    /// below the process's file descriptor limit (`ulimit -n`).
    #[arg(long, env = "IQGW_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Interval of HTTP/2 keepalive pings; a peer that does not answer is disconnected.
    #[arg(long, env = "IQGW_HTTP2_KEEPALIVE", default_value = "30s", value_parser = humantime::parse_duration)]
    http2_keepalive: Duration,
    /// Bytes that all request bodies being received and handled may hold together (HTTP ingest
    /// and batch bodies, gRPC EventGateway messages), at least --max-body-bytes. A body is
    /// reserved whole when it starts (its Content-Length or gRPC message length; a chunked body
    /// as it arrives) and given back once answered; one that does not fit is refused at once
    /// with 429 / RESOURCE_EXHAUSTED and Retry-After.
    #[arg(long, env = "IQGW_REQUEST_BODY_MEMORY", default_value_t = iqchannels_gateway::request_budget::DEFAULT_REQUEST_BODY_MEMORY)]
    request_body_memory: usize,
    /// grpc.health.v1 and reflection calls open at once (watches and reflection streams
    /// included); more get RESOURCE_EXHAUSTED.
    #[arg(long, env = "IQGW_MAX_HEALTH_REFLECTION_CALLS", default_value_t = iqchannels_gateway::grpc::DEFAULT_HEALTH_REFLECTION_CALLS)]
    max_health_reflection_calls: usize,
    /// Largest grpc.health.v1 or reflection request message, in bytes; larger gets
    /// RESOURCE_EXHAUSTED naming this flag.
    #[arg(long, env = "IQGW_MAX_HEALTH_REFLECTION_MESSAGE_BYTES", default_value_t = iqchannels_gateway::grpc::DEFAULT_HEALTH_REFLECTION_MESSAGE_BYTES)]
    max_health_reflection_message_bytes: usize,
}

/// The JetStream store's settings (used with `--store nats://...`).
#[derive(clap::Args)]
struct NatsArgs {
    /// JetStream stream name; created if missing, checked for compatibility if present.
    #[arg(long, env = "IQGW_NATS_STREAM", default_value = "IQCHANNELS_EVENTS")]
    nats_stream: String,
    /// Subject prefix; events are published to `<prefix>.e.<ChatEvent.Id mod 16384>`, transitive
    /// ones to `<prefix>.t.0`.
    #[arg(
        long,
        env = "IQGW_NATS_SUBJECT_PREFIX",
        default_value = "iqchannels.events"
    )]
    nats_subject_prefix: String,
    /// Stream replicas (1, 3 or 5 on a cluster); an existing stream must have as many. With 1,
    /// an acknowledged event survives a crash of the NATS machine only if that node has
    /// `sync_interval: always` in its JetStream configuration (see README).
    #[arg(long, env = "IQGW_NATS_REPLICAS", default_value_t = 1)]
    nats_replicas: usize,
    /// JetStream duplicate window, e.g. `1h` (at most --retention-max-age); an existing stream
    /// must have it. A redelivery after it is stored again, as a new event (README).
    #[arg(long, env = "IQGW_NATS_DUPLICATE_WINDOW", default_value = "1h", value_parser = humantime::parse_duration)]
    nats_duplicate_window: Duration,
    /// How long transitive events (typing) are kept on NATS, at most --retention-max-age;
    /// every gateway removes older ones. `0` keeps them as long as other events.
    #[arg(long, env = "IQGW_NATS_TRANSITIVE_MAX_AGE", default_value = "24h", value_parser = humantime::parse_duration)]
    nats_transitive_max_age: Duration,
    /// How long to wait for JetStream's ack before answering 503.
    #[arg(long, env = "IQGW_NATS_ACK_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    nats_ack_timeout: Duration,
    /// Bytes of the newest records kept in memory for the live tail and subscribers close to
    /// the head (the oldest leave first; older records are read from the stream).
    #[arg(long, env = "IQGW_NATS_CACHE_BYTES", default_value_t = iqchannels_gateway::log::jetstream::DEFAULT_CACHE_BYTES)]
    nats_cache_bytes: usize,
    /// NATS credentials file (JWT + nkey seed); read at start (missing: the gateway exits).
    #[arg(long, env = "IQGW_NATS_CREDS")]
    nats_creds: Option<PathBuf>,
    /// NATS user name (with --nats-password).
    #[arg(long, env = "IQGW_NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, env = "IQGW_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS token.
    #[arg(long, env = "IQGW_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// CA certificate (PEM) to verify the NATS server; implies TLS (as --nats-require-tls). Read
    /// at start: a missing or unusable file stops the gateway, naming it.
    #[arg(long, env = "IQGW_NATS_TLS_CA")]
    nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS to NATS (with --nats-tls-key); implies TLS. Read
    /// at start, like the key.
    #[arg(long, env = "IQGW_NATS_TLS_CERT", requires = "nats_tls_key")]
    nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS to NATS.
    #[arg(long, env = "IQGW_NATS_TLS_KEY", requires = "nats_tls_cert")]
    nats_tls_key: Option<PathBuf>,
    /// Refuse to talk to NATS without TLS: a server that does not offer it stops the gateway at
    /// start.
    #[arg(long, env = "IQGW_NATS_REQUIRE_TLS", value_parser = BoolishValueParser::new())]
    nats_require_tls: bool,
}

#[derive(Clone)]
enum Store {
    /// Durable: an embedded redb file in --data-dir; acknowledged events survive crashes.
    Embedded,
    /// In memory: everything is lost when the process exits.
    Memory,
    /// A NATS JetStream stream at these server URLs.
    Nats(String),
}

fn parse_nats_store(value: &str) -> Result<String, String> {
    match parse_store(value)? {
        Store::Nats(list) => Ok(list),
        _ => Err(format!(
            "`{value}`: expected nats://HOST:PORT (a comma-separated list of NATS servers)"
        )),
    }
}

fn parse_store(value: &str) -> Result<Store, String> {
    match value.trim() {
        "embedded" => Ok(Store::Embedded),
        "memory" => Ok(Store::Memory),
        list if list.starts_with("nats://") || list.starts_with("tls://") => {
            parse_servers(list)?;
            Ok(Store::Nats(list.to_owned()))
        }
        other => Err(format!(
            "`{other}`: expected `embedded`, `memory`, `nats://HOST:PORT` or a comma-separated \
             list of NATS servers"
        )),
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Subscribe(args) => subscribe(*args).await,
        Command::Publish(args) => publish(args).await,
        Command::Get(args) => get(args).await,
        Command::MigrateStream(args) => {
            init_logging(LogFormat::Text);
            let config = nats_settings(
                args.store.clone(),
                &args.nats,
                args.retention_max_age,
                usize::MAX,
            )?;
            let migration =
                iqchannels_gateway::log::jetstream::migrate::migrate(&config, &args.to, |copied| {
                    if copied > 0 && copied % 100_000 < 1024 {
                        eprintln!("{copied} records copied");
                    }
                })
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            println!(
                "copied {} records into {} ({}); {} holds sequences up to {}, {} up to {}",
                migration.copied,
                args.to,
                if migration.resumed_after == 0 {
                    "from the start".to_owned()
                } else {
                    format!("going on after sequence {}", migration.resumed_after)
                },
                config.stream,
                migration.source_last,
                args.to,
                migration.target_last
            );
            println!(
                "start the gateways with --nats-stream {}; delete the old stream once it is no \
                 longer needed (`nats stream rm {}`)",
                args.to, config.stream
            );
            Ok(())
        }
        Command::Verify(args) => {
            let report = iqchannels_gateway::admin::verify(&args.data_dir)?;
            print!("{report}");
            if report.unreadable_count() > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Export(args) => {
            let report = match &args.output {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut out = std::io::BufWriter::new(file);
                    let report = iqchannels_gateway::admin::export_or_salvage(
                        &args.store.data_dir,
                        &mut out,
                        args.salvage,
                    )?;
                    std::io::Write::flush(&mut out)?;
                    report
                }
                None => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    let report = iqchannels_gateway::admin::export_or_salvage(
                        &args.store.data_dir,
                        &mut out,
                        args.salvage,
                    )?;
                    std::io::Write::flush(&mut out)?;
                    report
                }
            };
            eprint!("exported: {report}");
            if report.incomplete() {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

async fn subscribe(args: SubscribeArgs) -> anyhow::Result<()> {
    let start = if args.from_beginning {
        Some(subscribe_request::Start::Beginning(()))
    } else if let Some(after) = args.after {
        Some(subscribe_request::Start::AfterSequence(after))
    } else {
        args.since
            .map(|since| subscribe_request::Start::SinceTime(since.into()))
    };
    let options = client::SubscribeOptions {
        filter: Filter {
            event_types: args.types,
            project_ids: args.projects,
            channel_ids: args.channels,
            chat_ids: args.chats,
            client_ids: args.clients,
            user_ids: args.users,
            actors: args.actors,
        },
        start,
        output: args.output.into(),
        exit_after: args.exit_after,
        reconnect: !args.no_reconnect,
        references: args.references,
        store: args.store_id,
    };
    client::subscribe(&args.connect.connection(), options).await?;
    Ok(())
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    let summary = client::publish(&args.connect.connection(), &args.files, args.retry_for).await?;
    let conflicts = if summary.conflicts == 0 {
        String::new()
    } else {
        format!(", conflicts {}", summary.conflicts)
    };
    println!(
        "stored {}, duplicates {}{conflicts}, rejected {}",
        summary.stored, summary.duplicates, summary.rejected
    );
    for place in &summary.conflicts_listed {
        println!(
            "conflict {place}: the gateway has an event with this id and different content; not stored"
        );
    }
    let unlisted = summary.conflicts - summary.conflicts_listed.len() as u64;
    if unlisted > 0 {
        println!(
            "… {unlisted} more conflicts (the first {} are listed)",
            client::LISTED
        );
    }
    for (place, reason) in &summary.rejected_listed {
        println!("rejected {place}: {reason}");
    }
    let unlisted = summary.rejected - summary.rejected_listed.len() as u64;
    if unlisted > 0 {
        println!(
            "… {unlisted} more rejected (the first {} are listed)",
            client::LISTED
        );
    }
    if let Some(stopped) = &summary.stopped {
        println!(
            "stopped at {}: {}; {} not sent",
            stopped.at, stopped.reason, stopped.unsent
        );
    }
    if summary.rejected > 0 || summary.conflicts > 0 || summary.stopped.is_some() {
        std::process::exit(1);
    }
    Ok(())
}

async fn get(args: GetArgs) -> anyhow::Result<()> {
    let key = match (args.sequence, args.event_id) {
        (Some(sequence), _) => get_event_request::Key::Sequence(sequence),
        (None, Some(event_id)) => get_event_request::Key::EventId(event_id),
        (None, None) => anyhow::bail!("give --sequence or --event-id"),
    };
    client::get(
        &args.connect.connection(),
        key,
        args.output.into(),
        args.references,
    )
    .await?;
    Ok(())
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let security = &args.security;
    let ingest_auth = IngestAuth::new(
        security.ingest_token.clone(),
        &security.webhook_secrets,
        security.webhook_tolerance,
    )?;
    let grpc_auth = GrpcAuth::new(&security.grpc_tokens)?;
    let addresses: Vec<SocketAddr> = tokio::net::lookup_host(args.listen.as_str())
        .await
        .with_context(|| format!("cannot resolve --listen {} (HOST:PORT)", args.listen))?
        .collect();
    let open = !ingest_auth.enabled() || !grpc_auth.enabled();
    let loopback = addresses.iter().all(|address| address.ip().is_loopback());
    if open && !loopback && !security.allow_unauthenticated {
        anyhow::bail!(
            "refusing to listen on {} without authentication: set --ingest-token or --webhook-secret, \
             and --grpc-token, or pass --allow-unauthenticated",
            args.listen
        );
    }
    if args.limits.request_body_memory < args.max_body_bytes {
        anyhow::bail!(
            "--request-body-memory ({}) must be at least --max-body-bytes ({}): a body of the \
             largest accepted size must fit",
            args.limits.request_body_memory,
            args.max_body_bytes
        );
    }
    let retention = Retention {
        max_events: args.retention_max_events,
        max_age: args.retention_max_age,
        max_bytes: args.retention_max_bytes,
    };
    let log: SharedLog = match args.store.clone() {
        Store::Embedded => Arc::new(EmbeddedLog::open_with_cache(
            &args.data_dir,
            retention,
            args.store_cache_bytes,
        )?),
        Store::Memory => Arc::new(MemoryLog::with_retention(retention.clone())),
        Store::Nats(url) => {
            Arc::new(JetStreamLog::connect(nats_config(url, &args, &retention)?).await?)
        }
    };
    let listener = tokio::net::TcpListener::bind(addresses.as_slice())
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let config = ServerConfig {
        max_body_bytes: args.max_body_bytes,
        request_body_memory: args.limits.request_body_memory,
        max_health_reflection_calls: args.limits.max_health_reflection_calls,
        max_health_reflection_message_bytes: args.limits.max_health_reflection_message_bytes,
        live_buffer: args.live_buffer,
        grace: Duration::from_secs(args.shutdown_grace_secs),
        http2_keepalive: args.limits.http2_keepalive,
        max_subscribers: args.limits.max_subscribers,
        max_in_flight: args.limits.max_in_flight,
        request_timeout: args.limits.request_timeout,
        catch_up_bytes: args.catch_up_memory,
        max_event_bytes: args.max_event_bytes,
        live_buffer_bytes: args.live_buffer_bytes,
        catch_up_reads: args.catch_up_reads,
        subscriber_stall_timeout: args.subscriber_stall_timeout,
        decode_threads: args.limits.decode_threads,
        decode_queue: args.limits.decode_queue,
        max_connections: args.limits.max_connections,
        decode_policy: if args.strict_decode {
            iqchannels_gateway::decode::Policy::Strict
        } else {
            iqchannels_gateway::decode::Policy::Tolerant
        },
        ingest_auth,
        grpc_auth,
        metrics_auth: MetricsAuth::new(args.security.metrics_token.clone()),
        tls: args
            .security
            .tls_cert
            .clone()
            .zip(args.security.tls_key.clone())
            .map(|(cert, key)| TlsFiles {
                cert,
                key,
                poll: Duration::from_secs(5),
            }),
    };
    // A store replaced under the gateway (a JetStream stream deleted and created again) voids
    // every cursor and cache: stop serving (subscribers resume elsewhere, and are refused there
    // if their cursor came from the old store) and exit with an error, to be started again.
    let mut replaced = log.replaced();
    let reason = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
    let noted = reason.clone();
    let stop = async move {
        let store_replaced = async {
            match replaced.wait_for(Option::is_some).await {
                Ok(why) => why.clone(),
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = server::shutdown_signal() => {}
            why = store_replaced => {
                if let Ok(mut noted) = noted.lock() {
                    *noted = why;
                }
            }
        }
    };
    server::serve(listener, log, config, stop).await?;
    let reason = reason.lock().ok().and_then(|reason| reason.clone());
    if let Some(reason) = reason {
        anyhow::bail!("the store was replaced: {reason}; start the gateway again");
    }
    Ok(())
}

fn nats_config(
    url: String,
    serve: &ServeArgs,
    retention: &Retention,
) -> anyhow::Result<NatsConfig> {
    let args = &serve.nats;
    if retention.max_events.is_some() || retention.max_bytes.is_some() {
        anyhow::bail!(
            "with a NATS store, retention is by age only (--retention-max-age): count and byte limits \
             would make JetStream refuse new events once full"
        );
    }
    nats_settings(url, args, retention.max_age, serve.max_body_bytes)
}

/// The JetStream settings the flags give.
fn nats_settings(
    url: String,
    args: &NatsArgs,
    max_age: Option<Duration>,
    max_body_bytes: usize,
) -> anyhow::Result<NatsConfig> {
    let max_age = max_age.unwrap_or_default();
    // Past the stream's max_age, JetStream removes transitive events with every other.
    let transitive_max_age = if !max_age.is_zero() && args.nats_transitive_max_age >= max_age {
        Duration::ZERO
    } else {
        args.nats_transitive_max_age
    };
    Ok(NatsConfig {
        stream: args.nats_stream.clone(),
        subject_prefix: args.nats_subject_prefix.clone(),
        replicas: args.nats_replicas,
        duplicate_window: args.nats_duplicate_window,
        max_age,
        transitive_max_age,
        ack_timeout: args.nats_ack_timeout,
        cache_bytes: args.nats_cache_bytes,
        credentials_file: args.nats_creds.clone(),
        user: args.nats_user.clone(),
        password: args.nats_password.clone(),
        token: args.nats_token.clone(),
        tls_ca: args.nats_tls_ca.clone(),
        tls_client: args.nats_tls_cert.clone().zip(args.nats_tls_key.clone()),
        require_tls: args.nats_require_tls,
        max_body_bytes,
        ..NatsConfig::new(url)
    })
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IQGW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal, never in a file or a log collector.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
