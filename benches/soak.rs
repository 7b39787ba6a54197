//! Load test (not a timed test): the real gateway binary with many subscribers and sustained
//! ingest on loopback for minutes. Reports whether every subscriber got every event exactly once
//! in order, and whether the gateway's memory grew.
//!
//! `cargo bench --bench soak -- [--seconds 180] [--subscribers 200] [--rate 2000] [--store embedded]`
//!
//! Run by `cargo test --all-targets` too (without `--bench`): then it is a 3-second smoke run so
//! it never rots. Exits non-zero on a lost, repeated or out-of-order event, or memory growth.

#[path = "../tests/binary/mod.rs"]
mod binary;

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use binary::{event, Process};
use iqchannels_gateway::pb::client::SubscribeRequest;
use tokio_stream::StreamExt;

struct Options {
    seconds: u64,
    subscribers: usize,
    rate: u64,
    store: String,
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
        }
    } else {
        Options {
            seconds: 3,
            subscribers: 20,
            rate: 500,
            store: "embedded".into(),
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
    let process = Process::start(&[
        "--store",
        &options.store,
        "--data-dir",
        &data,
        "--max-subscribers",
        "100000",
    ]);
    println!(
        "soak: {} s, {} subscribers, {} events/s, store {} (gateway pid on {})",
        options.seconds, options.subscribers, options.rate, options.store, process.addr
    );

    let tallies: Vec<Arc<Tally>> = (0..options.subscribers).map(|_| Arc::default()).collect();
    let channel = process.grpc().await;
    for tally in &tallies {
        let mut client = channel.clone();
        let request = SubscribeRequest {
            start: Some(iqchannels_gateway::pb::client::subscribe_request::Start::Beginning(())),
            ..SubscribeRequest::default()
        };
        let mut stream = client
            .subscribe(request)
            .await
            .expect("subscribe")
            .into_inner();
        let tally = tally.clone();
        tokio::spawn(async move {
            let mut previous = 0;
            while let Some(Ok(event)) = stream.next().await {
                if event.sequence != previous + 1 {
                    tally.out_of_order.fetch_add(1, Ordering::Relaxed);
                }
                previous = event.sequence;
                tally.received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    let http = reqwest::Client::new();
    let batch = 50u64;
    let mut ticker =
        tokio::time::interval(Duration::from_secs_f64(batch as f64 / options.rate as f64));
    let started = Instant::now();
    let mut sent = 0u64;
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut next_sample = Instant::now();
    while started.elapsed() < Duration::from_secs(options.seconds) {
        ticker.tick().await;
        let mut body = Vec::new();
        for id in sent..sent + batch {
            body.extend_from_slice(&event(id as i64 + 1));
            body.push(b'\n');
        }
        let response = http
            .post(process.url("/v1/events:batch"))
            .header("content-type", "application/x-ndjson")
            .body(body)
            .send()
            .await;
        match response {
            Ok(response) if response.status() == 200 => sent += batch,
            Ok(response) => println!("batch answered {}", response.status()),
            Err(error) => println!("batch failed: {error}"),
        }
        if Instant::now() >= next_sample {
            samples.push((started.elapsed().as_secs_f64(), process.rss_kib()));
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

    // Memory: the first quarter (after warm-up) against the last quarter.
    let quarter = samples.len() / 4;
    let average =
        |s: &[(f64, u64)]| s.iter().map(|x| x.1).sum::<u64>() as f64 / s.len().max(1) as f64;
    let early = average(
        &samples[quarter.min(samples.len())..(2 * quarter).max(quarter + 1).min(samples.len())],
    );
    let late = average(&samples[samples.len().saturating_sub(quarter.max(1))..]);
    let growth = if early > 0.0 {
        (late - early) / early
    } else {
        0.0
    };

    println!(
        "events ingested:          {sent} ({:.0}/s)",
        sent as f64 / started.elapsed().as_secs_f64()
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
        "gateway RSS:              {:.1} MiB early, {:.1} MiB late ({:+.1}%)",
        early / 1024.0,
        late / 1024.0,
        growth * 100.0
    );
    let ok = min == sent && max == sent && disorder == 0 && growth < 0.25;
    println!("soak {}", if ok { "passed" } else { "FAILED" });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
