//! Fan-out benchmark: what subscribers get out of the gateway, each figure beside its baseline,
//! all in one run.
//!
//! - **Fan-out**: messages/s delivered to 1..500 concurrent gRPC subscribers (one connection
//!   each) by the gateway (in-process, in-memory store, events appended at full speed with
//!   enough headroom that every subscriber stays on the live tail) against the **ceiling**: a
//!   bare tonic server-streaming service sending pre-encoded `WireEvent`s of the same bytes.
//! - **Catch-up**: one subscriber replaying 1,000,000 stored events against the same ceiling.
//! - **Memory**: RSS per idle Subscribe stream, and RSS growth with one stalled subscriber while
//!   1,000,000 events are ingested, both on the real binary (its `/proc/PID/status`).
//! - **Latency**: POST to receipt at 5,000 events/s with 100 subscribers on the embedded store
//!   (real disk), beside the store's own sync latency.
//! - A plot of delivered messages/s against subscriber count (`docs/fanout.svg`, full run only).
//!
//! `cargo bench --bench fanout [-- --quick]`; see `--help`. Without `--bench` (as run by
//! `cargo test --all-targets`) it is a few-second smoke run.
//!
//! Every client decodes only `Event.sequence` (a message with field 1 only, the rest skipped), so
//! the load generator costs little and the same against the gateway and the ceiling.

#[path = "../tests/binary/mod.rs"]
mod binary;
mod common;
use common::cpu::{Cpu, CpuTimes, Runtimes, LOAD_THREADS, SERVER_THREADS};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::{data_parent, is_tmpfs, median, Template};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use iqchannels_gateway::log::embedded::{EmbeddedLog, Retention};
use iqchannels_gateway::log::memory::MemoryLog;
use iqchannels_gateway::log::{EventLog, NewRecord, SharedLog};
use iqchannels_gateway::pb::client::{subscribe_request, SubscribeRequest};
use iqchannels_gateway::pb::gateway::v1::event_gateway_server::{EventGateway, EventGatewayServer};
use iqchannels_gateway::pb::gateway::v1::{GetEventRequest, PublishRequest, PublishResponse};
use iqchannels_gateway::server::{serve, ServerConfig};
use iqchannels_gateway::wire::{EncodedEvent, Form, WireEvent};
use prost::Message;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status, Streaming};

const SUBSCRIBE_PATH: &str = "/iqchannels.gateway.v1.EventGateway/Subscribe";
/// The gateway's default live tail, used by every in-process gateway here.
const LIVE_BUFFER: usize = 4096;
/// Distinct events cycled through (about 8 MB of payloads), so reads are not all one cache line.
const POOL: usize = 1024;

const USAGE: &str = "\
fan-out benchmark: gRPC Subscribe fan-out, catch-up, memory and latency, each beside its baseline

usage: cargo bench --bench fanout [-- OPTIONS]

  --quick          short run: one round of 2 s per fan-out point at 1/10/100 subscribers, 100,000 events of
                   catch-up, 200 idle streams, 100,000 events past a stalled subscriber, 3 s of
                   latency; the plot goes to target/ instead of docs/
  --seconds S      measured seconds per fan-out point (default 3)
  --rounds R       fan-out rounds per level, gateway then ceiling each (default 3); the
                   medians are reported and plotted
  --events N       events replayed by the catch-up subscriber (default 1,000,000)
  --plot PATH      where the SVG goes (default docs/fanout.svg on a full run)
  --rate N         events/s POSTed in the latency part (default 5000)
  --subscribers L  fan-out levels, comma-separated (default 1,10,100,500)
  --no-pin         let both runtimes use every CPU; by default, with two CPUs or more, the
                   server runtime (gateway or ceiling, and the feeder) runs on CPU 0 and the
                   subscribers and POSTs on CPU 1, one worker each
  --filtered-events N   events stored before the non-matching catch-up streams (default 200,000)
  --filtered-streams N  Subscribe streams from the beginning whose filter matches nothing, all
                   on one connection (default 100)
  --baseline-binary PATH  also measure `filtered` on this gateway binary (e.g. the previous
                   release), in the same run
  --only PARTS     run only these, comma-separated: fanout, catchup, memory, latency, filtered
                   (fanout-gateway: the gateway's fan-out points alone, for a profiler)
  --help           this text

Without --bench (cargo test --all-targets) it is a smoke run of a few seconds.";

#[derive(Clone)]
struct Options {
    seconds: f64,
    /// Times each fan-out level is measured (gateway then ceiling each time).
    rounds: usize,
    levels: Vec<usize>,
    catch_up_events: u64,
    idle_streams: usize,
    stall_events: u64,
    latency_seconds: f64,
    latency_rate: u64,
    latency_subscribers: usize,
    plot: Option<PathBuf>,
    /// Server runtime on CPU 0 and load generator on CPU 1 (the default with two CPUs or more).
    pin: bool,
    /// Parts to run (`fanout`, `catchup`, `memory`, `latency`, `filtered`); all when empty.
    only: Vec<String>,
    /// Events stored before the non-matching catch-up streams start (`filtered`).
    filtered_events: u64,
    /// Non-matching catch-up streams, all on one connection (`filtered`).
    filtered_streams: usize,
    /// Another gateway binary measured in the same run (`filtered`), e.g. the previous release.
    baseline_binary: Option<PathBuf>,
}

impl Options {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

fn parse_options() -> Result<Options, String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let full = args.iter().any(|arg| arg == "--bench");
    let quick = args.iter().any(|arg| arg == "--quick");
    let mut options = if !full {
        Options {
            seconds: 0.5,
            rounds: 1,
            levels: vec![1, 10],
            catch_up_events: 10_000,
            idle_streams: 50,
            stall_events: 5_000,
            latency_seconds: 1.0,
            latency_rate: 1000,
            latency_subscribers: 10,
            plot: None,
            pin: true,
            only: Vec::new(),
            filtered_events: 5_000,
            filtered_streams: 10,
            baseline_binary: None,
        }
    } else if quick {
        Options {
            seconds: 2.0,
            rounds: 1,
            levels: vec![1, 10, 100],
            catch_up_events: 100_000,
            idle_streams: 200,
            stall_events: 100_000,
            latency_seconds: 3.0,
            latency_rate: 5000,
            latency_subscribers: 100,
            plot: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("fanout.svg")),
            pin: true,
            only: Vec::new(),
            filtered_events: 50_000,
            filtered_streams: 100,
            baseline_binary: None,
        }
    } else {
        Options {
            seconds: 3.0,
            rounds: 3,
            levels: vec![1, 10, 100, 500],
            catch_up_events: 1_000_000,
            idle_streams: 1000,
            stall_events: 1_000_000,
            latency_seconds: 10.0,
            latency_rate: 5000,
            latency_subscribers: 100,
            plot: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/docs/fanout.svg"
            ))),
            pin: true,
            only: Vec::new(),
            filtered_events: 200_000,
            filtered_streams: 100,
            baseline_binary: None,
        }
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                let text = value("--seconds")?;
                options.seconds = text
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s > 0.0 && s.is_finite())
                    .ok_or(format!("--seconds: not a positive number: {text}"))?;
            }
            "--events" => {
                let text = value("--events")?;
                options.catch_up_events = text
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("--events: not a positive integer: {text}"))?;
            }
            "--rate" => {
                let text = value("--rate")?;
                options.latency_rate = text
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("--rate: not a positive integer: {text}"))?;
            }
            "--rounds" => {
                let text = value("--rounds")?;
                options.rounds = text
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("--rounds: not a positive integer: {text}"))?;
            }
            "--subscribers" => {
                let text = value("--subscribers")?;
                options.levels = text
                    .split(',')
                    .map(|n| n.parse().ok().filter(|n| *n > 0))
                    .collect::<Option<Vec<usize>>>()
                    .ok_or(format!("--subscribers: not a list of counts: {text}"))?;
            }
            "--plot" => options.plot = Some(PathBuf::from(value("--plot")?)),
            "--filtered-events" => {
                let text = value("--filtered-events")?;
                options.filtered_events = text
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("--filtered-events: not a positive integer: {text}"))?;
            }
            "--filtered-streams" => {
                let text = value("--filtered-streams")?;
                options.filtered_streams = text.parse().ok().filter(|n| *n > 0).ok_or(format!(
                    "--filtered-streams: not a positive integer: {text}"
                ))?;
            }
            "--baseline-binary" => {
                options.baseline_binary = Some(PathBuf::from(value("--baseline-binary")?))
            }
            "--only" => {
                options.only = value("--only")?.split(',').map(str::to_owned).collect();
                // A partial run must not overwrite the committed plot.
                if !options.runs("fanout") {
                    options.plot = None;
                }
            }
            "--no-pin" => options.pin = false,
            "--pin" => options.pin = true,
            "--bench" | "--quick" => {}
            "--help" | "-h" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}\n\n{USAGE}")),
        }
    }
    Ok(options)
}

