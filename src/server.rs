//! Serves one bound listener: HTTP/1.1 and HTTP/2 cleartext (gRPC) on the same port, until the
//! shutdown signal, then drains within a grace period. Bounds what a client can hold: open
//! connections (`max_connections`) and the time a new connection gets to say which protocol it
//! speaks ([`ServerConfig::header_timeout`]).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::auth::{GrpcAuth, IngestAuth, MetricsAuth};
use crate::gateway::{Gateway, GatewayConfig};
use crate::http::HttpConfig;
use crate::log::SharedLog;

/// How long a client may take for the TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The header timeout at most, whatever `request_timeout` is.
const MAX_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// How often, at most, refused connections are logged (with how many since the last line).
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bytes one HTTP/2 stream may buffer for sending (h2's default is 400 KiB).
const STREAM_SEND_BUFFER: usize = 128 << 10;

/// Bytes hyper may buffer from an HTTP/1.1 connection's socket (request heads included: they
/// must fit).
const HTTP1_READ_BUFFER: usize = 64 << 10;

/// The HTTP/2 connection preface a client sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection's reads, watched until they show which protocol the client speaks: a byte that
/// departs from the HTTP/2 preface (HTTP/1.1, whose headers hyper then times itself), or the
/// whole preface (HTTP/2, whose idle peers keepalive pings find). Until then hyper-util's
/// protocol detection waits without a timer, so [`serve_io`] bounds it.
struct Detecting<I> {
    io: I,
    /// Bytes of the preface matched so far.
    matched: usize,
    /// Set once the protocol is known.
    spoke: Arc<AtomicBool>,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Detecting<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if self.matched < H2_PREFACE.len() {
            for &byte in &buf.filled()[before..] {
                if byte != H2_PREFACE[self.matched] {
                    self.matched = H2_PREFACE.len();
                    break;
                }
                self.matched += 1;
                if self.matched == H2_PREFACE.len() {
                    break;
                }
            }
            if self.matched == H2_PREFACE.len() {
                self.spoke.store(true, Ordering::Relaxed);
            }
        }
        polled
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Detecting<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// The connection a request came on: in every request's extensions, so that the subscriptions
/// whose clients stop reading while others wait for the memory they hold can close it, and tell
/// a client that reads slowly from one that reads nothing (see `budget`).
#[derive(Clone)]
pub struct Disconnect(Arc<ConnectionState>);

struct ConnectionState {
    close: tokio::sync::Notify,
    /// The TCP socket (under TLS too), for the kernel's count of bytes its peer acknowledged.
    fd: Option<std::os::fd::RawFd>,
    /// That count when last looked at, and when it last changed (ms since `since`).
    acked: AtomicU64,
    changed_ms: AtomicU64,
    since: tokio::time::Instant,
}

impl Disconnect {
    fn new(fd: Option<std::os::fd::RawFd>) -> Self {
        let state = ConnectionState {
            close: tokio::sync::Notify::new(),
            fd,
            acked: AtomicU64::new(0),
            changed_ms: AtomicU64::new(0),
            since: tokio::time::Instant::now(),
        };
        state
            .acked
            .store(bytes_acked(fd).unwrap_or(0), Ordering::Relaxed);
        Self(Arc::new(state))
    }

    /// Closes the connection (at once: what it had not written is dropped).
    pub fn close(&self) {
        self.0.close.notify_one();
    }

    /// This connection as the budget takes it.
    pub fn evict(&self) -> crate::budget::Evict {
        Arc::new(self.clone())
    }
}

impl crate::budget::Connection for Disconnect {
    fn close(&self) {
        Disconnect::close(self);
    }

    fn took_bytes_within(&self, stall: Duration) -> bool {
        let state = &self.0;
        let Some(acked) = bytes_acked(state.fd) else {
            return false;
        };
        let now_ms = state.since.elapsed().as_millis() as u64;
        if state.acked.swap(acked, Ordering::Relaxed) != acked {
            state.changed_ms.store(now_ms, Ordering::Relaxed);
            return true;
        }
        now_ms.saturating_sub(state.changed_ms.load(Ordering::Relaxed)) < stall.as_millis() as u64
    }
}

/// The bytes the peer of TCP socket `fd` has acknowledged (Linux `TCP_INFO`), `None` elsewhere
/// or when it cannot be read.
#[cfg(target_os = "linux")]
fn bytes_acked(fd: Option<std::os::fd::RawFd>) -> Option<u64> {
    let fd = fd?;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, a plain C struct we own; an fd
    // that is no longer a TCP socket makes it fail (checked), never write elsewhere.
    unsafe {
        let mut info: libc::tcp_info = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        let done = libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        );
        (done == 0 && len as usize >= std::mem::size_of::<libc::tcp_info>())
            .then_some(info.tcpi_bytes_acked)
    }
}

#[cfg(not(target_os = "linux"))]
fn bytes_acked(_: Option<std::os::fd::RawFd>) -> Option<u64> {
    None
}

/// A connection's service: puts its [`Disconnect`] in every request.
#[derive(Clone)]
struct WithDisconnect<S> {
    inner: S,
    disconnect: Disconnect,
}

impl<S, B> hyper::service::Service<http::Request<B>> for WithDisconnect<S>
where
    S: hyper::service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(self.disconnect.clone());
        self.inner.call(request)
    }
}

