//! JetStream benchmark (issue 4, point 6): the gateway's ingest with the JetStream store beside a
//! raw async-nats JetStream publish-with-ack of the same bytes, in the same run, as a ratio.
//!
//! - **gateway**: `POST /v1/events` over HTTP/1.1 keep-alive to the gateway (in this process,
//!   `server::serve`) on `JetStreamLog`, which answers 200 only after JetStream's ack;
//! - **raw**: async-nats `send_publish` of the same body with `Nats-Msg-Id` = the event id, then
//!   awaiting the ack, to a stream of the same configuration (`NatsConfig::stream_config`);
//!
//! at 1, 32 and 128 concurrent connections (gateway) or publishers (raw), each one request at a
//! time, back to back per level. Both streams get unique names and are deleted at the end.
//!
//! `cargo bench --bench jetstream [-- --seconds 5] [--runs 3] [--quick] [--nats HOST:PORT]`.
//! Without `--bench` (`cargo test --all-targets`) it is a smoke run of a few seconds. When NATS is
//! not reachable it fails under `CI=true` and otherwise prints SKIPPED and exits 0.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use iqchannels_gateway::log::jetstream::{JetStreamLog, NatsConfig};
use iqchannels_gateway::server::{serve, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

mod common;
use common::Template;

const USAGE: &str = "\
JetStream benchmark: gateway ingest on the JetStream store vs raw JetStream publish-with-ack

usage: cargo bench --bench jetstream [-- OPTIONS]

  --seconds S       measured seconds per point (default 5; 0.5 with --quick)
  --runs N          repeat N times and record the medians (default 3; 1 with --quick)
  --quick           smoke run: 1 and 32 concurrent, one run (the default without --bench,
                    i.e. under `cargo test --all-targets`)
  --nats HOST:PORT  the NATS server with JetStream (default 127.0.0.1:4222, or $IQGW_BENCH_NATS)
  --help            this text";

struct Options {
    seconds: f64,
    runs: usize,
    quick: bool,
    nats: String,
}

fn parse_options() -> Result<Options, String> {
    let mut seconds = None;
    let mut runs = None;
    let mut quick = !std::env::args().any(|arg| arg == "--bench");
    let mut nats = std::env::var("IQGW_BENCH_NATS").unwrap_or_else(|_| "127.0.0.1:4222".to_owned());
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--seconds" => {
                let text = value("--seconds")?;
                let parsed: f64 = text
                    .parse()
                    .map_err(|_| format!("--seconds: not a number: {text}"))?;
                if !(parsed > 0.0 && parsed.is_finite()) {
                    return Err(format!("--seconds must be positive, got {text}"));
                }
                seconds = Some(parsed);
            }
            "--runs" => {
                let text = value("--runs")?;
                match text.parse::<usize>() {
                    Ok(parsed) if parsed > 0 => runs = Some(parsed),
                    _ => return Err(format!("--runs: not a whole number >= 1: {text}")),
                }
            }
            "--nats" => nats = value("--nats")?,
            "--quick" => quick = true,
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
        nats,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Gateway,
    Raw,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Gateway => "gateway",
            Target::Raw => "raw-jetstream",
        }
    }
}

