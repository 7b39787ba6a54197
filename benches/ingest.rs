//! Ingest benchmark: HTTP/1.1 `POST /v1/events` with keep-alive against the gateway on the
//! in-memory store, the gateway on the embedded durable store (fsync before ack, on the real disk)
//! and a bare hyper server (the baseline), at 1, 32 and 128 connections, all in one run.
//!
//! Prints requests/s, p50/p99 latency, records per sync (embedded store), CPU used by the server
//! and by the load generator, and the ratios durable/memory and memory/bare-hyper.
//!
//! `cargo bench --bench ingest [-- --seconds 5] [--quick] [--pin]`; see `--help`.
//!
//! The server and the load generator run in this one process, on two tokio runtimes whose threads
//! are named `gw-server` and `gw-load` (the CPU columns sum `/proc/self/task` by those names).

use std::ffi::CString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use iqchannels_gateway::log::embedded::{EmbeddedLog, Retention, WriterStats};
use iqchannels_gateway::log::memory::MemoryLog;
use iqchannels_gateway::log::SharedLog;
use iqchannels_gateway::server::{serve, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// What the bare baseline answers, byte for byte what the gateway answers for a new event.
const BARE_REPLY: &[u8] = br#"{"sequence":1,"duplicate":false}"#;
/// Thread names of the two runtimes (at most 15 bytes: Linux truncates `comm`).
const SERVER_THREADS: &str = "gw-server";
const LOAD_THREADS: &str = "gw-load";
/// `statfs` magic of tmpfs, where fsync would cost nothing.
const TMPFS_MAGIC: i64 = 0x0102_1994;

const USAGE: &str = "\
ingest benchmark: HTTP/1.1 POST /v1/events, gateway (memory, embedded) vs bare hyper

usage: cargo bench --bench ingest [-- OPTIONS]

  --seconds S   measured seconds per point (default 5; 0.5 with --quick)
  --quick       smoke run: 0.5 s per point, 1 and 32 connections only (the default
                when run without --bench, i.e. by `cargo test --all-targets`)
  --pin         pin the server runtime to CPU 0 and the load generator to CPU 1
                (one worker thread each); default: both runtimes share every CPU
  --help        this text";

struct Options {
    seconds: f64,
    quick: bool,
    pin: bool,
}

fn parse_options() -> Result<Options, String> {
    let mut seconds = None;
    // `cargo bench` passes `--bench`; without it (`cargo test --all-targets`) this is a smoke run
    // so the benchmark never rots and never slows the test suite down.
    let mut quick = !std::env::args().any(|arg| arg == "--bench");
    let mut pin = false;
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
            "--quick" => quick = true,
            "--pin" => pin = true,
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
        quick,
        pin,
    })
}

/// The fixture split around `ChatEvent.Id`, so each request gets a fresh id for the price of one
/// copy of the bytes.
struct Template {
    prefix: Vec<u8>,
    suffix: Vec<u8>,
}

impl Template {
    fn load() -> Self {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/chat_closed.json"
        );
        let text = std::fs::read_to_string(path).expect("the fixture chat_closed.json is readable");
        let chat_event = text
            .find("\"ChatEvent\"")
            .expect("the fixture has a ChatEvent");
        let key = chat_event
            + text[chat_event..]
                .find("\"Id\"")
                .expect("ChatEvent has an Id");
        let after_key = key + "\"Id\"".len();
        let colon = after_key + text[after_key..].find(':').expect("a colon after \"Id\"");
        let start = colon
            + 1
            + text[colon + 1..]
                .find(|c: char| !c.is_whitespace())
                .expect("a value after \"Id\":");
        let end = start
            + text[start..]
                .find(|c: char| !c.is_ascii_digit())
                .expect("the Id is followed by more JSON");
        let template = Self {
            prefix: text.as_bytes()[..start].to_vec(),
            suffix: text.as_bytes()[end..].to_vec(),
        };
        // The splice must land on ChatEvent.Id and nowhere else.
        let probe: serde_json::Value =
            serde_json::from_slice(&template.body(987_654_321)).expect("the spliced body is JSON");
        assert_eq!(
            probe["ChatEvent"]["Id"], 987_654_321,
            "splice hits ChatEvent.Id"
        );
        template
    }

    fn body(&self, id: i64) -> Bytes {
        let id = id.to_string();
        let mut body = Vec::with_capacity(self.prefix.len() + id.len() + self.suffix.len());
        body.extend_from_slice(&self.prefix);
        body.extend_from_slice(id.as_bytes());
        body.extend_from_slice(&self.suffix);
        Bytes::from(body)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Target {
    Bare,
    Memory,
    Embedded,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Bare => "bare-hyper",
            Target::Memory => "memory",
            Target::Embedded => "embedded",
        }
    }
}

