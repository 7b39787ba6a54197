//! Ingest benchmark, all in one run, each figure beside its baseline:
//!
//! - HTTP/1.1 `POST /v1/events` with keep-alive on the gateway's in-memory store vs a bare hyper
//!   server that reads the body and answers 200 (the ingest CPU cost), and vs the same bare server
//!   that also decodes the body (the ceiling of any server that must parse what it stores);
//! - the same over HTTP/2 cleartext (prior-knowledge h2c) vs HTTP/1.1;
//! - the embedded durable store (fsync before ack, on the real disk) vs the in-memory store, with
//!   records per sync;
//! - `POST /v1/events:batch` with 100 events a request (events/s) vs `decode::decode` alone on the
//!   same items, in a loop on as many threads as the server has workers,
//!
//! at 1, 8, 32 and 128 connections (one request at a time on each), `--runs` times; the recorded
//! figures are the medians. Prints requests/s, p50/p99 latency, records per sync, the CPU used by
//! the server, the load generator and the rest of the machine, and the ratios against the targets
//! of issue 6; draws throughput and p99 against connections (`docs/ingest.svg`).
//!
//! `cargo bench --bench ingest [-- --seconds 5] [--runs 3] [--quick] [--no-pin]`; see `--help`.
//!
//! The server and the load generator run in this one process, on two tokio runtimes whose threads
//! are named `gw-server` and `gw-load` (the CPU columns sum `/proc/self/task` by those names).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use iqchannels_gateway::log::embedded::{EmbeddedLog, Retention, WriterStats};
use iqchannels_gateway::log::memory::MemoryLog;
use iqchannels_gateway::log::SharedLog;
use iqchannels_gateway::server::{serve, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

mod common;
use common::cpu::{Cpu, CpuTimes, Runtimes, LOAD_THREADS, SERVER_THREADS};
use common::{data_parent, is_tmpfs, median, Template, BATCH};

/// What the bare baseline answers, byte for byte what the gateway answers for a new event.
const BARE_REPLY: &[u8] = br#"{"sequence":1,"duplicate":false}"#;
/// Records the in-memory store keeps (the oldest go first), so long runs stay within memory.
const MEMORY_RECORDS: usize = 20_000;
/// Events the durable store keeps (`--retention-max-events`; about 280 MB of file). Retention
/// deletes the oldest in the same commit, as in production, and redb reuses their pages, so the
/// file stops growing. A store that grows by gigabytes keeps asking this VM for fresh page-cache
/// pages, and the kernel's copy into them (`copy_folio_from_iter_atomic`) went from 2% to 18% of
/// the samples, whatever the gateway did.
const DURABLE_RECORDS: u64 = 50_000;

const USAGE: &str = "\
ingest benchmark: the gateway's ingest beside its baselines (bare hyper, bare hyper with
decode, HTTP/1.1, the in-memory store, decode alone), at 1, 8, 32 and 128 connections

usage: cargo bench --bench ingest [-- OPTIONS]

  --seconds S   measured seconds per point (default 5; 0.5 with --quick)
  --runs N      repeat the whole measurement N times and record the medians (default 3;
                1 with --quick)
  --quick       smoke run: 0.5 s per point, 1 and 32 connections, one run (the default
                when run without --bench, i.e. by `cargo test --all-targets`)
  --levels LIST connection counts (comma-separated; default 1,8,32,128; 1,32 with --quick)
  --no-pin      let both runtimes use every CPU; by default, with two CPUs or more, the
                server runtime runs on CPU 0 and the load generator on CPU 1 (one worker
                thread each), so they do not compete for a core
  --pin         the default; kept for older command lines
  --only LIST   measure only these rows (comma-separated: bare-hyper, bare-h2, bare-decode,
                memory, memory-h2, embedded, batch, decode-only), e.g. to profile one of them
  --plot PATH   where the SVG of throughput and p99 against connections goes (default
                docs/ingest.svg on a full run with every row; none otherwise)
  --help        this text";

struct Options {
    seconds: f64,
    runs: usize,
    quick: bool,
    pin: bool,
    only: Option<Vec<Target>>,
    levels: Option<Vec<usize>>,
    plot: Option<PathBuf>,
}