/// Serves one accepted connection (plain or TLS) until it ends, the drain closes it, or its
/// [`Disconnect`] does. A client that has not shown which protocol it speaks within
/// `first_bytes` is disconnected.
async fn serve_io<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    first_bytes: Duration,
    fd: Option<std::os::fd::RawFd>,
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
    let spoke = Arc::new(AtomicBool::new(false));
    let io = Detecting {
        io,
        matched: 0,
        spoke: spoke.clone(),
    };
    let disconnect = Disconnect::new(fd);
    let service = WithDisconnect {
        inner: service,
        disconnect: disconnect.clone(),
    };
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    let served = watcher.watch(connection.into_owned());
    tokio::pin!(served);
    let closed = disconnect.0.close.notified();
    tokio::pin!(closed);
    tokio::select! {
        result = &mut served => return result,
        _ = &mut closed => return Err(EVICTED.into()),
        _ = tokio::time::sleep(first_bytes) => {}
    }
    if !spoke.load(Ordering::Relaxed) {
        // Dropping the connection closes the socket.
        return Err("no HTTP/1.1 request or HTTP/2 preface in time".into());
    }
    tokio::select! {
        result = &mut served => result,
        // Dropping the connection closes the socket and drops the frames it held.
        _ = &mut closed => Err(EVICTED.into()),
    }
}

/// Why a connection was closed by its [`Disconnect`].
const EVICTED: &str = "closed: a subscriber on it read nothing while others waited for memory";