/// One server under test, running on the server runtime.
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
    /// The durable store, for its writer statistics.
    embedded: Option<Arc<EmbeddedLog>>,
}

fn start(rt: &Runtime, target: Target, data_dir: &Path) -> Server {
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
    let (log, embedded): (Option<SharedLog>, _) = match target {
        Target::Bare => (None, None),
        Target::Memory => (Some(Arc::new(MemoryLog::default())), None),
        Target::Embedded => {
            // The writer task is spawned on the current runtime.
            let _context = rt.enter();
            let log = Arc::new(
                EmbeddedLog::open(data_dir, Retention::default())
                    .expect("the embedded store opens in the bench data dir"),
            );
            (Some(log.clone() as SharedLog), Some(log))
        }
    };
    let task = match log {
        None => rt.spawn(bare_server(listener, shutdown)),
        Some(log) => rt.spawn(async move {
            if let Err(error) = serve(listener, log, config, shutdown).await {
                eprintln!("gateway failed: {error}");
            }
        }),
    };
    Server {
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
async fn bare_server(listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
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
            let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                request.into_body().collect().await?;
                let mut response = Response::new(Full::new(Bytes::from_static(BARE_REPLY)));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                Ok::<_, hyper::Error>(response)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// What one connection saw in one phase.
struct ConnectionResult {
    sender: SendRequest<Full<Bytes>>,
    latency_us: Histogram<u64>,
    requests: u64,
    failures: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

async fn connect(addr: SocketAddr) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the server");
    stream.set_nodelay(true).expect("TCP_NODELAY");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
}

/// Sends requests one after another on one connection until `until`.
async fn drive(
    mut sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
    template: Arc<Template>,
    ids: Arc<AtomicI64>,
    until: Instant,
) -> ConnectionResult {
    let mut latency_us = histogram();
    let mut requests = 0;
    let mut failures = 0;
    while Instant::now() < until {
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let mut request = Request::post("/v1/events")
            .body(Full::new(template.body(id)))
            .expect("a valid request");
        let headers = request.headers_mut();
        headers.insert(HOST, host.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));

        let started = Instant::now();
        sender.ready().await.expect("the connection stays open");
        let response = sender
            .send_request(request)
            .await
            .expect("the server answers");
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .expect("the response body arrives")
            .to_bytes();
        let elapsed = started.elapsed();

        requests += 1;
        let fresh = body
            .windows(b"\"duplicate\":false".len())
            .any(|window| window == b"\"duplicate\":false");
        if status != StatusCode::OK || !fresh {
            failures += 1;
            if failures == 1 {
                eprintln!(
                    "unexpected answer: {status} {}",
                    String::from_utf8_lossy(&body)
                );
            }
        }
        latency_us.saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
    }
    ConnectionResult {
        sender,
        latency_us,
        requests,
        failures,
    }
}

/// One phase on every connection; the senders come back for the next phase.
async fn phase(
    senders: Vec<SendRequest<Full<Bytes>>>,
    addr: SocketAddr,
    template: &Arc<Template>,
    ids: &Arc<AtomicI64>,
    length: Duration,
) -> Vec<ConnectionResult> {
    let host = HeaderValue::from_str(&addr.to_string()).expect("an address is a valid Host");
    let until = Instant::now() + length;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|sender| {
            tokio::spawn(drive(
                sender,
                host.clone(),
                template.clone(),
                ids.clone(),
                until,
            ))
        })
        .collect();
    let mut results = Vec::with_capacity(tasks.len());
    for task in tasks {
        results.push(task.await.expect("a load task panicked"));
    }
    results
}

/// One row of the table.
struct Point {
    target: Target,
    connections: usize,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    failures: u64,
    records_per_sync: Option<f64>,
    /// Cores busy during the measured seconds.
    cpu: CpuTimes,
}

#[allow(clippy::too_many_arguments)]
fn measure(
    load_rt: &Runtime,
    server: &Server,
    target: Target,
    connections: usize,
    warmup: Duration,
    length: Duration,
    template: &Arc<Template>,
    ids: &Arc<AtomicI64>,
) -> Point {
    load_rt.block_on(async {
        let mut senders = Vec::with_capacity(connections);
        for _ in 0..connections {
            senders.push(connect(server.addr).await);
        }
        let warm = phase(senders, server.addr, template, ids, warmup).await;
        let senders = warm.into_iter().map(|result| result.sender).collect();

        let stats_before = server.embedded.as_ref().map(|log| snapshot(log.stats()));
        let cpu_before = CpuTimes::now();
        let started = Instant::now();
        let results = phase(senders, server.addr, template, ids, length).await;
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
            requests_per_s: requests as f64 / elapsed,
            p50_ms: latency_us.value_at_quantile(0.50) as f64 / 1000.0,
            p99_ms: latency_us.value_at_quantile(0.99) as f64 / 1000.0,
            failures,
            records_per_sync,
            cpu,
        }
    })
}