/// One row of one run.
#[derive(Clone)]
struct Point {
    target: Target,
    concurrency: usize,
    requests_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    failures: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

fn record(latency_us: &mut Histogram<u64>, started: Instant) {
    let elapsed = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    latency_us.saturating_record(elapsed);
}

/// What both targets share.
struct Plan {
    warmup: Duration,
    length: Duration,
    template: Arc<Template>,
    ids: Arc<AtomicI64>,
}

/// One worker's tally: requests, failures, latencies.
type Tally = (u64, u64, Histogram<u64>);

/// Runs `workers` tasks, each calling `one` in a loop for the warm-up and then the measured
/// seconds; `one` returns whether the event was stored as new.
async fn drive<S, F, Fut>(target: Target, states: Vec<S>, plan: &Plan, one: F) -> Point
where
    S: Send + 'static,
    F: Fn(S, i64) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = (S, bool)> + Send,
{
    let concurrency = states.len();
    let warm_until = Instant::now() + plan.warmup;
    let until = warm_until + plan.length;
    let tasks: Vec<_> = states
        .into_iter()
        .map(|mut state| {
            let (one, ids) = (one.clone(), plan.ids.clone());
            tokio::spawn(async move {
                let (mut requests, mut failures, mut latency_us) = (0, 0, histogram());
                loop {
                    let now = Instant::now();
                    if now >= until {
                        break;
                    }
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    let (next, stored) = one(state, id).await;
                    state = next;
                    if now >= warm_until {
                        requests += 1;
                        failures += u64::from(!stored);
                        record(&mut latency_us, now);
                    }
                }
                (requests, failures, latency_us)
            })
        })
        .collect();
    let mut total: Tally = (0, 0, histogram());
    for task in tasks {
        let (requests, failures, latency_us) = task.await.expect("a load task panicked");
        total.0 += requests;
        total.1 += failures;
        total
            .2
            .add(&latency_us)
            .expect("histograms with the same bounds add");
    }
    Point {
        target,
        concurrency,
        requests_per_s: total.0 as f64 / plan.length.as_secs_f64(),
        p50_ms: total.2.value_at_quantile(0.50) as f64 / 1000.0,
        p99_ms: total.2.value_at_quantile(0.99) as f64 / 1000.0,
        failures: total.1,
    }
}

/// `POST /v1/events` on `connections` HTTP/1.1 keep-alive connections to the gateway.
async fn gateway_point(addr: SocketAddr, connections: usize, plan: &Plan) -> Point {
    let mut senders: Vec<SendRequest<Full<Bytes>>> = Vec::with_capacity(connections);
    for _ in 0..connections {
        let stream = TcpStream::connect(addr)
            .await
            .expect("connect to the gateway");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(connection);
        senders.push(sender);
    }
    let host = HeaderValue::from_str(&addr.to_string()).expect("an address is a valid Host");
    let template = plan.template.clone();
    drive(Target::Gateway, senders, plan, move |mut sender, id| {
        let request = Request::post("/v1/events")
            .header(HOST, host.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(template.body(id)))
            .expect("a valid request");
        async move {
            let stored = async {
                sender.ready().await.ok()?;
                let response = sender.send_request(request).await.ok()?;
                let ok = response.status() == StatusCode::OK;
                let body = response.into_body().collect().await.ok()?.to_bytes();
                let fresh = b"\"duplicate\":false";
                Some(ok && body.windows(fresh.len()).any(|w| w == fresh))
            }
            .await
            .unwrap_or(false);
            (sender, stored)
        }
    })
    .await
}

/// The same bodies published straight to JetStream by `publishers` tasks, each awaiting its ack.
async fn raw_point(
    context: &async_nats::jetstream::Context,
    prefix: &str,
    publishers: usize,
    plan: &Plan,
) -> Point {
    let template = plan.template.clone();
    let prefix = prefix.to_owned();
    let states = vec![context.clone(); publishers];
    drive(Target::Raw, states, plan, move |context, id| {
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(template.body(id))
            .message_id(id.to_string());
        let subject = iqchannels_gateway::log::jetstream::event_subject(&prefix, id);
        async move {
            let stored = match context.send_publish(subject, message).await {
                Ok(ack) => ack.await.is_ok_and(|ack| !ack.duplicate),
                Err(_) => false,
            };
            (context, stored)
        }
    })
    .await
}

/// The two streams of this run, deleted when dropped (also after a panic).
struct Streams {
    nats: String,
    names: Vec<String>,
}

impl Drop for Streams {
    fn drop(&mut self) {
        let (nats, names) = (self.nats.clone(), self.names.clone());
        // On a runtime of its own: drop may run outside one, or inside a panicking one.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let context = async_nats::jetstream::new(async_nats::connect(nats).await.ok()?);
                for name in &names {
                    if let Err(error) = context.delete_stream(name).await {
                        eprintln!("could not delete the stream {name}: {error}");
                    }
                }
                Some(())
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(()))) {
            eprintln!("could not reach NATS to delete the bench streams");
        }
    }
}

fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{}_{}", std::process::id(), nanos % 1_000_000_000_000)
}

fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()
        .expect("a tokio runtime")
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
    let reachable = options
        .nats
        .parse::<SocketAddr>()
        .ok()
        .and_then(|addr| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok())
        .is_some();
    if !reachable {
        let message = format!(
            "NATS is not reachable at {}: the JetStream benchmark did not run",
            options.nats
        );
        if std::env::var("CI").as_deref() == Ok("true") {
            eprintln!("{message}");
            return ExitCode::FAILURE;
        }
        eprintln!("\n!!!!! SKIPPED: {message} !!!!!\n");
        return ExitCode::SUCCESS;
    }

    let server_rt = runtime("gw-server");
    let load_rt = runtime("gw-load");
    let suffix = unique_suffix();
    let url = format!("nats://{}", options.nats);
    let gateway_config = NatsConfig {
        stream: format!("IQGW_BENCH_GATEWAY_{suffix}"),
        subject_prefix: format!("iqgw_bench.gateway_{suffix}"),
        ..NatsConfig::new(url.clone())
    };
    let raw_config = NatsConfig {
        stream: format!("IQGW_BENCH_RAW_{suffix}"),
        subject_prefix: format!("iqgw_bench.raw_{suffix}"),
        ..NatsConfig::new(url.clone())
    };
    let _streams = Streams {
        nats: options.nats.clone(),
        names: vec![gateway_config.stream.clone(), raw_config.stream.clone()],
    };

    // The gateway, on its runtime.
    let log = match server_rt.block_on(JetStreamLog::connect(gateway_config.clone())) {
        Ok(log) => Arc::new(log),
        Err(error) => {
            eprintln!("the JetStream store did not open: {error}");
            return ExitCode::FAILURE;
        }
    };
    let listener = server_rt
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .expect("bind 127.0.0.1:0");
    let addr = listener.local_addr().expect("the listener's address");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = server_rt.spawn(async move {
        let shutdown = async move {
            let _ = stopped.await;
        };
        let config = ServerConfig {
            grace: Duration::from_secs(2),
            ..ServerConfig::default()
        };
        if let Err(error) = serve(listener, log, config, shutdown).await {
            eprintln!("gateway failed: {error}");
        }
    });

    // The raw publisher's stream: the configuration the gateway creates for its own.
    let context = load_rt.block_on(async {
        let client = async_nats::connect(options.nats.as_str()).await.ok()?;
        let context = async_nats::jetstream::new(client);
        context
            .create_stream(raw_config.stream_config())
            .await
            .ok()?;
        Some(context)
    });
    let Some(context) = context else {
        eprintln!("could not create the raw stream {}", raw_config.stream);
        return ExitCode::FAILURE;
    };

    let levels: &[usize] = if options.quick {
        &[1, 32]
    } else {
        &[1, 32, 128]
    };
    let plan = Plan {
        length: Duration::from_secs_f64(options.seconds),
        warmup: Duration::from_secs_f64((options.seconds / 5.0).min(1.0)),
        template: Arc::new(Template::load()),
        ids: Arc::new(AtomicI64::new(1_000_000_000)),
    };
    println!("# JetStream benchmark: gateway POST /v1/events on --store nats://{} vs raw async-nats publish-with-ack", options.nats);
    println!(
        "# body: ../shared/fixtures/chat_closed.json ({} bytes), a unique ChatEvent.Id per request; \
         the raw publisher sends that body, the gateway stores its protobuf record (envelope + the body)",
        plan.template.body(1_000_000_000).len()
    );
    println!(
        "# streams {} and {} (file storage, the gateway's layout: a subject per id bucket, dedup by Nats-Msg-Id), deleted at the end",
        gateway_config.stream, raw_config.stream
    );
    println!(
        "# {} run(s); {} s measured per point after {} s warm-up; CPUs: {}",
        options.runs,
        options.seconds,
        plan.warmup.as_secs_f64(),
        std::thread::available_parallelism().map_or(1, usize::from)
    );

    let mut points = Vec::new();
    for run in 1..=options.runs {
        for &concurrency in levels {
            for target in [Target::Gateway, Target::Raw] {
                let point = load_rt.block_on(async {
                    match target {
                        Target::Gateway => gateway_point(addr, concurrency, &plan).await,
                        Target::Raw => {
                            raw_point(&context, &raw_config.subject_prefix, concurrency, &plan)
                                .await
                        }
                    }
                });
                eprintln!(
                    "run {run}: {:<13} {concurrency:>4} concurrent: {:>7.0} req/s",
                    target.name(),
                    point.requests_per_s
                );
                points.push(point);
            }
        }
    }
    let _ = stop.send(());
    server_rt.block_on(async {
        if tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .is_err()
        {
            eprintln!("the gateway did not stop within 10 s; going on");
        }
    });

    print_report(&points, levels, options.runs);
    let failures: u64 = points.iter().map(|point| point.failures).sum();
    if failures > 0 {
        eprintln!("{failures} requests were not stored as new events");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// The point with the median rate among the runs (the lower middle one for an even count).
fn median_point(points: &[Point], target: Target, concurrency: usize) -> Option<&Point> {
    let mut matching: Vec<&Point> = points
        .iter()
        .filter(|point| point.target == target && point.concurrency == concurrency)
        .collect();
    matching.sort_by(|a, b| a.requests_per_s.total_cmp(&b.requests_per_s));
    matching.get((matching.len().max(1) - 1) / 2).copied()
}

fn print_report(points: &[Point], levels: &[usize], runs: usize) {
    println!();
    println!("Figures: for each row, the run with the median rate of {runs} run(s).");
    println!();
    println!("| target        | concurrent |   req/s | p50 ms | p99 ms |");
    println!("|---------------|-----------:|--------:|-------:|-------:|");
    for target in [Target::Gateway, Target::Raw] {
        for &concurrency in levels {
            if let Some(point) = median_point(points, target, concurrency) {
                println!(
                    "| {:<13} | {:>10} | {:>7.0} | {:>6.3} | {:>6.3} |",
                    target.name(),
                    concurrency,
                    point.requests_per_s,
                    point.p50_ms,
                    point.p99_ms
                );
            }
        }
    }
    println!();
    println!("| concurrent | gateway / raw-jetstream (median of per-run ratios; each run's in brackets) |");
    println!("|-----------:|---------------------------------------------------------------------------:|");
    for &concurrency in levels {
        let rates = |target: Target| -> Vec<f64> {
            points
                .iter()
                .filter(|point| point.target == target && point.concurrency == concurrency)
                .map(|point| point.requests_per_s)
                .collect()
        };
        let mut ratios: Vec<f64> = rates(Target::Gateway)
            .iter()
            .zip(rates(Target::Raw))
            .map(|(gateway, raw)| gateway / raw)
            .collect();
        let each = ratios
            .iter()
            .map(|ratio| format!("{ratio:.2}"))
            .collect::<Vec<_>>()
            .join(" ");
        ratios.sort_by(f64::total_cmp);
        let median = ratios.get((ratios.len().max(1) - 1) / 2).copied();
        let cell = format!("{:.2} [{each}]", median.unwrap_or(f64::NAN));
        println!("| {concurrency:>10} | {cell:>74} |");
    }
}