/// Log payloads built exactly as ingest builds them (typed envelope, raw JSON, filter keys).
fn payload_pool(template: &Template) -> Vec<Bytes> {
    (0..POOL as i64)
        .map(|i| {
            let body = template.body(1_000_000 + i);
            let envelope = iqchannels_gateway::decode::decode(&body)
                .expect("the fixture decodes")
                .envelope;
            iqchannels_gateway::gateway::stored_record(
                envelope,
                body,
                Vec::new(),
                iqchannels_gateway::fit::DEFAULT_MAX_EVENT_BYTES,
            )
            .expect("the fixture fits")
            .0
        })
        .collect()
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

// ---------------------------------------------------------------------------------------------
// Clients

/// `iqchannels.gateway.v1.Event` with only its sequence decoded; the rest is skipped.
#[derive(Clone, PartialEq, Message)]
struct SequenceOnly {
    #[prost(uint64, tag = "1")]
    sequence: u64,
}

async fn channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a valid URI")
        .tcp_nodelay(true)
        .connect()
        .await
        .expect("gRPC connects")
}

async fn subscribe(channel: Channel, beginning: bool) -> Streaming<SequenceOnly> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("the channel is ready");
    let request = SubscribeRequest {
        start: beginning.then_some(subscribe_request::Start::Beginning(())),
        ..SubscribeRequest::default()
    };
    grpc.server_streaming(
        Request::new(request),
        http::uri::PathAndQuery::from_static(SUBSCRIBE_PATH),
        tonic_prost::ProstCodec::<SubscribeRequest, SequenceOnly>::default(),
    )
    .await
    .expect("Subscribe is accepted")
    .into_inner()
}

/// What one subscriber has seen.
#[derive(Default)]
struct Tally {
    received: AtomicU64,
    /// Events whose sequence was not the previous one + 1.
    disorder: AtomicU64,
}

