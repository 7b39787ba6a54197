//! Serves one bound listener: HTTP/1.1 and HTTP/2 cleartext (gRPC) on the same port, until the
//! shutdown signal, then drains within a grace period.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{GrpcAuth, IngestAuth};
use crate::gateway::{Gateway, GatewayConfig};
use crate::http::HttpConfig;
use crate::log::SharedLog;

/// How long a client may take for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Serves one accepted connection (plain or TLS) until it ends or the drain closes it.
async fn serve_io<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), BoxError>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<
            http::Request<hyper::body::Incoming>,
            Response = http::Response<axum::body::Body>,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
{
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    watcher.watch(connection.into_owned()).await
}

/// Everything `serve` needs besides the listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest HTTP request body (and gRPC request message), in bytes.
    pub max_body_bytes: usize,
    /// Events kept in the live tail before a slow subscriber is moved to reading from the log.
    pub live_buffer: usize,
    /// How long in-flight requests may take to finish after the shutdown signal.
    pub grace: Duration,
    /// Interval of HTTP/2 keepalive pings, so dead subscribers are noticed and freed.
    pub http2_keepalive: Duration,
    /// Open Subscribe streams at most; more get RESOURCE_EXHAUSTED.
    pub max_subscribers: usize,
    /// Ingest requests in flight at most; more are shed with 429 / RESOURCE_EXHAUSTED.
    pub max_in_flight: usize,
    /// How long a client may take to send a request's headers, and then its body.
    pub request_timeout: Duration,
    /// What webhook senders must present.
    pub ingest_auth: IngestAuth,
    /// gRPC bearer tokens and scopes.
    pub grpc_auth: GrpcAuth,
    /// Serve TLS with these files instead of cleartext.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Tolerant (default) or strict decoding of webhook bodies.
    pub decode_policy: crate::decode::Policy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            live_buffer: 4096,
            grace: Duration::from_secs(10),
            http2_keepalive: Duration::from_secs(30),
            max_subscribers: 10_000,
            max_in_flight: 1024,
            request_timeout: Duration::from_secs(30),
            ingest_auth: IngestAuth::default(),
            grpc_auth: GrpcAuth::default(),
            tls: None,
            decode_policy: crate::decode::Policy::Tolerant,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The reflection service could not index the descriptors.
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS certificate or key could not be loaded.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Serves `listener` with `log` until `shutdown` resolves, then drains: readiness drops, streams
/// end with UNAVAILABLE, in-flight requests get `config.grace` to finish.
pub async fn serve(
    listener: TcpListener,
    log: SharedLog,
    config: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let limits = GatewayConfig {
        live_buffer: config.live_buffer,
        max_subscribers: config.max_subscribers,
        max_in_flight: config.max_in_flight,
        decode_policy: config.decode_policy,
    };
    let stop_rx_for_tls = stop_rx.clone();
    let gateway = Gateway::new(log, &limits, stop_rx);
    let grpc = crate::grpc::routes(
        gateway.clone(),
        config.max_body_bytes,
        config.grpc_auth.clone(),
    )?;
    let http = HttpConfig {
        max_body_bytes: config.max_body_bytes,
        body_timeout: config.request_timeout,
        auth: config.ingest_auth.clone(),
        subscribe_auth: config.grpc_auth.clone(),
        max_awaiting_signature: config.max_in_flight,
    };
    let app = crate::http::router(gateway.clone(), http, grpc);
    let service = TowerToHyperService::new(app);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .header_read_timeout(config.request_timeout.min(Duration::from_secs(10)))
        .timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        .keep_alive_interval(config.http2_keepalive)
        .keep_alive_timeout(Duration::from_secs(20))
        .timer(hyper_util::rt::TokioTimer::new());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();

    let tls = match config.tls.clone() {
        Some(files) => {
            let (acceptor, cert) = crate::tls::acceptor(files)?;
            crate::tls::spawn_reloader(cert, stop_rx_for_tls);
            Some(acceptor)
        }
        None => None,
    };
    let scheme = if tls.is_some() { "TLS" } else { "cleartext" };
    tracing::info!(address = %listener.local_addr()?, scheme, "listening (HTTP/1.1 and gRPC)");
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait, keep serving.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        let (builder, service, watcher, tls) = (
            builder.clone(),
            service.clone(),
            graceful.watcher(),
            tls.clone(),
        );
        tokio::spawn(async move {
            let served = match tls {
                None => serve_io(&builder, stream, service, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => serve_io(&builder, stream, service, watcher).await,
                        Ok(Err(error)) => Err(error.into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
        });
    }

    drain(&gateway, &stop_tx, graceful, config.grace).await;
    Ok(())
}

async fn drain(
    gateway: &Gateway,
    stop: &watch::Sender<bool>,
    graceful: hyper_util::server::graceful::GracefulShutdown,
    grace: Duration,
) {
    tracing::info!("shutting down: draining connections");
    gateway.start_draining();
    // Give health checkers a moment to see NOT_SERVING before streams end.
    tokio::time::sleep(Duration::from_millis(250).min(grace)).await;
    stop.send_replace(true);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs_f64(),
            "grace period over; closing remaining connections"
        );
    }
}

/// Resolves when the process gets SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}

/// Convenience for tests and embedders: the address a listener is bound to.
pub fn local_addr(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}