fn parse_options() -> Result<Options, String> {
    let mut seconds = None;
    let mut runs = None;
    // `cargo bench` passes `--bench`; without it (`cargo test --all-targets`) this is a smoke run
    // so the benchmark never rots and never slows the test suite down.
    let mut quick = !std::env::args().any(|arg| arg == "--bench");
    let mut pin = true;
    let mut only = None;
    let mut levels = None;
    let mut plot = None;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().ok_or("--seconds needs a value")?;
                let parsed: f64 = value
                    .parse()
                    .map_err(|_| format!("--seconds: not a number: {value}"))?;
                if !(parsed > 0.0 && parsed.is_finite()) {
                    return Err(format!("--seconds must be positive, got {value}"));
                }
                seconds = Some(parsed);
            }
            "--runs" => {
                let value = args.next().ok_or("--runs needs a value")?;
                let parsed: usize = value
                    .parse()
                    .map_err(|_| format!("--runs: not a whole number: {value}"))?;
                if parsed == 0 {
                    return Err("--runs must be at least 1".to_owned());
                }
                runs = Some(parsed);
            }
            "--only" => {
                let value = args.next().ok_or("--only needs a list")?;
                let targets = value
                    .split(',')
                    .map(|name| {
                        Target::ALL
                            .into_iter()
                            .find(|target| target.name() == name.trim())
                            .ok_or(format!("--only: unknown row {name:?}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                only = Some(targets);
            }
            "--levels" => {
                let value = args.next().ok_or("--levels needs a list")?;
                let parsed = value
                    .split(',')
                    .map(|level| match level.trim().parse::<usize>() {
                        Ok(n) if n > 0 => Ok(n),
                        _ => Err(format!("--levels: not a positive whole number: {level:?}")),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                levels = Some(parsed);
            }
            "--plot" => plot = Some(PathBuf::from(args.next().ok_or("--plot needs a path")?)),
            "--quick" => quick = true,
            "--pin" => pin = true,
            "--no-pin" => pin = false,
            // `cargo bench` passes this to every bench binary.
            "--bench" => {}
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(Options {
        seconds: seconds.unwrap_or(if quick { 0.5 } else { 5.0 }),
        runs: runs.unwrap_or(if quick { 1 } else { 3 }),
        quick,
        pin,
        // A full run of every row draws the plot of BENCHMARKS.md unless told otherwise.
        plot: plot.or_else(|| {
            (!quick && only.is_none())
                .then(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/ingest.svg")))
        }),
        only,
        levels,
    })
}

/// One row of the table: what is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Bare,
    BareH2,
    BareDecode,
    Memory,
    MemoryH2,
    Embedded,
    Batch,
    DecodeOnly,
}

impl Target {
    const ALL: [Target; 8] = [
        Target::Bare,
        Target::BareH2,
        Target::BareDecode,
        Target::Memory,
        Target::MemoryH2,
        Target::Embedded,
        Target::Batch,
        Target::DecodeOnly,
    ];

    fn name(self) -> &'static str {
        match self {
            Target::Bare => "bare-hyper",
            Target::BareH2 => "bare-h2",
            Target::BareDecode => "bare-decode",
            Target::Memory => "memory",
            Target::MemoryH2 => "memory-h2",
            Target::Embedded => "embedded",
            Target::Batch => "batch",
            Target::DecodeOnly => "decode-only",
        }
    }

    /// The server this row talks to (`None`: no server).
    fn server(self) -> Option<ServerKind> {
        match self {
            Target::Bare => Some(ServerKind::Bare),
            Target::BareH2 => Some(ServerKind::BareH2),
            Target::BareDecode => Some(ServerKind::BareDecode),
            Target::Memory | Target::MemoryH2 | Target::Batch => Some(ServerKind::Memory),
            Target::Embedded => Some(ServerKind::Embedded),
            Target::DecodeOnly => None,
        }
    }

    fn http2(self) -> bool {
        matches!(self, Target::MemoryH2 | Target::BareH2)
    }

    /// Events in one request.
    fn events_per_request(self) -> usize {
        if self == Target::Batch {
            BATCH
        } else {
            1
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ServerKind {
    Bare,
    BareH2,
    BareDecode,
    Memory,
    Embedded,
}

/// One server under test, running on the server runtime.
struct Server {
    kind: ServerKind,
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// The durable store, for its writer statistics.
    embedded: Option<Arc<EmbeddedLog>>,
}

fn start(rt: &Runtime, kind: ServerKind, data_dir: &Path) -> Server {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("the listener's address");
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let config = ServerConfig {
        grace: Duration::from_secs(2),
        ..ServerConfig::default()
    };
    let (log, embedded): (Option<SharedLog>, _) = match kind {
        ServerKind::Bare | ServerKind::BareH2 | ServerKind::BareDecode => (None, None),
        ServerKind::Memory => (Some(Arc::new(MemoryLog::new(Some(MEMORY_RECORDS)))), None),
        ServerKind::Embedded => {
            // The writer task is spawned on the current runtime.
            let _context = rt.enter();
            let log = Arc::new(
                EmbeddedLog::open(
                    data_dir,
                    Retention {
                        max_events: Some(DURABLE_RECORDS),
                        ..Retention::default()
                    },
                )
                .expect("the embedded store opens in the bench data dir"),
            );
            (Some(log.clone() as SharedLog), Some(log))
        }
    };
    let task = match log {
        None => rt.spawn(bare_server(listener, kind, shutdown)),
        Some(log) => rt.spawn(async move {
            if let Err(error) = serve(listener, log, config, shutdown).await {
                eprintln!("gateway failed: {error}");
            }
        }),
    };
    Server {
        kind,
        addr,
        stop,
        task,
        embedded,
    }
}

fn stop(rt: &Runtime, server: Server) {
    let _ = server.stop.send(());
    rt.block_on(async {
        if tokio::time::timeout(Duration::from_secs(10), server.task)
            .await
            .is_err()
        {
            eprintln!("server did not stop within 10 s; going on");
        }
    });
}

/// The baseline: hyper's HTTP/1.1 server reading the whole body and answering a fixed 200.
/// `BareH2`: the same over HTTP/2 (h2c), what hyper's HTTP/2 costs beside its HTTP/1.1.
/// `BareDecode`: it also decodes the body as the gateway does (and answers 400 if it does not
/// decode), the most any server can do that must parse the events it takes.
async fn bare_server(
    listener: TcpListener,
    kind: ServerKind,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let decode = kind == ServerKind::BareDecode;
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    eprintln!("bare server: accept failed: {error}");
                    continue;
                }
            },
            _ = &mut shutdown => return,
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<Incoming>| async move {
                    let body = request.into_body().collect().await?.to_bytes();
                    let mut response = Response::new(Full::new(Bytes::from_static(BARE_REPLY)));
                    if decode && iqchannels_gateway::decode::decode(&body).is_err() {
                        *response.status_mut() = StatusCode::BAD_REQUEST;
                    }
                    response
                        .headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    Ok::<_, hyper::Error>(response)
                });
            let io = TokioIo::new(stream);
            let _ = if kind == ServerKind::BareH2 {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, service)
                    .await
            } else {
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
            };
        });
    }
}

