//! Load test (not a timed test): the real gateway binary with many subscribers and sustained
//! ingest on loopback for minutes. Reports whether every subscriber got every event exactly once
//! in order, and whether the gateway's memory grew.
//!
//! `cargo bench --bench soak -- [--seconds 180] [--subscribers 200] [--rate 2000] [--store embedded]
//! [--faults]`
//!
//! With `--faults` the gateway is SIGKILLed and restarted at random intervals (every 5 to 20 s),
//! writers retry what was not acknowledged, and subscribers reconnect after their last sequence,
//! as real clients do; the run ends with the model check: every acknowledged event is stored
//! exactly once, sequences are gapless, and every subscriber saw every sequence once, in order.
//!
//! With `--store nats` the gateway stores on a nats-server of the soak's own (JetStream with
//! `sync_interval: always`, the nats-server `.ci/run` installs under `target/tools`, else the
//! one on PATH), and each fault is, at random, a SIGKILL and restart of the gateway or of
//! nats-server (same port, same data). Events may then be stored out of id order (a publish lost
//! with the connection is sent again after later ones), so the model check is: the stored ids are
//! exactly the acknowledged ones, once each, at gapless sequences.
//!
//! Run by `cargo test --all-targets` too (without `--bench`): then it is a short smoke run (with
//! one fault) so it never rots. Exits non-zero on a lost, repeated or out-of-order event, or
//! memory growth.

#[path = "../tests/binary/mod.rs"]
mod binary;

use std::collections::HashSet;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use binary::{event, Process};
use iqchannels_gateway::pb::client::event_gateway_client::EventGatewayClient;
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};
use tokio_stream::StreamExt;

struct Options {
    seconds: u64,
    subscribers: usize,
    rate: u64,
    store: String,
    faults: bool,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let mut options = if full {
        Options {
            seconds: 180,
            subscribers: 200,
            rate: 2000,
            store: "embedded".into(),
            faults: false,
        }
    } else {
        Options {
            seconds: 6,
            subscribers: 20,
            rate: 500,
            store: "embedded".into(),
            faults: true,
        }
    };
    let mut it = args.iter().skip(1);
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_default();
        match arg.as_str() {
            "--seconds" => options.seconds = value().parse().unwrap_or(options.seconds),
            "--subscribers" => options.subscribers = value().parse().unwrap_or(options.subscribers),
            "--rate" => options.rate = value().parse().unwrap_or(options.rate),
            "--store" => options.store = value(),
            "--faults" => options.faults = true,
            _ => {}
        }
    }
    options
}

/// What one subscriber saw.
#[derive(Default)]
struct Tally {
    received: AtomicU64,
    /// Events that were not exactly `previous + 1`.
    out_of_order: AtomicU64,
}

fn main() -> ExitCode {
    let options = options();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(options))
}