/// Everything `serve` needs besides the listener.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest HTTP request body (and gRPC request message), in bytes.
    pub max_body_bytes: usize,
    /// Bytes all request bodies being received and handled may hold together (HTTP ingest and
    /// batch bodies, gRPC `EventGateway` messages); beyond it a new body is refused at once.
    pub request_body_memory: usize,
    /// Health and reflection calls open at once; more get RESOURCE_EXHAUSTED.
    pub max_health_reflection_calls: usize,
    /// Largest health or reflection request message, in bytes.
    pub max_health_reflection_message_bytes: usize,
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
    /// How long a client may take to send a request's headers (at most 10 s, see
    /// [`Self::header_timeout`]), and then its body.
    pub request_timeout: Duration,
    /// Open connections at most; a connection accepted beyond it is closed at once.
    pub max_connections: usize,
    /// What webhook senders must present.
    pub ingest_auth: IngestAuth,
    /// gRPC bearer tokens and scopes.
    pub grpc_auth: GrpcAuth,
    /// The token `/metrics` needs; none: open.
    pub metrics_auth: MetricsAuth,
    /// Serve TLS with these files instead of cleartext.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Tolerant (default) or strict decoding of webhook bodies.
    pub decode_policy: crate::decode::Policy,
    /// Bytes all subscribers may hold together outside the live tail: catch-up pages and
    /// events on their way to the socket (`--catch-up-memory`).
    pub catch_up_bytes: usize,
    /// Bytes an event may take as a subscriber receives it (`--max-event-bytes`).
    pub max_event_bytes: usize,
    /// Bytes the live tail holds at most (`--live-buffer-bytes`).
    pub live_buffer_bytes: usize,
    /// Catch-up reads running at once, over all subscribers (`--catch-up-reads`).
    pub catch_up_reads: usize,
    /// How long a subscriber may hold memory without giving any back while others wait for it
    /// before its connection is closed (`--subscriber-stall-timeout`).
    pub subscriber_stall_timeout: Duration,
    /// Threads that decode large bodies at once (`--decode-threads`).
    pub decode_threads: usize,
    /// Large bodies that may wait for a decode thread; more get 429 (`--decode-queue`).
    pub decode_queue: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            request_body_memory: crate::request_budget::DEFAULT_REQUEST_BODY_MEMORY,
            max_health_reflection_calls: crate::grpc::DEFAULT_HEALTH_REFLECTION_CALLS,
            max_health_reflection_message_bytes:
                crate::grpc::DEFAULT_HEALTH_REFLECTION_MESSAGE_BYTES,
            live_buffer: 4096,
            grace: Duration::from_secs(10),
            http2_keepalive: Duration::from_secs(30),
            max_subscribers: 10_000,
            max_in_flight: 1024,
            request_timeout: Duration::from_secs(30),
            max_connections: 10_000,
            ingest_auth: IngestAuth::default(),
            grpc_auth: GrpcAuth::default(),
            metrics_auth: MetricsAuth::default(),
            tls: None,
            decode_policy: crate::decode::Policy::Tolerant,
            catch_up_bytes: crate::subscribe::DEFAULT_CATCH_UP_BYTES,
            max_event_bytes: crate::fit::DEFAULT_MAX_EVENT_BYTES,
            live_buffer_bytes: crate::hub::DEFAULT_LIVE_BYTES,
            catch_up_reads: crate::subscribe::DEFAULT_CATCH_UP_READS,
            subscriber_stall_timeout: crate::budget::DEFAULT_STALL_TIMEOUT,
            decode_threads: crate::decode::pool::default_threads(),
            decode_queue: crate::decode::pool::DEFAULT_QUEUE,
        }
    }
}