/// Reads `stream` until it ends or `limit` messages arrived; returns when the last one did.
fn spawn_reader(
    mut stream: Streaming<SequenceOnly>,
    tally: Arc<Tally>,
    check_order: bool,
    limit: u64,
) -> JoinHandle<Instant> {
    tokio::spawn(async move {
        let mut previous = None;
        let mut count = 0;
        while count < limit {
            match stream.message().await {
                Ok(Some(event)) => {
                    if check_order && previous.is_some_and(|p: u64| event.sequence != p + 1) {
                        tally.disorder.fetch_add(1, Ordering::Relaxed);
                    }
                    previous = Some(event.sequence);
                    count += 1;
                    tally.received.fetch_add(1, Ordering::Relaxed);
                }
                Ok(None) => break,
                Err(status) => {
                    eprintln!("subscriber stream failed: {status}");
                    tally.disorder.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
        Instant::now()
    })
}

// ---------------------------------------------------------------------------------------------
// Servers

/// The ceiling: a tonic service whose Subscribe sends the pre-encoded events of `pool`, round
/// and round, as fast as the client takes them. Nothing else happens per message.
struct Ceiling {
    pool: Arc<Vec<Arc<EncodedEvent>>>,
    /// Streams start sending once this is true: when every subscriber is attached, so that the
    /// first streams do not flood the process while the others connect.
    go: tokio::sync::watch::Receiver<bool>,
}

type CeilingStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<WireEvent, Status>> + Send>>;

#[tonic::async_trait]
impl EventGateway for Ceiling {
    type SubscribeStream = CeilingStream;

    async fn subscribe(
        &self,
        _request: Request<SubscribeRequest>,
    ) -> Result<Response<CeilingStream>, Status> {
        let pool = self.pool.clone();
        let mut go = self.go.clone();
        let start = async move {
            let _ = go.wait_for(|go| *go).await;
        };
        let stream = futures_util::stream::once(start).flat_map(move |()| {
            let pool = pool.clone();
            futures_util::stream::iter((0..).map(move |i: usize| {
                Ok(WireEvent {
                    event: pool[i % pool.len()].clone(),
                    form: Form::default(),
                })
            }))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn publish(
        &self,
        _request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        Err(Status::unimplemented("the ceiling only streams"))
    }

    async fn get_event(
        &self,
        _request: Request<GetEventRequest>,
    ) -> Result<Response<WireEvent>, Status> {
        Err(Status::unimplemented("the ceiling only streams"))
    }
}

/// One server under test, running on the server runtime.
struct Server {
    addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

fn bind(rt: &Runtime) -> (TcpListener, SocketAddr) {
    let listener = rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("the bound address");
    (listener, addr)
}

fn start_gateway(rt: &Runtime, log: SharedLog) -> Server {
    let (listener, addr) = bind(rt);
    let (stop, stopped) = oneshot::channel::<()>();
    let config = ServerConfig {
        grace: Duration::from_secs(1),
        live_buffer: LIVE_BUFFER,
        ..ServerConfig::default()
    };
    let task = rt.spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        if let Err(error) = serve(listener, log, config, shutdown).await {
            eprintln!("gateway failed: {error}");
        }
    });
    Server { addr, stop, task }
}

fn start_ceiling(
    rt: &Runtime,
    pool: Arc<Vec<Arc<EncodedEvent>>>,
    go: tokio::sync::watch::Receiver<bool>,
) -> Server {
    let (listener, addr) = bind(rt);
    let (stop, stopped) = oneshot::channel::<()>();
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| {
            let _ = stream.set_nodelay(true);
            stream
        });
        Some((accepted, listener))
    });
    let task = rt.spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(EventGatewayServer::new(Ceiling { pool, go }))
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stopped.await;
            })
            .await;
        if let Err(error) = served {
            eprintln!("ceiling failed: {error}");
        }
    });
    Server { addr, stop, task }
}

fn stop(rt: &Runtime, server: Server) {
    let _ = server.stop.send(());
    rt.block_on(async {
        if tokio::time::timeout(Duration::from_secs(10), server.task)
            .await
            .is_err()
        {
            eprintln!("a server did not stop within 10 s; going on");
        }
    });
}

/// Appends events from `pool` at full speed, `batch` at a time, but never more than `headroom`
/// ahead of the slowest subscriber, so that every subscriber stays on the live tail.
async fn feed(
    log: Arc<MemoryLog>,
    pool: Arc<Vec<Bytes>>,
    tallies: Arc<Vec<Arc<Tally>>>,
    running: Arc<AtomicBool>,
    headroom: u64,
) {
    const BATCH: u64 = 64;
    let mut appended = 0u64;
    while running.load(Ordering::Relaxed) {
        let slowest = tallies
            .iter()
            .map(|tally| tally.received.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0);
        if appended.saturating_sub(slowest) + BATCH > headroom {
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let at = now_ms();
        let records = (appended..appended + BATCH)
            .map(|i| NewRecord {
                event_id: Some(i as i64 + 1),
                received_at_ms: at,
                payload: pool[i as usize % pool.len()].clone(),
            })
            .collect();
        if let Err(error) = log.append_all(records).await {
            eprintln!("append failed: {error}");
            return;
        }
        appended += BATCH;
        tokio::task::yield_now().await;
    }
}

// ---------------------------------------------------------------------------------------------
// Fan-out

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Gateway,
    Ceiling,
}

struct FanPoint {
    messages_per_s: f64,
    disorder: u64,
    cpu: Cpu,
}

struct Bench {
    server_rt: Runtime,
    load_rt: Runtime,
    payloads: Arc<Vec<Bytes>>,
    encoded: Arc<Vec<Arc<EncodedEvent>>>,
    template: Arc<Template>,
    options: Options,
}

impl Bench {
    fn fanout(&self, kind: Kind, subscribers: usize) -> FanPoint {
        let log = Arc::new(MemoryLog::default());
        let (go, ready) = tokio::sync::watch::channel(false);
        let server = match kind {
            Kind::Gateway => start_gateway(&self.server_rt, log.clone()),
            Kind::Ceiling => start_ceiling(&self.server_rt, self.encoded.clone(), ready),
        };
        let tallies: Arc<Vec<Arc<Tally>>> =
            Arc::new((0..subscribers).map(|_| Arc::default()).collect());
        let readers: Vec<JoinHandle<Instant>> = self.load_rt.block_on(async {
            let mut readers = Vec::with_capacity(subscribers);
            for tally in tallies.iter() {
                let stream = subscribe(channel(server.addr).await, false).await;
                readers.push(spawn_reader(
                    stream,
                    tally.clone(),
                    kind == Kind::Gateway,
                    u64::MAX,
                ));
            }
            readers
        });
        go.send_replace(true);
        let running = Arc::new(AtomicBool::new(true));
        let feeder = (kind == Kind::Gateway).then(|| {
            self.server_rt.spawn(feed(
                log,
                self.payloads.clone(),
                tallies.clone(),
                running.clone(),
                LIVE_BUFFER as u64 / 2,
            ))
        });
        let total = || {
            tallies
                .iter()
                .map(|tally| tally.received.load(Ordering::Relaxed))
                .sum::<u64>()
        };
        let length = Duration::from_secs_f64(self.options.seconds);
        std::thread::sleep(length.div_f64(5.0).min(Duration::from_secs(1)));
        let (count0, cpu0, started) = (total(), CpuTimes::now(), Instant::now());
        std::thread::sleep(length);
        let (count1, cpu1, elapsed) = (total(), CpuTimes::now(), started.elapsed().as_secs_f64());

        running.store(false, Ordering::Relaxed);
        for reader in readers {
            reader.abort();
        }
        if let Some(feeder) = feeder {
            let _ = self.server_rt.block_on(feeder);
        }
        stop(&self.server_rt, server);
        FanPoint {
            messages_per_s: (count1 - count0) as f64 / elapsed,
            disorder: tallies
                .iter()
                .map(|tally| tally.disorder.load(Ordering::Relaxed))
                .sum(),
            cpu: cpu1.busy_since(cpu0, elapsed),
        }
    }