/// One client connection: HTTP/1.1, or HTTP/2 with prior knowledge (h2c).
enum Connection {
    Http1(http1::SendRequest<Full<Bytes>>),
    Http2(http2::SendRequest<Full<Bytes>>),
}

impl Connection {
    async fn open(addr: SocketAddr, http2: bool) -> Self {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the server");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let io = TokioIo::new(stream);
        if http2 {
            let (sender, connection) = http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("HTTP/2 handshake");
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Self::Http2(sender)
        } else {
            let (sender, connection) = http1::handshake(io).await.expect("HTTP/1.1 handshake");
            tokio::spawn(async move {
                let _ = connection.await;
            });
            Self::Http1(sender)
        }
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> hyper::Result<Response<Incoming>> {
        match self {
            Self::Http1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Self::Http2(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
        }
    }
}

/// What one connection saw in one phase.
struct ConnectionResult {
    connection: Connection,
    latency_us: Histogram<u64>,
    requests: u64,
    failures: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// What every request of a phase shares.
#[derive(Clone)]
struct Load {
    target: Target,
    /// `/v1/events` or `/v1/events:batch`, absolute for HTTP/2 (it sends the authority).
    uri: Uri,
    host: HeaderValue,
    template: Arc<Template>,
    ids: Arc<AtomicI64>,
}

impl Load {
    fn new(
        target: Target,
        addr: SocketAddr,
        template: &Arc<Template>,
        ids: &Arc<AtomicI64>,
    ) -> Self {
        let path = if target == Target::Batch {
            "/v1/events:batch"
        } else {
            "/v1/events"
        };
        let uri = if target.http2() {
            format!("http://{addr}{path}")
        } else {
            path.to_owned()
        };
        Self {
            target,
            uri: uri.parse().expect("a valid URI"),
            host: HeaderValue::from_str(&addr.to_string()).expect("an address is a valid Host"),
            template: template.clone(),
            ids: ids.clone(),
        }
    }

    fn request(&self) -> Request<Full<Bytes>> {
        let events = self.target.events_per_request();
        let id = self.ids.fetch_add(events as i64, Ordering::Relaxed);
        let body = if self.target == Target::Batch {
            self.template.batch(id)
        } else {
            self.template.body(id)
        };
        let mut request = Request::post(self.uri.clone())
            .body(Full::new(body))
            .expect("a valid request");
        let headers = request.headers_mut();
        if !self.target.http2() {
            headers.insert(HOST, self.host.clone());
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        request
    }

    /// Whether the answer says every event of the request was stored now.
    fn stored(&self, status: StatusCode, body: &[u8]) -> bool {
        let expected: &[u8] = if self.target == Target::Batch {
            b"\"stored\":100,"
        } else {
            b"\"duplicate\":false"
        };
        status == StatusCode::OK && body.windows(expected.len()).any(|w| w == expected)
    }
}

/// Sends requests one after another on one connection until `until`.
async fn drive(mut connection: Connection, load: Load, until: Instant) -> ConnectionResult {
    let mut latency_us = histogram();
    let mut requests = 0;
    let mut failures = 0;
    while Instant::now() < until {
        let request = load.request();
        let started = Instant::now();
        let response = connection.send(request).await.expect("the server answers");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the response body arrives")
            .to_bytes();
        let elapsed = started.elapsed();

        requests += 1;
        if !load.stored(status, &body) {
            failures += 1;
            if failures == 1 {
                let text = String::from_utf8_lossy(&body);
                eprintln!(
                    "unexpected answer: {status} {}",
                    text.chars().take(300).collect::<String>()
                );
            }
        }
        latency_us.saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }
    ConnectionResult {
        connection,
        latency_us,
        requests,
        failures,
    }
}

/// One phase on every connection; the connections come back for the next phase.
async fn phase(
    connections: Vec<Connection>,
    load: &Load,
    length: Duration,
) -> Vec<ConnectionResult> {
    let until = Instant::now() + length;
    let tasks: Vec<_> = connections
        .into_iter()
        .map(|connection| tokio::spawn(drive(connection, load.clone(), until)))
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("a load task panicked"));
    }
    results
}

/// One row of one run.
#[derive(Clone)]
struct Point {
    target: Target,
    connections: usize,
    /// Requests/s (events/s for `batch` and `decode-only`).
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    failures: u64,
    records_per_sync: Option<f64>,
    /// Cores busy during the measured seconds.
    cpu: Cpu,
}

/// The phases' lengths, and what the rows share.
struct Plan {
    warmup: Duration,
    length: Duration,
    template: Arc<Template>,
    ids: Arc<AtomicI64>,
}

fn measure(
    load_rt: &Runtime,
    server: &Server,
    target: Target,
    connections: usize,
    plan: &Plan,
) -> Point {
    load_rt.block_on(async {
        let load = Load::new(target, server.addr, &plan.template, &plan.ids);
        let mut opened = Vec::with_capacity(connections);
        for _ in 0..connections {
            opened.push(Connection::open(server.addr, target.http2()).await);
        }
        let warm = phase(opened, &load, plan.warmup).await;
        let opened = warm.into_iter().map(|result| result.connection).collect();

        let stats_before = server.embedded.as_ref().map(|log| snapshot(log.stats()));
        let cpu_before = CpuTimes::now();
        let started = Instant::now();
        let results = phase(opened, &load, plan.length).await;
        let elapsed = started.elapsed().as_secs_f64();
        let cpu = CpuTimes::now().busy_since(cpu_before, elapsed);
        let stats_after = server.embedded.as_ref().map(|log| snapshot(log.stats()));

        let mut latency_us = histogram();
        let mut requests = 0;
        let mut failures = 0;
        for result in &results {
            latency_us
                .add(&result.latency_us)
                .expect("histograms with the same bounds add");
            requests += result.requests;
            failures += result.failures;
        }
        // Dropping the senders closes the connections.
        drop(results);

        let records_per_sync = match (stats_before, stats_after) {
            (Some((syncs0, records0)), Some((syncs1, records1))) if syncs1 > syncs0 => {
                Some((records1 - records0) as f64 / (syncs1 - syncs0) as f64)
            }
            _ => None,
        };
        Point {
            target,
            connections,
            rate: (requests as usize * target.events_per_request()) as f64 / elapsed,
            p50_ms: latency_us.value_at_quantile(0.50) as f64 / 1000.0,
            p99_ms: latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            failures,
            records_per_sync,
            cpu,
        }
    })
}

/// The batch baseline: `decode::decode` on the items of one batch, round and round, on `threads`
/// threads (as many as the server runtime has workers, pinned the same way); events/s.
fn decode_only(threads: usize, cpu: Option<usize>, plan: &Plan) -> Point {
    let batch = plan.template.batch(1);
    let items: Vec<&serde_json::value::RawValue> =
        serde_json::from_slice(&batch).expect("the batch is a JSON array");
    let items: Arc<Vec<Bytes>> = Arc::new(
        items
            .into_iter()
            .map(|item| batch.slice_ref(item.get().as_bytes()))
            .collect(),
    );
    let run = |length: Duration| {
        let until = Instant::now() + length;
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let items = items.clone();
                std::thread::Builder::new()
                    .name(SERVER_THREADS.to_owned())
                    .spawn(move || {
                        if let Some(cpu) = cpu {
                            common::cpu::pin_current_thread(cpu);
                        }
                        let mut decoded = 0u64;
                        while Instant::now() < until {
                            for item in items.iter() {
                                let envelope = iqchannels_gateway::decode::decode(item)
                                    .expect("the fixture decodes");
                                std::hint::black_box(envelope);
                            }
                            decoded += items.len() as u64;
                        }
                        decoded
                    })
                    .expect("a decode thread")
            })
            .collect();
        // The CPU columns read /proc/self/task: sample before the threads end.
        std::thread::sleep(length.saturating_sub(Duration::from_millis(20)));
        let cpu = CpuTimes::now();
        let decoded: u64 = workers
            .into_iter()
            .map(|worker| worker.join().expect("a decode thread panicked"))
            .sum();
        (decoded, cpu)
    };
    run(plan.warmup);
    let cpu_before = CpuTimes::now();
    let started = Instant::now();
    let (decoded, cpu_after) = run(plan.length);
    let elapsed = started.elapsed().as_secs_f64();
    let sampled = elapsed - 0.02;
    Point {
        target: Target::DecodeOnly,
        connections: 0,
        rate: decoded as f64 / elapsed,
        p50_ms: f64::NAN,
        p99_ms: f64::NAN,
        failures: 0,
        records_per_sync: None,
        cpu: cpu_after.busy_since(cpu_before, sampled),
    }
}