impl ServerConfig {
    /// The time a client gets for a request's headers, and a new connection to show which
    /// protocol it speaks (its first HTTP/1.1 bytes or the whole HTTP/2 preface): the request
    /// timeout, at most 10 s.
    pub fn header_timeout(&self) -> Duration {
        self.request_timeout.min(MAX_HEADER_TIMEOUT)
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
        catch_up_bytes: config.catch_up_bytes,
        max_event_bytes: config.max_event_bytes,
        live_buffer_bytes: config.live_buffer_bytes,
        catch_up_reads: config.catch_up_reads,
        subscriber_stall_timeout: config.subscriber_stall_timeout,
        decode_threads: config.decode_threads,
        decode_queue: config.decode_queue,
    };
    let stop_rx_for_tls = stop_rx.clone();
    let gateway = Gateway::new(log, &limits, stop_rx);
    spawn_memory_release(gateway.clone());
    let (held, refused) = gateway.metrics().request_body_metrics();
    let budget = crate::request_budget::BodyBudget::new(config.request_body_memory, held, refused);
    let limits = crate::grpc::GrpcLimits {
        max_message_bytes: config.max_body_bytes,
        health_reflection_message_bytes: config.max_health_reflection_message_bytes,
        health_reflection_calls: config.max_health_reflection_calls,
        budget: budget.clone(),
        message_timeout: config.request_timeout,
    };
    let grpc = crate::grpc::routes(gateway.clone(), limits, config.grpc_auth.clone())?;
    let http = HttpConfig {
        budget,
        max_body_bytes: config.max_body_bytes,
        body_timeout: config.request_timeout,
        auth: config.ingest_auth.clone(),
        subscribe_auth: config.grpc_auth.clone(),
        metrics_auth: config.metrics_auth.clone(),
        max_awaiting_signature: config.max_in_flight,
    };
    let app = crate::http::router(gateway.clone(), http, grpc);
    let service = TowerToHyperService::new(app);

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        // hyper's read buffer of an HTTP/1.1 connection (its default is ~400 KiB): what a
        // connection holds beyond its body's bytes in the budget while the body streams in.
        .max_buf_size(HTTP1_READ_BUFFER)
        .header_read_timeout(config.header_timeout())
        .timer(hyper_util::rt::TokioTimer::new());
    builder
        .http2()
        // What a stream may buffer beyond its flow-control window: a client that stops reading
        // holds this much per stream in HTTP/2, besides its catch-up page.
        .max_send_buf_size(STREAM_SEND_BUFFER)
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
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections.max(1)));
    let mut refused = Refused::default();
    let first_bytes = config.header_timeout();
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
        let Ok(slot) = connections.clone().try_acquire_owned() else {
            // Over the cap: closed at once (dropped), rather than left to wait in the backlog
            // where the client cannot tell a full server from a dead one.
            drop(stream);
            gateway.metrics().connection_refused();
            refused.note(config.max_connections);
            continue;
        };
        let fd = Some(std::os::fd::AsRawFd::as_raw_fd(&stream));
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, %peer, "could not set TCP_NODELAY");
        }
        let (builder, service, watcher, tls, gateway) = (
            builder.clone(),
            service.clone(),
            graceful.watcher(),
            tls.clone(),
            gateway.clone(),
        );
        tokio::spawn(async move {
            gateway.metrics().connection_opened();
            let served = match tls {
                None => serve_io(&builder, stream, service, watcher, first_bytes, fd).await,
                Some(acceptor) => {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                    {
                        Ok(Ok(stream)) => {
                            serve_io(&builder, stream, service, watcher, first_bytes, fd).await
                        }
                        Ok(Err(error)) => Err(error.into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(error) = served {
                tracing::debug!(%error, %peer, "connection ended with an error");
            }
            gateway.metrics().connection_closed();
            drop(slot);
        });
    }

    // Closed before draining: a new connection is refused at once (the client tries another
    // replica) instead of waiting in the backlog until the process exits.
    drop(listener);
    drain(&gateway, &stop_tx, graceful, config.grace).await;
    Ok(())
}

/// Connections refused over the cap since the last log line, logged at most once per
/// [`REFUSED_LOG_INTERVAL`] so that a flood does not become a flood of logs.
#[derive(Default)]
struct Refused {
    since_log: u64,
    logged_at: Option<Instant>,
}

impl Refused {
    fn note(&mut self, max_connections: usize) {
        self.since_log += 1;
        if self
            .logged_at
            .is_some_and(|at| at.elapsed() < REFUSED_LOG_INTERVAL)
        {
            return;
        }
        tracing::warn!(
            refused = self.since_log,
            max_connections,
            "connection limit reached: new connections are closed at once (--max-connections)"
        );
        self.since_log = 0;
        self.logged_at = Some(Instant::now());
    }
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

/// Resolves when the process gets SIGINT or SIGTERM. The handlers are installed here, when it is
/// called, not when the future is first polled: from then on a signal drains instead of killing
/// the process, even one that arrives before the accept loop first waits on it.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let interrupt = signal(SignalKind::interrupt());
        let terminate = signal(SignalKind::terminate());
        async move {
            tokio::select! {
                () = received(interrupt, "SIGINT") => {},
                () = received(terminate, "SIGTERM") => {},
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if let Err(error) = tokio::signal::ctrl_c().await {
                tracing::error!(%error, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Resolves when `signal` arrives; never, if its handler could not be installed.
#[cfg(unix)]
async fn received(signal: std::io::Result<tokio::signal::unix::Signal>, name: &'static str) {
    match signal {
        Ok(mut signal) => {
            signal.recv().await;
        }
        Err(error) => {
            tracing::error!(%error, signal = name, "cannot listen for the signal");
            std::future::pending::<()>().await;
        }
    }
}

/// Convenience for tests and embedders: the address a listener is bound to.
pub fn local_addr(listener: &TcpListener) -> std::io::Result<SocketAddr> {
    listener.local_addr()
}

/// Gives freed memory back to the system once subscribers have left: glibc keeps what many
/// stalled subscribers' pages took (in its arenas) unless asked to trim. Checks every few
/// seconds; trims when the number of subscribers went down.
fn spawn_memory_release(gateway: Gateway) {
    tokio::spawn(async move {
        let mut before = gateway.subscribers();
        let mut interval = tokio::time::interval(Duration::from_secs(3));
        loop {
            interval.tick().await;
            if gateway.is_shutting_down() {
                return;
            }
            let now = gateway.subscribers();
            if now < before {
                release_memory().await;
            }
            before = now;
        }
    });
}

async fn release_memory() {
    let _ = tokio::task::spawn_blocking(crate::decode::pool::trim_heap).await;
}