    /// One subscriber from the beginning of a log of `events` (gateway), or `events` messages
    /// of the ceiling: seconds from the Subscribe call to the last message.
    fn catch_up(&self, kind: Kind) -> (f64, Cpu, u64) {
        let events = self.options.catch_up_events;
        let log = Arc::new(MemoryLog::default());
        if kind == Kind::Gateway {
            self.server_rt.block_on(async {
                let at = now_ms();
                let mut next = 0u64;
                while next < events {
                    let end = (next + 8192).min(events);
                    let records = (next..end)
                        .map(|i| NewRecord {
                            event_id: Some(i as i64 + 1),
                            received_at_ms: at,
                            payload: self.payloads[i as usize % self.payloads.len()].clone(),
                        })
                        .collect();
                    log.append_all(records)
                        .await
                        .expect("the memory log appends");
                    next = end;
                }
            });
        }
        let server = match kind {
            Kind::Gateway => start_gateway(&self.server_rt, log.clone()),
            Kind::Ceiling => start_ceiling(
                &self.server_rt,
                self.encoded.clone(),
                tokio::sync::watch::channel(true).1,
            ),
        };
        let tally = Arc::new(Tally::default());
        let (seconds, cpu) = self.load_rt.block_on(async {
            let channel = channel(server.addr).await;
            let cpu0 = CpuTimes::now();
            let started = Instant::now();
            let stream = subscribe(channel, true).await;
            let done = spawn_reader(stream, tally.clone(), kind == Kind::Gateway, events)
                .await
                .expect("the reader finishes");
            let seconds = (done - started).as_secs_f64();
            (seconds, CpuTimes::now().busy_since(cpu0, seconds))
        });
        stop(&self.server_rt, server);
        drop(log);
        let received = tally.received.load(Ordering::Relaxed);
        let disorder = tally.disorder.load(Ordering::Relaxed);
        if received < events {
            eprintln!("catch-up ({}) got {received} of {events}", kind.name());
        }
        (received as f64 / seconds, cpu, disorder + events - received)
    }

    /// RSS per idle Subscribe stream of the real binary: streams opened 100 per connection.
    fn idle_memory(&self) -> (f64, u64, u64) {
        let process = binary::Process::start(&["--store", "memory", "--max-subscribers", "100000"]);
        let n = self.options.idle_streams;
        self.load_rt.block_on(async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = process.rss_kib();
            let mut streams = Vec::with_capacity(n);
            let mut connection = None;
            for i in 0..n {
                if i % 100 == 0 {
                    connection = Some(channel(process.addr).await);
                }
                let connection = connection.clone().expect("a connection");
                streams.push(subscribe(connection, false).await);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            let after = process.rss_kib();
            drop(streams);
            (
                (after.saturating_sub(before) * 1024) as f64 / n as f64,
                before,
                after,
            )
        })
    }

