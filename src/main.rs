//! The `iqchannels-gateway` binary: parses flags, sets up logging, binds, serves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use iqchannels_gateway::log::embedded::{EmbeddedLog, Retention};
use iqchannels_gateway::log::{memory::MemoryLog, SharedLog};
use iqchannels_gateway::server::{self, ServerConfig};

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
    Serve(ServeArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on; HTTP/1.1 and gRPC (HTTP/2 cleartext) share it.
    #[arg(long, env = "IQGW_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Where events are stored: `embedded` (durable, in --data-dir) or `memory` (lost on exit;
    /// for tests and benchmarks).
    #[arg(long, env = "IQGW_STORE", value_enum, default_value_t = Store::Embedded)]
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
    /// Retention: drop events older than this, e.g. `7d`, `12h` (default: keep).
    #[arg(long, env = "IQGW_RETENTION_MAX_AGE", value_parser = humantime::parse_duration)]
    retention_max_age: Option<Duration>,
    /// Retention: keep at most this many bytes of events (default: no limit).
    #[arg(long, env = "IQGW_RETENTION_MAX_BYTES")]
    retention_max_bytes: Option<u64>,
    /// Largest accepted request body (HTTP) or message (gRPC), in bytes; larger gets 413.
    #[arg(long, env = "IQGW_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    max_body_bytes: usize,
    /// Events held in the live tail; a subscriber further behind reads from the store instead.
    #[arg(long, env = "IQGW_LIVE_BUFFER", default_value_t = 4096)]
    live_buffer: usize,
    /// Seconds in-flight requests get to finish after SIGTERM/SIGINT.
    #[arg(long, env = "IQGW_SHUTDOWN_GRACE_SECS", default_value_t = 10)]
    shutdown_grace_secs: u64,
    /// Log output format.
    #[arg(long, env = "IQGW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum Store {
    /// Durable: an embedded redb file in --data-dir; acknowledged events survive crashes.
    Embedded,
    /// In memory: everything is lost when the process exits.
    Memory,
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
        Command::Serve(args) => serve(args).await,
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let retention = Retention {
        max_events: args.retention_max_events,
        max_age: args.retention_max_age,
        max_bytes: args.retention_max_bytes,
    };
    let log: SharedLog = match args.store {
        Store::Embedded => Arc::new(EmbeddedLog::open_with_cache(
            &args.data_dir,
            retention,
            args.store_cache_bytes,
        )?),
        Store::Memory => Arc::new(MemoryLog::new(retention.max_events.map(|n| n as usize))),
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let config = ServerConfig {
        max_body_bytes: args.max_body_bytes,
        live_buffer: args.live_buffer,
        grace: Duration::from_secs(args.shutdown_grace_secs),
        ..ServerConfig::default()
    };
    server::serve(listener, log, config, server::shutdown_signal()).await?;
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IQGW_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