async fn run(options: Options) -> ExitCode {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("temp dir on the real disk");
    let data = dir.path().to_str().expect("utf-8 path").to_owned();
    let mut nats = if options.store == "nats" {
        match Nats::start(dir.path()) {
            Ok(nats) => Some(nats),
            Err(error) => {
                println!("soak FAILED: {error}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let store = match &nats {
        Some(nats) => format!("nats://127.0.0.1:{}", nats.port),
        None => options.store.clone(),
    };
    let args = [
        "--store",
        &store,
        "--data-dir",
        &data,
        "--max-subscribers",
        "100000",
        "--nats-stream",
        "IQGW_SOAK",
        "--nats-ack-timeout",
        "2s",
    ];
    let mut process = Process::start(&args);
    let addr = process.addr;
    println!(
        "soak: {} s, {} subscribers, {} events/s, store {}{} (gateway on {addr})",
        options.seconds,
        options.subscribers,
        options.rate,
        options.store,
        if options.faults { ", with faults" } else { "" },
    );

    let tallies: Vec<Arc<Tally>> = (0..options.subscribers).map(|_| Arc::default()).collect();
    for tally in &tallies {
        tokio::spawn(follow(format!("http://{addr}"), tally.clone()));
    }

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    let batch = 50u64;
    let mut ticker =
        tokio::time::interval(Duration::from_secs_f64(batch as f64 / options.rate as f64));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut retries = 0u64;
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut peak_rss = 0u64;
    let mut next_sample = Instant::now();
    let mut faults = Faults::new(options.faults, options.seconds);
    let mut nats_restarts = 0u64;
    // A batch not acknowledged is sent again until it is, even past the end: the model check
    // expects exactly the acknowledged ids.
    let mut unacknowledged = false;
    while started.elapsed() < Duration::from_secs(options.seconds) || unacknowledged {
        ticker.tick().await;
        let in_time = started.elapsed() < Duration::from_secs(options.seconds);
        if in_time && faults.due(started.elapsed()) {
            match nats.as_mut() {
                Some(nats) if faults.coin() => {
                    if let Err(error) = nats.restart() {
                        println!("soak FAILED: {error}");
                        return ExitCode::FAILURE;
                    }
                    nats_restarts += 1;
                    println!(
                        "fault {}: nats-server SIGKILL and restart at {:.1} s",
                        faults.done,
                        started.elapsed().as_secs_f64()
                    );
                }
                _ => {
                    process.kill();
                    process = Process::start_on(&addr.to_string(), &args);
                    println!(
                        "fault {}: gateway SIGKILL and restart at {:.1} s",
                        faults.done,
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
        let mut body = Vec::new();
        for id in sent..sent + batch {
            body.extend_from_slice(&event(id as i64 + 1));
            body.push(b'\n');
        }
        // A batch not acknowledged is sent again (same ids: a redelivery is stored once).
        let response = http
            .post(process.url("/v1/events:batch"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await;
        match response {
            Ok(response) if response.status() == 200 => {
                // On NATS a batch may be stored in part (`unavailable` items): send it again.
                let answer: serde_json::Value = response.json().await.unwrap_or_default();
                let stored = answer["stored"].as_u64().unwrap_or(0)
                    + answer["duplicates"].as_u64().unwrap_or(0);
                if stored == batch {
                    sent += batch;
                    unacknowledged = false;
                } else {
                    retries += 1;
                    unacknowledged = true;
                    println!("batch stored {stored} of {batch}; sending it again");
                }
            }
            Ok(response) => {
                unacknowledged = true;
                retries += 1;
                println!("batch answered {}; sending it again", response.status())
            }
            Err(error) => {
                unacknowledged = true;
                retries += 1;
                println!("batch failed ({error}); sending it again")
            }
        }
        if Instant::now() >= next_sample {
            let rss = process.rss_kib();
            peak_rss = peak_rss.max(rss);
            samples.push((started.elapsed().as_secs_f64(), rss));
            next_sample += Duration::from_secs(1);
        }
    }

    // Let every subscriber drain.
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline
        && tallies
            .iter()
            .any(|t| t.received.load(Ordering::Relaxed) < sent)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let received: Vec<u64> = tallies
        .iter()
        .map(|t| t.received.load(Ordering::Relaxed))
        .collect();
    let disorder: u64 = tallies
        .iter()
        .map(|t| t.out_of_order.load(Ordering::Relaxed))
        .sum();
    let (min, max) = (
        received.iter().min().copied().unwrap_or(0),
        received.iter().max().copied().unwrap_or(0),
    );
    // The model check: the store holds events 1..=sent, each id once, in the order they were
    // acknowledged (ids were sent in order, so sequence n holds id n).
    let stored = model_check(&process, sent, nats.is_none()).await;

    // Memory: the first quarter (after warm-up) against the last quarter.
    let quarter = samples.len() / 4;
    let average =
        |s: &[(f64, u64)]| s.iter().map(|x| x.1).sum::<u64>() as f64 / s.len().max(1) as f64;
    let early = average(
        &samples[quarter.min(samples.len())..(2 * quarter).max(quarter + 1).min(samples.len())],
    );
    let late = average(&samples[samples.len().saturating_sub(quarter.max(1))..]);
    let growth = if early > 0.0 && !options.faults {
        (late - early) / early
    } else {
        0.0
    };

    println!(
        "events ingested:          {sent} ({:.0}/s), batches sent again: {retries}",
        sent as f64 / started.elapsed().as_secs_f64()
    );
    println!(
        "faults:                   {} gateway SIGKILLs and restarts, {nats_restarts} of \
         nats-server",
        faults.done - nats_restarts
    );
    println!("received per subscriber:  min {min}, max {max}");
    println!(
        "lost or repeated:         {}",
        if min == sent && max == sent && disorder == 0 {
            "none"
        } else {
            "YES"
        }
    );
    println!("out-of-order deliveries:  {disorder}");
    println!(
        "model check:              {}",
        match &stored {
            Ok(()) if nats.is_none() => {
                "every acknowledged event stored once, gapless, in order".to_owned()
            }
            Ok(()) => "every acknowledged event stored once, at gapless sequences".to_owned(),
            Err(error) => format!("FAILED: {error}"),
        }
    );
    println!(
        "gateway RSS:              {:.1} MiB early, {:.1} MiB late ({:+.1}%), peak {:.1} MiB",
        early / 1024.0,
        late / 1024.0,
        growth * 100.0,
        peak_rss as f64 / 1024.0
    );
    let ok = min == sent && max == sent && disorder == 0 && growth < 0.25 && stored.is_ok();
    println!("soak {}", if ok { "passed" } else { "FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// When to inject the next fault: at random intervals of 5 to 20 s (one early fault in a short
/// smoke run).
struct Faults {
    enabled: bool,
    next: Duration,
    done: u64,
    state: u64,
}

impl Faults {
    fn new(enabled: bool, seconds: u64) -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
            | 1;
        let first = if seconds < 30 {
            Duration::from_secs(seconds / 2)
        } else {
            Duration::from_secs(5)
        };
        Self {
            enabled,
            next: first,
            done: 0,
            state: seed,
        }
    }

    /// A fair coin from the same generator.
    fn coin(&mut self) -> bool {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.state % 2 == 0
    }

    fn due(&mut self, elapsed: Duration) -> bool {
        if !self.enabled || elapsed < self.next {
            return false;
        }
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        self.next = elapsed + Duration::from_secs(5 + self.state % 16);
        self.done += 1;
        true
    }
}

/// One subscriber: from the beginning, reconnecting after errors and resuming after the last
/// sequence it received, counting what breaks the order.
async fn follow(server: String, tally: Arc<Tally>) {
    let mut previous = 0u64;
    loop {
        let Ok(mut client) = EventGatewayClient::connect(server.clone()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let start = if previous == 0 {
            Start::Beginning(())
        } else {
            Start::AfterSequence(previous)
        };
        let request = SubscribeRequest {
            start: Some(start),
            ..SubscribeRequest::default()
        };
        let Ok(response) = client.subscribe(request).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let mut stream = response.into_inner();
        while let Some(Ok(event)) = stream.next().await {
            if event.sequence != previous + 1 {
                tally.out_of_order.fetch_add(1, Ordering::Relaxed);
            }
            previous = event.sequence;
            tally.received.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the whole log from the beginning: sequences 1..=sent, gapless, holding the ids
/// 1..=sent once each (in id order too when `in_order`: one writer on the embedded store), and
/// nothing after.
async fn model_check(process: &Process, sent: u64, in_order: bool) -> Result<(), String> {
    let mut client = process.grpc().await;
    let request = SubscribeRequest {
        start: Some(Start::Beginning(())),
        ..SubscribeRequest::default()
    };
    let mut stream = client
        .subscribe(request)
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let mut ids = HashSet::new();
    for sequence in 1..=sent {
        let event = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .map_err(|_| format!("sequence {sequence} did not arrive"))?
            .ok_or("the stream ended")?
            .map_err(|e| e.to_string())?;
        let id = event
            .envelope
            .and_then(|e| e.chat_event)
            .map(|e| e.id)
            .unwrap_or_default();
        if event.sequence != sequence {
            return Err(format!(
                "sequence {} where {sequence} was due",
                event.sequence
            ));
        }
        if in_order && id != sequence as i64 {
            return Err(format!("sequence {sequence} holds id {id}"));
        }
        if !(1..=sent as i64).contains(&id) || !ids.insert(id) {
            return Err(format!(
                "sequence {sequence} holds id {id}: not acknowledged, or twice"
            ));
        }
    }
    if let Ok(Some(Ok(extra))) =
        tokio::time::timeout(Duration::from_millis(500), stream.next()).await
    {
        return Err(format!(
            "an event beyond the acknowledged ones: {}",
            extra.sequence
        ));
    }
    Ok(())
}

/// The soak's own nats-server with JetStream, restarted on the same port and data.
struct Nats {
    binary: std::path::PathBuf,
    config: std::path::PathBuf,
    port: u16,
    child: Child,
}

impl Nats {
    fn start(dir: &std::path::Path) -> Result<Self, String> {
        let installed = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/tools/nats-server/bin/nats-server");
        let (binary, sync) = if installed.exists() {
            (installed, ", sync_interval: always")
        } else {
            println!(
                "WARNING: {} is missing (.ci/run installs it); the nats-server on PATH may be too \
                 old for `sync_interval: always`, so a SIGKILL of it may lose acknowledged events",
                installed.display()
            );
            ("nats-server".into(), "")
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\njetstream {{ store_dir: \"{}\"{sync} }}\n",
                dir.join("nats").display()
            ),
        )
        .map_err(|e| format!("cannot write {}: {e}", config.display()))?;
        let child = Self::spawn(&binary, &config, port)?;
        Ok(Self {
            binary,
            config,
            port,
            child,
        })
    }

    fn spawn(
        binary: &std::path::Path,
        config: &std::path::Path,
        port: u16,
    ) -> Result<Child, String> {
        let child = Command::new(binary)
            .arg("-c")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", binary.display()))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        for _ in 0..200 {
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                return Ok(child);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("nats-server did not listen on {addr}"))
    }

    /// SIGKILL and start again.
    fn restart(&mut self) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = Self::spawn(&self.binary, &self.config, self.port)?;
        Ok(())
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