fn snapshot(stats: &WriterStats) -> (u64, u64) {
    (
        stats.syncs.load(Ordering::Relaxed),
        stats.records.load(Ordering::Relaxed),
    )
}

/// CPU seconds used so far: by the server's threads, by the load generator's threads, and by
/// everything else on the machine (other processes compete for the same cores).
#[derive(Clone, Copy)]
struct CpuTimes {
    server: f64,
    load: f64,
    others: f64,
}

impl CpuTimes {
    fn now() -> Self {
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let read = |path: &Path| std::fs::read_to_string(path).ok();
        let mut server = 0.0;
        let mut load = 0.0;
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for task in tasks.flatten() {
                let path = task.path();
                // `None` when the thread ended meanwhile.
                let (Some(comm), Some(seconds)) = (
                    read(&path.join("comm")),
                    read(&path.join("stat")).and_then(|stat| stat_seconds(&stat, ticks)),
                ) else {
                    continue;
                };
                match comm.trim() {
                    SERVER_THREADS => server += seconds,
                    LOAD_THREADS => load += seconds,
                    _ => {}
                }
            }
        }
        let process = read(Path::new("/proc/self/stat"))
            .and_then(|stat| stat_seconds(&stat, ticks))
            .unwrap_or(f64::NAN);
        // The first line of /proc/stat: cpu user nice system idle iowait irq softirq steal ...
        let machine = read(Path::new("/proc/stat"))
            .and_then(|stat| {
                let line = stat.lines().next()?;
                let ticks_by_kind: Vec<f64> = line
                    .split_whitespace()
                    .skip(1)
                    .take(8)
                    .filter_map(|field| field.parse().ok())
                    .collect();
                let idle = ticks_by_kind.get(3)? + ticks_by_kind.get(4)?;
                Some((ticks_by_kind.iter().sum::<f64>() - idle) / ticks)
            })
            .unwrap_or(f64::NAN);
        Self {
            server,
            load,
            others: machine - process,
        }
    }

    /// Cores busy per second of `elapsed` since `earlier`.
    fn busy_since(self, earlier: Self, elapsed: f64) -> Self {
        Self {
            server: (self.server - earlier.server) / elapsed,
            load: (self.load - earlier.load) / elapsed,
            others: ((self.others - earlier.others) / elapsed).max(0.0),
        }
    }
}

/// utime + stime from a `/proc/.../stat` line, in seconds.
fn stat_seconds(stat: &str, ticks: f64) -> Option<f64> {
    // Fields after "(comm)": state is field 3, utime 14, stime 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / ticks)
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE, and
    // sched_setaffinity(0, ..) only changes the calling thread.
    let pinned = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    if !pinned {
        eprintln!("could not pin a thread to CPU {cpu}");
    }
}

fn runtime(name: &'static str, workers: usize, cpu: Option<usize>) -> Runtime {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(workers)
        .thread_name(name)
        // Blocking threads that exit take their CPU time out of /proc/self/task.
        .thread_keep_alive(Duration::from_secs(3600))
        .enable_all();
    if let Some(cpu) = cpu {
        builder.on_thread_start(move || pin_current_thread(cpu));
    }
    builder.build().expect("a tokio runtime")
}