    /// RSS of the real binary (embedded store) before and at most during the ingest of
    /// `stall_events` events while one subscriber reads nothing.
    fn stalled_memory(&self, data: &Path) -> Stall {
        let cache_bytes: u64 = 16 * 1024 * 1024;
        let process = binary::Process::embedded(
            data,
            &[
                "--live-buffer",
                &LIVE_BUFFER.to_string(),
                "--store-cache-bytes",
                &cache_bytes.to_string(),
            ],
        );
        let events = self.options.stall_events;
        let url = process.url("/v1/events:batch");
        let template = self.template.clone();
        self.load_rt.block_on(async {
            let http = reqwest::Client::new();
            // Warm-up: a first live buffer's worth, so the hub's buffer is full before `before`.
            post_batches(&http, &url, &template, 0, LIVE_BUFFER as u64, 1).await;
            let stalled = subscribe(channel(process.addr).await, false).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let before = process.rss_kib();
            let mut peak = before;
            let started = Instant::now();
            let base = LIVE_BUFFER as u64;
            let ingest = {
                let (http, url, template) = (http.clone(), url.clone(), template.clone());
                tokio::spawn(async move {
                    post_batches(&http, &url, &template, base, base + events, 4).await;
                })
            };
            while !ingest.is_finished() {
                peak = peak.max(process.rss_kib());
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            let ingest_seconds = started.elapsed().as_secs_f64();
            tokio::time::sleep(Duration::from_millis(500)).await;
            let after = process.rss_kib();
            drop(stalled);
            Stall {
                before_kib: before,
                peak_kib: peak.max(after),
                after_kib: after,
                events_per_s: events as f64 / ingest_seconds,
                cache_bytes,
                live_bytes: LIVE_BUFFER as u64 * self.encoded_len_with_raw(),
            }
        })
    }

    /// Bytes the hub holds per event: the log record's payload (envelope, raw JSON, keys,
    /// references), which the encoded event shares.
    fn encoded_len_with_raw(&self) -> u64 {
        self.payloads[0].len() as u64
    }

    fn sync_latency(&self, dir: &Path, appends: usize) -> Histogram<u64> {
        let mut histogram = histogram();
        self.server_rt.block_on(async {
            let log = EmbeddedLog::open(dir, Retention::default()).expect("the store opens");
            for i in 0..appends {
                let record = NewRecord {
                    event_id: Some(i as i64 + 1),
                    received_at_ms: now_ms(),
                    payload: self.payloads[i % self.payloads.len()].clone(),
                };
                let started = Instant::now();
                log.append_all(vec![record])
                    .await
                    .expect("the store appends");
                record_us(&mut histogram, started.elapsed());
            }
            log.close().await;
        });
        histogram
    }

    /// POST -> receipt at `latency_rate` events/s with `latency_subscribers` subscribers, on the
    /// embedded store in `dir`.
    fn latency(&self, dir: &Path) -> Latency {
        let log = self
            .server_rt
            .block_on(async { EmbeddedLog::open(dir, Retention::default()) })
            .map(Arc::new)
            .expect("the store opens");
        let server = start_gateway(&self.server_rt, log.clone());
        let subscribers = self.options.latency_subscribers;
        let rate = self.options.latency_rate;
        let events = (rate as f64 * self.options.latency_seconds) as usize;
        let bodies: Vec<Bytes> = (0..events)
            .map(|i| self.template.body(5_000_000 + i as i64))
            .collect();
        let result = self.load_rt.block_on(async {
            // Each subscriber records the instant each sequence arrived.
            // They stop at the last acknowledged sequence, known once every POST is answered.
            let (last_tx, last_rx) = tokio::sync::watch::channel(u64::MAX);
            let mut readers = Vec::new();
            for _ in 0..subscribers {
                let mut stream = subscribe(channel(server.addr).await, false).await;
                let mut last = last_rx.clone();
                readers.push(tokio::spawn(async move {
                    let mut seen: Vec<(u64, Instant)> = Vec::with_capacity(events);
                    loop {
                        let target = *last.borrow_and_update();
                        if seen.last().is_some_and(|(sequence, _)| *sequence >= target) {
                            break;
                        }
                        tokio::select! {
                            message = stream.message() => match message {
                                Ok(Some(event)) => seen.push((event.sequence, Instant::now())),
                                _ => break,
                            },
                            changed = last.changed() => if changed.is_err() { break },
                        }
                    }
                    seen
                }));
            }
            let syncs0 = log.stats().syncs.load(Ordering::Relaxed);
            let cpu0 = CpuTimes::now();
            let http = reqwest::Client::new();
            let url = format!("http://{}/v1/events", server.addr);
            let started = Instant::now();
            let mut posts = Vec::with_capacity(events);
            for (i, body) in bodies.into_iter().enumerate() {
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                tokio::time::sleep_until(due.into()).await;
                let (http, url) = (http.clone(), url.clone());
                posts.push(tokio::spawn(async move {
                    let sent = Instant::now();
                    let response = http
                        .post(url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .map_err(|error| error.to_string())?;
                    let status = response.status();
                    let text = response.text().await.map_err(|error| error.to_string())?;
                    let acked = Instant::now();
                    let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                    match value["sequence"].as_u64() {
                        Some(sequence) if status.is_success() => Ok((sequence, sent, acked)),
                        _ => Err(format!("{status} {text}")),
                    }
                }));
            }
            let mut sent_at = std::collections::HashMap::with_capacity(events);
            let mut ack = histogram();
            let mut failed = 0;
            for post in posts {
                match post.await {
                    Ok(Ok((sequence, sent, acked))) => {
                        record_us(&mut ack, acked - sent);
                        sent_at.insert(sequence, sent);
                    }
                    Ok(Err(error)) => {
                        if failed == 0 {
                            eprintln!("a POST failed: {error}");
                        }
                        failed += 1;
                    }
                    Err(_) => failed += 1,
                }
            }
            let seconds = started.elapsed().as_secs_f64();
            let offered = events as f64 / seconds;
            let cpu = CpuTimes::now().busy_since(cpu0, seconds);
            last_tx.send_replace(sent_at.keys().copied().max().unwrap_or(0));
            let mut receipt = histogram();
            let mut missing = 0;
            for reader in readers {
                let seen = tokio::time::timeout(Duration::from_secs(30), reader)
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .unwrap_or_default();
                let mut matched = 0;
                for (sequence, at) in seen {
                    if let Some(sent) = sent_at.get(&sequence) {
                        record_us(&mut receipt, at.saturating_duration_since(*sent));
                        matched += 1;
                    }
                }
                missing += sent_at.len().saturating_sub(matched);
            }
            let syncs = log.stats().syncs.load(Ordering::Relaxed) - syncs0;
            Latency {
                receipt,
                ack,
                offered,
                failed,
                missing,
                records_per_sync: events as f64 / syncs.max(1) as f64,
                cpu,
            }
        });
        stop(&self.server_rt, server);
        result
    }
}

/// NDJSON batches of 100 events with ids `from..to`, `concurrency` requests at a time.
async fn post_batches(
    http: &reqwest::Client,
    url: &str,
    template: &Arc<Template>,
    from: u64,
    to: u64,
    concurrency: u64,
) {
    const BATCH: u64 = 100;
    let next = Arc::new(AtomicU64::new(from));
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (http, url, template, next) =
                (http.clone(), url.to_owned(), template.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(BATCH, Ordering::Relaxed);
                    if first >= to {
                        return;
                    }
                    let mut body = Vec::with_capacity(BATCH as usize * 5000);
                    for id in first..(first + BATCH).min(to) {
                        body.extend_from_slice(&template.body(id as i64 + 1));
                        body.push(b'\n');
                    }
                    let response = http
                        .post(&url)
                        .header("content-type", "application/x-ndjson")
                        .body(body)
                        .send()
                        .await;
                    match response {
                        Ok(response) if response.status().is_success() => {}
                        Ok(response) => eprintln!("batch answered {}", response.status()),
                        Err(error) => eprintln!("batch failed: {error}"),
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
}

struct Stall {
    before_kib: u64,
    peak_kib: u64,
    after_kib: u64,
    events_per_s: f64,
    cache_bytes: u64,
    live_bytes: u64,
}

struct Latency {
    receipt: Histogram<u64>,
    ack: Histogram<u64>,
    offered: f64,
    failed: usize,
    missing: usize,
    records_per_sync: f64,
    /// Cores busy while the events were POSTed.
    cpu: Cpu,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn record_us(histogram: &mut Histogram<u64>, elapsed: Duration) {
    histogram.saturating_record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
}

fn ms(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Gateway => "gateway",
            Kind::Ceiling => "ceiling",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Report

fn main() -> ExitCode {
    let options = match parse_options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            return ExitCode::from(2);
        }
    };
    let template = Template::load();
    let payloads = payload_pool(&template);
    let encoded: Vec<Arc<EncodedEvent>> = payloads
        .iter()
        .enumerate()
        .map(|(i, payload)| {
            let event = EncodedEvent::from_payload(i as u64 + 1, now_ms(), payload.clone())
                .expect("the payload decodes");
            Arc::new(event)
        })
        .collect();
    let runtimes = Runtimes::new(options.pin);
    let describe = runtimes.describe();
    let bench = Bench {
        server_rt: runtimes.server,
        load_rt: runtimes.load,
        payloads: Arc::new(payloads),
        encoded: Arc::new(encoded),
        template: Arc::new(template),
        options: options.clone(),
    };
    let data = tempfile::Builder::new()
        .prefix("fanout-bench-")
        .tempdir_in(data_parent())
        .expect("a temp dir for the embedded store");
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    println!("# fan-out benchmark; CPUs: {cpus}; one process holds servers and clients (runtimes `{SERVER_THREADS}`, `{LOAD_THREADS}`); {describe}");
    println!(
        "# event: chat_closed.json as ingest stores it; Event without raw_json = {} bytes on the wire",
        bench.encoded[0].encoded_len(Form::default())
    );
    println!(
        "# embedded store in {} ({})",
        data.path().display(),
        if is_tmpfs(data.path()) {
            "WARNING: tmpfs, fsync is free"
        } else {
            "not tmpfs: fsync reaches the disk"
        }
    );
    let mut ok = true;
    if options.runs("fanout") || options.runs("fanout-gateway") {
        ok &= report_fanout(&bench);
    }
    if options.runs("catchup") {
        ok &= report_catch_up(&bench);
    }
    if options.runs("memory") {
        report_memory(&bench, &data.path().join("stall"));
    }
    if options.runs("latency") {
        ok &= report_latency(&bench, data.path());
    }
    if options.runs("filtered") {
        report_filtered(&bench, data.path());
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("a subscriber saw a gap, a repeat or an error, or a POST failed");
        ExitCode::FAILURE
    }
}

/// Gateway and ceiling back to back at each level, `rounds` times; a row per round, the
/// medians, and the plot. False on a gap.
fn report_fanout(bench: &Bench) -> bool {
    let options = &bench.options;
    let mut ok = true;
    // `--only fanout-gateway` leaves the ceiling out (for profiling the gateway alone).
    let kinds: &[Kind] = if options.runs("fanout") {
        &[Kind::Gateway, Kind::Ceiling]
    } else {
        &[Kind::Gateway]
    };
    let mut rows = Vec::new();
    for &subscribers in &options.levels {
        for round in 1..=options.rounds {
            let mut pair = Vec::new();
            for &kind in kinds {
                let point = bench.fanout(kind, subscribers);
                eprintln!(
                    "fan-out {:<7} {:>4} subscribers, round {round}: {:>9.0} msg/s",
                    kind.name(),
                    subscribers,
                    point.messages_per_s
                );
                ok &= point.disorder == 0;
                pair.push(point);
            }
            if let [gateway, ceiling] = pair.as_slice() {
                rows.push(FanRow::new(subscribers, round, gateway, ceiling));
            }
        }
    }
    println!();
    println!("## Fan-out: messages/s delivered, live tail, one connection per subscriber");
    println!();
    println!("| subscribers | round | gateway msg/s | ceiling msg/s | ratio | msg per server CPU-s, ratio | server CPU (gw/ceil) | load CPU (gw/ceil) | other CPU |");
    println!("|------------:|------:|--------------:|--------------:|------:|----------------------------:|--------------------:|-------------------:|----------:|");
    for row in &rows {
        println!(
            "| {:>11} | {:>5} | {:>13.0} | {:>13.0} | {:>5.2} | {:>27.2} | {:>9.2} / {:<8.2} | {:>8.2} / {:<7.2} | {:>9.2} |",
            row.subscribers,
            row.round,
            row.gateway,
            row.ceiling,
            row.gateway / row.ceiling,
            row.efficiency,
            row.server_cpu.0,
            row.server_cpu.1,
            row.load_cpu.0,
            row.load_cpu.1,
            row.other_cpu,
        );
    }
    println!();
    println!("Median of {} rounds:", options.rounds);
    println!();
    println!("| subscribers | gateway msg/s | ceiling msg/s | ratio | msg per server CPU-s, ratio | target |");
    println!("|------------:|--------------:|--------------:|------:|----------------------------:|-------:|");
    let mut series = Vec::new();
    for &subscribers in &options.levels {
        let level: Vec<&FanRow> = rows
            .iter()
            .filter(|r| r.subscribers == subscribers)
            .collect();
        if level.is_empty() {
            continue;
        }
        let gateway = median(level.iter().map(|r| r.gateway));
        let ceiling = median(level.iter().map(|r| r.ceiling));
        println!(
            "| {subscribers:>11} | {gateway:>13.0} | {ceiling:>13.0} | {:>5.2} | {:>27.2} | {:>6} |",
            median(level.iter().map(|r| r.gateway / r.ceiling)),
            median(level.iter().map(|r| r.efficiency)),
            if subscribers == 100 { ">=0.85" } else { "-" },
        );
        series.push((subscribers, gateway, ceiling));
    }
    if let Some(path) = &options.plot {
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        match std::fs::write(path, plot(&series)) {
            Ok(()) => println!("\nplot: {}", path.display()),
            Err(error) => eprintln!("cannot write {}: {error}", path.display()),
        }
    }
    ok
}

/// One round of one level: the gateway and the ceiling measured back to back.
struct FanRow {
    subscribers: usize,
    round: usize,
    gateway: f64,
    ceiling: f64,
    /// Messages per server CPU-second, gateway over ceiling: what a message costs the server,
    /// steadier than the rate when other processes take a varying share of the CPUs.
    efficiency: f64,
    server_cpu: (f64, f64),
    load_cpu: (f64, f64),
    other_cpu: f64,
}

impl FanRow {
    fn new(subscribers: usize, round: usize, gateway: &FanPoint, ceiling: &FanPoint) -> Self {
        Self {
            subscribers,
            round,
            gateway: gateway.messages_per_s,
            ceiling: ceiling.messages_per_s,
            efficiency: (gateway.messages_per_s / gateway.cpu.server)
                / (ceiling.messages_per_s / ceiling.cpu.server),
            server_cpu: (gateway.cpu.server, ceiling.cpu.server),
            load_cpu: (gateway.cpu.load, ceiling.cpu.load),
            other_cpu: (gateway.cpu.others + ceiling.cpu.others) / 2.0,
        }
    }
}

/// One subscriber replaying the log, against the ceiling. False on a gap.
fn report_catch_up(bench: &Bench) -> bool {
    let (gateway_rate, gateway_cpu, problems) = bench.catch_up(Kind::Gateway);
    let (ceiling_rate, ceiling_cpu, _) = bench.catch_up(Kind::Ceiling);
    println!();
    println!(
        "## Catch-up: one subscriber replaying {} stored events",
        bench.options.catch_up_events
    );
    println!();
    println!("| gateway msg/s | ceiling msg/s | ratio | target | server CPU (gw/ceil) | load CPU (gw/ceil) |");
    println!("|--------------:|--------------:|------:|-------:|--------------------:|-------------------:|");
    println!(
        "| {gateway_rate:>13.0} | {ceiling_rate:>13.0} | {:>5.2} | >=0.50 | {:>9.2} / {:<8.2} | {:>8.2} / {:<7.2} |",
        gateway_rate / ceiling_rate,
        gateway_cpu.server,
        ceiling_cpu.server,
        gateway_cpu.load,
        ceiling_cpu.load
    );
    problems == 0
}

fn report_memory(bench: &Bench, stall_dir: &Path) {
    let options = &bench.options;
    let (per_stream, before, after) = bench.idle_memory();
    let stall = bench.stalled_memory(stall_dir);
    let growth = stall.peak_kib.saturating_sub(stall.before_kib) * 1024;
    let bound = stall.live_bytes + stall.cache_bytes;
    println!();
    println!("## Memory of the real binary (VmRSS)");
    println!();
    println!("| measure | figure | target |");
    println!("|---------|-------:|-------:|");
    println!(
        "| RSS per idle Subscribe stream ({} streams, 100 per connection; {before} -> {after} KiB) | {:.1} KiB | <= 16 KiB |",
        options.idle_streams,
        per_stream / 1024.0
    );
    println!(
        "| RSS growth, one stalled subscriber, {} events ingested at {:.0}/s ({} -> peak {} -> {} KiB) | {:.1} MiB | <= {:.1} MiB (live buffer {} x {} B + store cache {} MiB) |",
        options.stall_events,
        stall.events_per_s,
        stall.before_kib,
        stall.peak_kib,
        stall.after_kib,
        growth as f64 / 1048576.0,
        bound as f64 / 1048576.0,
        LIVE_BUFFER,
        bench.encoded_len_with_raw(),
        stall.cache_bytes / 1048576,
    );
}

/// POST -> receipt beside the store's sync latency. False when a POST failed or an event is
/// missing at a subscriber.
fn report_latency(bench: &Bench, data: &Path) -> bool {
    let options = &bench.options;
    let appends = if options.plot.is_some() { 300 } else { 30 };
    let sync = bench.sync_latency(&data.join("sync"), appends);
    let latency = bench.latency(&data.join("latency"));
    println!();
    println!(
        "## End-to-end latency: POST /v1/events -> subscriber receipt, {} events/s offered ({:.0} achieved), {} subscribers, embedded store",
        options.latency_rate, latency.offered, options.latency_subscribers
    );
    println!();
    println!("| measure | p50 ms | p99 ms |");
    println!("|---------|-------:|-------:|");
    for (name, h) in [
        ("POST -> receipt by a subscriber", &latency.receipt),
        ("POST -> 200 (ack)", &latency.ack),
        (
            "store's own sync (one record per commit, sequential)",
            &sync,
        ),
    ] {
        println!("| {name} | {:>6.3} | {:>6.3} |", ms(h, 0.5), ms(h, 0.99));
    }
    println!(
        "\nrecords per sync during the run: {:.1}; failed POSTs: {}; events missing at subscribers: {}",
        latency.records_per_sync, latency.failed, latency.missing
    );
    println!(
        "cores busy while POSTing: server {:.2}, load generator and subscribers {:.2}, other processes {:.2}",
        latency.cpu.server, latency.cpu.load, latency.cpu.others
    );
    latency.failed == 0 && latency.missing == 0
}

/// Delivered messages/s against subscriber count (log scale), gateway and ceiling, as SVG.
fn plot(series: &[(usize, f64, f64)]) -> String {
    use common::plot::{Chart, Series, PALETTE};
    let line = |name: &str, color, value: fn(&(usize, f64, f64)) -> f64| Series {
        name: name.to_owned(),
        color,
        points: series.iter().map(|s| (s.0 as f64, value(s))).collect(),
    };
    let mut notes = vec!["gateway / ceiling:".to_owned()];
    notes.extend(
        series
            .iter()
            .map(|s| format!("{} subs: {:.2}", s.0, s.1 / s.2)),
    );
    common::plot::svg(&[Chart {
        title: "Fan-out: messages/s delivered vs subscribers".to_owned(),
        x_label: "concurrent subscribers".to_owned(),
        y_label: "messages/s".to_owned(),
        log_y: false,
        series: vec![
            line("gateway", PALETTE[0], |s| s.1),
            line("ceiling (bare tonic)", PALETTE[1], |s| s.2),
        ],
        notes,
    }])
}

// ---------------------------------------------------------------------------------------------
// Filtered catch-up: ingest latency while many streams scan the log for a filter that matches
// nothing

/// Ingest latency (one POST at a time, 100/s) for `seconds`.
async fn ingest_latency(
    url: &str,
    first_id: i64,
    seconds: f64,
    template: &Template,
) -> Histogram<u64> {
    let http = reqwest::Client::new();
    let mut latency = histogram();
    let started = Instant::now();
    let mut id = first_id;
    while started.elapsed().as_secs_f64() < seconds {
        let due = started + Duration::from_millis(10 * (id - first_id) as u64);
        tokio::time::sleep_until(due.into()).await;
        let sent = Instant::now();
        let response = http
            .post(url)
            .header("content-type", "application/json")
            .body(template.body(id))
            .send()
            .await;
        if matches!(&response, Ok(r) if r.status().is_success()) {
            record_us(&mut latency, sent.elapsed());
        }
        id += 1;
    }
    latency
}

/// Stores `events` events (ids from 1) with JSON array batches, four at a time; how many the
/// answers say were stored.
async fn load(http: &reqwest::Client, url: &str, template: &Arc<Template>, events: u64) -> u64 {
    let next = Arc::new(AtomicU64::new(1));
    let stored = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (http, url, template) = (http.clone(), url.to_owned(), template.clone());
            let (next, stored) = (next.clone(), stored.clone());
            tokio::spawn(async move {
                loop {
                    let first = next.fetch_add(common::BATCH as u64, Ordering::Relaxed);
                    if first > events {
                        return;
                    }
                    let answer = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(template.batch(first as i64))
                        .send()
                        .await;
                    let Ok(answer) = answer else { continue };
                    let value: serde_json::Value = answer.json().await.unwrap_or_default();
                    stored.fetch_add(value["stored"].as_u64().unwrap_or(0), Ordering::Relaxed);
                }
            })
        })
        .collect();
    for worker in workers {
        let _ = worker.await;
    }
    stored.load(Ordering::Relaxed)
}

/// CPU seconds a process has used (user + system), from `/proc/PID/stat`.
fn process_cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) closed by ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

struct FilteredRun {
    quiet: Histogram<u64>,
    scanning: Histogram<u64>,
    /// Cores the gateway process kept busy while the streams scanned.
    cores: f64,
}

impl Bench {
    fn filtered(&self, binary: &Path, dir: &Path) -> FilteredRun {
        let options = &self.options;
        // SAFETY (of the environment): set before the process starts, read by `binary` only.
        std::env::set_var("IQGW_TEST_BINARY", binary);
        let process = binary::Process::start(&[
            "--store",
            "embedded",
            "--data-dir",
            dir.to_str().expect("utf-8 path"),
            "--max-subscribers",
            "100000",
        ]);
        let url = format!("http://{}/v1/events", process.addr);
        let seconds = options.latency_seconds.max(3.0);
        let run = self.load_rt.block_on(async {
            let http = reqwest::Client::new();
            let stored = load(
                &http,
                &format!("{url}:batch"),
                &self.template,
                options.filtered_events,
            )
            .await;
            assert!(
                stored >= options.filtered_events,
                "only {stored} of {} events were stored",
                options.filtered_events
            );
            let first = options.filtered_events as i64 + 10;
            let quiet = ingest_latency(&url, first, seconds, &self.template).await;
            let channel = channel(process.addr).await;
            let mut streams = Vec::new();
            for _ in 0..options.filtered_streams {
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                grpc.ready().await.expect("the channel is ready");
                let request = SubscribeRequest {
                    start: Some(subscribe_request::Start::Beginning(())),
                    filter: Some(iqchannels_gateway::pb::client::Filter {
                        event_types: vec!["no_such_type".into()],
                        ..Default::default()
                    }),
                    ..SubscribeRequest::default()
                };
                let stream = grpc
                    .server_streaming(
                        Request::new(request),
                        http::uri::PathAndQuery::from_static(SUBSCRIBE_PATH),
                        tonic_prost::ProstCodec::<SubscribeRequest, SequenceOnly>::default(),
                    )
                    .await
                    .expect("Subscribe is accepted")
                    .into_inner();
                streams.push(stream);
            }
            let cpu0 = process_cpu_seconds(process_id(&process));
            let started = Instant::now();
            let scanning = ingest_latency(&url, first + 100_000, seconds, &self.template).await;
            let cores = (process_cpu_seconds(process_id(&process)) - cpu0)
                / started.elapsed().as_secs_f64();
            drop(streams);
            FilteredRun {
                quiet,
                scanning,
                cores,
            }
        });
        drop(process);
        run
    }
}

/// The gateway process's id, from its `/proc` entry as `Process` reports its RSS.
fn process_id(process: &binary::Process) -> u32 {
    process.pid()
}

fn report_filtered(bench: &Bench, data: &Path) {
    let options = &bench.options;
    let mut binaries = vec![("this build".to_owned(), binary::gateway_binary())];
    if let Some(baseline) = &options.baseline_binary {
        binaries.push((format!("baseline {}", baseline.display()), baseline.clone()));
    }
    println!();
    println!(
        "## Filtered catch-up: ingest latency (one POST at a time, 100/s, embedded store) with \
         {} streams from the beginning whose filter matches nothing, on one connection, over {} \
         stored events",
        options.filtered_streams, options.filtered_events
    );
    println!();
    println!("| gateway | ingest p50 quiet (ms) | p99 quiet | ingest p50 scanning (ms) | p99 scanning | p50 ratio | gateway cores busy |");
    println!("|---|--:|--:|--:|--:|--:|--:|");
    for (index, (label, binary)) in binaries.iter().enumerate() {
        let dir = data.join(format!("filtered-{index}"));
        let run = bench.filtered(binary, &dir);
        println!(
            "| {label} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1}x | {:.2} |",
            ms(&run.quiet, 0.5),
            ms(&run.quiet, 0.99),
            ms(&run.scanning, 0.5),
            ms(&run.scanning, 0.99),
            ms(&run.scanning, 0.5) / ms(&run.quiet, 0.5).max(0.001),
            run.cores,
        );
    }
}