fn snapshot(stats: &WriterStats) -> (u64, u64) {
    (
        stats.syncs.load(Ordering::Relaxed),
        stats.records.load(Ordering::Relaxed),
    )
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    common::init_logging();
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let runtimes = Runtimes::new(options.pin);
    let (server_rt, load_rt, workers, pin) = (
        &runtimes.server,
        &runtimes.load,
        runtimes.workers,
        runtimes.pinned,
    );

    let levels: Vec<usize> = options.levels.clone().unwrap_or_else(|| {
        if options.quick {
            vec![1, 32]
        } else {
            vec![1, 8, 32, 128]
        }
    });
    let levels = levels.as_slice();
    let targets: Vec<Target> = options.only.clone().unwrap_or(Target::ALL.to_vec());
    let plan = Plan {
        length: Duration::from_secs_f64(options.seconds),
        warmup: Duration::from_secs_f64((options.seconds / 5.0).min(1.0)),
        template: Arc::new(Template::load()),
        ids: Arc::new(AtomicI64::new(1_000_000_000)),
    };
    let data = tempfile::Builder::new()
        .prefix("ingest-bench-")
        .tempdir_in(data_parent())
        .expect("a temp dir for the embedded store");
    print_header(&options, &plan, cpus, &runtimes, data.path());

    // Every server runs all along and each level measures them back to back, so the ratios
    // compare points taken within seconds of each other on a machine whose load drifts.
    let mut kinds: Vec<ServerKind> = Vec::new();
    for kind in targets.iter().filter_map(|target| target.server()) {
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let servers: Vec<Server> = kinds
        .into_iter()
        .map(|kind| start(server_rt, kind, &data.path().join("events")))
        .collect();
    let mut runs: Vec<Vec<Point>> = Vec::with_capacity(options.runs);
    for run in 1..=options.runs {
        let mut points = Vec::new();
        for &connections in levels {
            for &target in &targets {
                let Some(kind) = target.server() else {
                    continue;
                };
                let Some(index) = servers.iter().position(|server| server.kind == kind) else {
                    continue;
                };
                let server = &servers[index];
                let point = measure(load_rt, server, target, connections, &plan);
                eprintln!(
                    "run {run}: {:<11} {:>4} connections: {:>8.0} {}/s",
                    target.name(),
                    connections,
                    point.rate,
                    unit(target)
                );
                points.push(point);
            }
        }
        if targets.contains(&Target::DecodeOnly) {
            let point = decode_only(workers, pin.then_some(0), &plan);
            eprintln!(
                "run {run}: {:<11} {workers} threads:   {:>8.0} events/s",
                Target::DecodeOnly.name(),
                point.rate
            );
            points.push(point);
        }
        runs.push(points);
    }
    for server in servers {
        stop(server_rt, server);
    }

    print_figures(&runs, workers);
    print_ratios(&runs, levels);
    if let Some(path) = &options.plot {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::write(path, plot(&runs, levels)) {
            Ok(()) => println!("\nplot: {}", path.display()),
            Err(error) => eprintln!("cannot write {}: {error}", path.display()),
        }
    }
    let failures: u64 = runs.iter().flatten().map(|point| point.failures).sum();
    if failures > 0 {
        eprintln!("{failures} requests did not get 200 with every event stored as new");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn unit(target: Target) -> &'static str {
    match target {
        Target::Batch | Target::DecodeOnly => "events",
        _ => "req",
    }
}

fn print_header(options: &Options, plan: &Plan, cpus: usize, runtimes: &Runtimes, data: &Path) {
    println!("# ingest benchmark: POST /v1/events and /v1/events:batch, keep-alive, one request at a time per connection");
    println!(
        "# body: ../shared/fixtures/chat_closed.json ({} bytes) with a unique ChatEvent.Id per event; \
         batch: {BATCH} of them in a JSON array ({} bytes)",
        plan.template.body(1_000_000_000).len(),
        plan.template.batch(1_000_000_000).len()
    );
    println!(
        "# {} run(s); {} s measured per point after {} s warm-up; CPUs: {cpus}",
        options.runs,
        options.seconds,
        plan.warmup.as_secs_f64()
    );
    println!(
        "# server and load generator share this one process (tokio runtimes `{SERVER_THREADS}` and `{LOAD_THREADS}`); {}",
        runtimes.describe()
    );
    println!(
        "# embedded store in {} ({})",
        data.display(),
        if is_tmpfs(data) {
            "WARNING: tmpfs, fsync is free"
        } else {
            "not tmpfs: fsync reaches the disk"
        }
    );
    println!(
        "# CPU columns: cores busy during the measured seconds (1.00 = one core); server busy = \
         server CPU / server workers; other = the rest of the machine: other processes, and kernel \
         threads flushing our writes (embedded); high values from other processes skew a point"
    );
}

/// The run whose rate is the median of the runs' rates for this row (the lower one of the middle
/// two for an even number of runs).
fn median_point(runs: &[Vec<Point>], target: Target, connections: usize) -> Option<Point> {
    let mut points: Vec<&Point> = runs
        .iter()
        .flatten()
        .filter(|point| point.target == target && point.connections == connections)
        .collect();
    points.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    points
        .get((points.len().max(1) - 1) / 2)
        .map(|point| (*point).clone())
}

fn print_figures(runs: &[Vec<Point>], workers: usize) {
    let mut rows: Vec<(Target, usize)> = runs
        .iter()
        .flatten()
        .map(|point| (point.target, point.connections))
        .collect();
    rows.sort();
    rows.dedup();
    println!();
    println!(
        "Figures: for each row, the run with the median rate of {} run(s).",
        runs.len()
    );
    println!();
    println!(
        "| row         | conns |   rate/s | unit   | p50 ms | p99 ms | rec/sync | server CPU | server busy | loadgen CPU | other CPU | bound by |"
    );
    println!(
        "|-------------|------:|---------:|--------|-------:|-------:|---------:|-----------:|------------:|------------:|----------:|----------|"
    );
    for (target, connections) in rows {
        let Some(point) = median_point(runs, target, connections) else {
            continue;
        };
        let per_sync = point
            .records_per_sync
            .map_or_else(|| "-".to_owned(), |value| format!("{value:.1}"));
        let ms = |value: f64| {
            if value.is_finite() {
                format!("{value:.3}")
            } else {
                "-".to_owned()
            }
        };
        let conns = if target == Target::DecodeOnly {
            "-".to_owned()
        } else {
            connections.to_string()
        };
        println!(
            "| {:<11} | {:>5} | {:>8.0} | {:<6} | {:>6} | {:>6} | {:>8} | {:>10.2} | {:>10.0}% | {:>11.2} | {:>9.2} | {:<8} |",
            target.name(),
            conns,
            point.rate,
            unit(target),
            ms(point.p50_ms),
            ms(point.p99_ms),
            per_sync,
            point.cpu.server,
            100.0 * point.cpu.server / workers as f64,
            point.cpu.load,
            point.cpu.others,
            bound_by(&point, workers)
        );
    }
    println!(
        "\nbound by: server = its CPU was at least 90% busy (the figure is the server's); loadgen = the \
         load generator was (the server could do more); wait = neither (round trips, fsync)"
    );
}

/// What held a point's rate back: the server's CPU, the load generator's, or neither.
fn bound_by(point: &Point, workers: usize) -> &'static str {
    if point.cpu.server >= 0.9 * workers as f64 {
        "server"
    } else if point.target != Target::DecodeOnly && point.cpu.load >= 0.9 * workers as f64 {
        "loadgen"
    } else {
        "wait"
    }
}

fn print_ratios(runs: &[Vec<Point>], levels: &[usize]) {
    // (name, target, numerator, denominator): the denominator of decode-only has no connections.
    let ratios: [(&str, &str, Target, Target); 7] = [
        (
            "memory / bare-hyper",
            ">= 0.6",
            Target::Memory,
            Target::Bare,
        ),
        (
            "bare-decode / bare-hyper",
            "ceiling",
            Target::BareDecode,
            Target::Bare,
        ),
        (
            "memory / bare-decode",
            "-",
            Target::Memory,
            Target::BareDecode,
        ),
        (
            "h2 / h1 (memory)",
            ">= 0.85",
            Target::MemoryH2,
            Target::Memory,
        ),
        (
            "h2 / h1 (bare)",
            "hyper alone",
            Target::BareH2,
            Target::Bare,
        ),
        (
            "durable / memory",
            ">= 0.5 at 128",
            Target::Embedded,
            Target::Memory,
        ),
        (
            "batch / decode-only",
            ">= 0.5",
            Target::Batch,
            Target::DecodeOnly,
        ),
    ];
    ratio_table(
        runs,
        levels,
        &ratios,
        "Ratios: the median of the per-run ratios (each run's in brackets); target of issue 6 under each name.",
        |point| point.rate,
    );
    ratio_table(
        runs,
        levels,
        &ratios,
        "The same per server core (rate / server CPU): the cost of one request, whatever held the \
         rate back (a baseline whose load generator saturates its core shows its full speed here).",
        |point| point.rate / point.cpu.server,
    );
}

/// One table of ratios between rows, `value` of each point against `value` of another.
fn ratio_table(
    runs: &[Vec<Point>],
    levels: &[usize],
    ratios: &[(&str, &str, Target, Target)],
    title: &str,
    value: fn(&Point) -> f64,
) {
    let rate = |points: &[Point], target: Target, connections: usize| {
        points
            .iter()
            .find(|point| point.target == target && point.connections == connections)
            .map_or(f64::NAN, value)
    };
    println!();
    println!("{title}");
    println!();
    let mut header = "| conns |".to_owned();
    let mut rule = "|------:|".to_owned();
    for (name, target, _, _) in ratios {
        header.push_str(&format!(" {name} ({target}) |"));
        rule.push_str(&format!("{}:|", "-".repeat(name.len() + target.len() + 4)));
    }
    println!("{header}");
    println!("{rule}");
    for &connections in levels {
        let mut line = format!("| {connections:>5} |");
        for (name, target, numerator, denominator) in ratios {
            let per_run: Vec<f64> = runs
                .iter()
                .map(|points| {
                    let below = if *denominator == Target::DecodeOnly {
                        0
                    } else {
                        connections
                    };
                    rate(points, *numerator, connections) / rate(points, *denominator, below)
                })
                .collect();
            let each = per_run
                .iter()
                .map(|ratio| format!("{ratio:.2}"))
                .collect::<Vec<_>>()
                .join(" ");
            let cell = format!("{:.2} [{each}]", median(per_run.iter().copied()));
            line.push_str(&format!(
                " {cell:>width$} |",
                width = name.len() + target.len() + 3
            ));
        }
        println!("{line}");
    }
}

/// Throughput and p99 latency against connections, one line per row (median runs), as SVG.
fn plot(runs: &[Vec<Point>], levels: &[usize]) -> String {
    use common::plot::{Chart, Series, PALETTE};
    let rows: Vec<Target> = Target::ALL
        .into_iter()
        .filter(|target| *target != Target::DecodeOnly)
        .filter(|target| runs.iter().flatten().any(|point| point.target == *target))
        .collect();
    let series = |value: fn(&Point) -> f64| -> Vec<Series> {
        rows.iter()
            .enumerate()
            .map(|(index, &target)| Series {
                name: target.name().to_owned(),
                color: PALETTE[index % PALETTE.len()],
                points: levels
                    .iter()
                    .filter_map(|&connections| median_point(runs, target, connections))
                    .map(|point| (point.connections as f64, value(&point)))
                    .collect(),
            })
            .collect()
    };
    let decode_only = runs
        .iter()
        .flatten()
        .filter(|point| point.target == Target::DecodeOnly)
        .map(|point| point.rate)
        .collect::<Vec<_>>();
    let mut notes = vec![
        "1 request in flight per connection".to_owned(),
        "batch: 100 events per request".to_owned(),
    ];
    if !decode_only.is_empty() {
        notes.push(format!(
            "decode alone: {} events/s",
            common::plot::number(median(decode_only))
        ));
    }
    common::plot::svg(&[
        Chart {
            title: "Ingest: events/s against concurrent connections".to_owned(),
            x_label: "connections".to_owned(),
            y_label: "events/s (= requests/s but for batch)".to_owned(),
            log_y: false,
            series: series(|point| point.rate),
            notes,
        },
        Chart {
            title: "Ingest: p99 latency of a request against concurrent connections".to_owned(),
            x_label: "connections".to_owned(),
            y_label: "p99 ms".to_owned(),
            log_y: true,
            series: series(|point| point.p99_ms),
            notes: Vec::new(),
        },
    ])
}