/// Where the durable store goes: beside the bench binary in the target dir, on the real disk.
fn data_parent() -> PathBuf {
    let exe = std::env::current_exe().expect("the bench binary's path");
    exe.ancestors()
        .nth(2) // target/release/deps/ingest-… -> target/release
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn is_tmpfs(path: &Path) -> bool {
    let Ok(path) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; the path is NUL-terminated and outlives the call.
    // `f_type` is i64 here but another integer type on other targets.
    #[allow(clippy::useless_conversion)]
    unsafe {
        let mut stat: libc::statfs = std::mem::zeroed();
        libc::statfs(path.as_ptr(), &mut stat) == 0 && i64::from(stat.f_type) == TMPFS_MAGIC
    }
}

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let pin = options.pin && cpus >= 2;
    if options.pin && !pin {
        eprintln!("--pin needs two CPUs; running unpinned");
    }
    let (server_rt, load_rt) = if pin {
        (
            runtime(SERVER_THREADS, 1, Some(0)),
            runtime(LOAD_THREADS, 1, Some(1)),
        )
    } else {
        (
            runtime(SERVER_THREADS, cpus, None),
            runtime(LOAD_THREADS, cpus, None),
        )
    };

    let levels: &[usize] = if options.quick {
        &[1, 32]
    } else {
        &[1, 32, 128]
    };
    let length = Duration::from_secs_f64(options.seconds);
    let warmup = Duration::from_secs_f64((options.seconds / 5.0).min(1.0));
    let template = Arc::new(Template::load());
    let ids = Arc::new(AtomicI64::new(1_000_000_000));
    let data = tempfile::Builder::new()
        .prefix("ingest-bench-")
        .tempdir_in(data_parent())
        .expect("a temp dir for the embedded store");

    println!("# ingest benchmark: HTTP/1.1 POST /v1/events, keep-alive, one request at a time per connection");
    println!(
        "# body: ../shared/fixtures/chat_closed.json ({} bytes) with a unique ChatEvent.Id per request",
        template.body(1_000_000_000).len()
    );
    println!(
        "# {} s measured per point after {} s warm-up; CPUs: {cpus}",
        options.seconds,
        warmup.as_secs_f64()
    );
    println!(
        "# server and load generator share this one process (tokio runtimes `{SERVER_THREADS}` and `{LOAD_THREADS}`);"
    );
    let taskset = if Path::new("/usr/bin/taskset").exists() {
        "taskset exists but pins whole processes, so it cannot separate them"
    } else {
        "no taskset here; it could not separate them anyway"
    };
    if pin {
        println!("# pinned per thread (--pin): server on CPU 0, load generator on CPU 1, one worker each ({taskset})");
    } else {
        println!("# not pinned: each runtime has {cpus} workers on all CPUs ({taskset}; --pin pins per thread)");
    }
    println!(
        "# embedded store in {} ({})",
        data.path().display(),
        if is_tmpfs(data.path()) {
            "WARNING: tmpfs, fsync is free"
        } else {
            "not tmpfs: fsync reaches the disk"
        }
    );
    println!(
        "# CPU columns: cores busy during the measured seconds (1.00 = one core); \
         other = the rest of the machine: other processes, and kernel threads \
         flushing our writes (embedded); high values from other processes skew a point"
    );

    // All three servers run at once and each level measures them back to back, so the ratios
    // compare points taken within seconds of each other on a machine whose load drifts.
    let servers: Vec<(Target, Server)> = [Target::Bare, Target::Memory, Target::Embedded]
        .into_iter()
        .map(|target| {
            (
                target,
                start(&server_rt, target, &data.path().join("events")),
            )
        })
        .collect();
    let mut points = Vec::new();
    for &connections in levels {
        for (target, server) in &servers {
            let point = measure(
                &load_rt,
                server,
                *target,
                connections,
                warmup,
                length,
                &template,
                &ids,
            );
            eprintln!(
                "{:<10} {:>4} connections: {:>8.0} req/s",
                target.name(),
                connections,
                point.requests_per_s
            );
            points.push(point);
        }
    }
    for (_, server) in servers {
        stop(&server_rt, server);
    }
    points.sort_by_key(|point| (point.target, point.connections));

    print_table(&points, levels);
    let failures: u64 = points.iter().map(|point| point.failures).sum();
    if failures > 0 {
        eprintln!("{failures} requests did not get 200 with duplicate:false");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn print_table(points: &[Point], levels: &[usize]) {
    println!();
    println!(
        "| store      | conns |    req/s | p50 ms | p99 ms | rec/sync | server CPU | loadgen CPU | other CPU |"
    );
    println!(
        "|------------|------:|---------:|-------:|-------:|---------:|-----------:|------------:|----------:|"
    );
    for point in points {
        let per_sync = point
            .records_per_sync
            .map_or_else(|| "-".to_owned(), |value| format!("{value:.1}"));
        println!(
            "| {:<10} | {:>5} | {:>8.0} | {:>6.3} | {:>6.3} | {:>8} | {:>10.2} | {:>11.2} | {:>9.2} |",
            point.target.name(),
            point.connections,
            point.requests_per_s,
            point.p50_ms,
            point.p99_ms,
            per_sync,
            point.cpu.server,
            point.cpu.load,
            point.cpu.others
        );
    }
    println!();
    println!("| conns | memory / bare-hyper | durable / memory |");
    println!("|------:|--------------------:|-----------------:|");
    let rate = |target: Target, connections: usize| {
        points
            .iter()
            .find(|point| point.target == target && point.connections == connections)
            .map_or(f64::NAN, |point| point.requests_per_s)
    };
    for &connections in levels {
        let bare = rate(Target::Bare, connections);
        let memory = rate(Target::Memory, connections);
        let durable = rate(Target::Embedded, connections);
        println!(
            "| {connections:>5} | {:>19.2} | {:>16.2} |",
            memory / bare,
            durable / memory
        );
    }
}
