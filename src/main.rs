//! The `iqchannels-gateway` binary: parses flags, sets up logging, binds, serves.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
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
    let log: SharedLog = Arc::new(MemoryLog::default());
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
