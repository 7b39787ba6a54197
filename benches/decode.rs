//! The tolerant decode against the strict (fast) one on the same items (issue 18, point 4).
//!
//! Each shape is decoded twice: with `"Id": 5` the body fits the protos and takes the fast,
//! strict path; with `"Id": "5"` (a coerced id) the same bytes otherwise go through the tolerant
//! decode. The ratio of their times is the figure; the goal is at most 5.
//!
//! `cargo bench --bench decode` (`-- --quick` for a smoke run, which `cargo test --benches` does).

use std::hint::black_box;
use std::time::{Duration, Instant};

use iqchannels_gateway::decode::{decode_with, Policy};

/// A body with `ChatEvent.Id` given as `id` and `rels` as its `Rels`.
fn body(id: &str, rels: &str) -> Vec<u8> {
    format!(
        r#"{{"ChatEvent": {{"Id": {id}, "Type": "chat_closed", "ChatId": 1}}, "Rels": {rels}}}"#
    )
    .into_bytes()
}

/// `items` numbers in an opaque `Options` under a key of `key` bytes.
fn opaque(items: usize, key: usize) -> String {
    let numbers = vec!["1"; items].join(",");
    format!(
        r#"{{"Projects": [{{"Id": 1, "Options": {{"{}": [{numbers}]}}}}]}}"#,
        "k".repeat(key)
    )
}

/// `items` chat messages, typed.
fn messages(items: usize) -> String {
    let message = r#"{"Id": 7, "ChatId": 1, "Payload": "text", "Text": "Привет, мир", "CreatedAt": 1632751088427, "Read": true}"#;
    format!(
        r#"{{"ChatMessages": [{}]}}"#,
        vec![message; items].join(",")
    )
}

/// Median time of `runs` decodes of `body`, which must decode.
fn time(body: &[u8], runs: usize) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            let decoded = decode_with(black_box(body), Policy::Tolerant).expect("decodes");
            black_box(decoded);
            started.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

/// Median time of handing a no-op to a blocking thread and getting its result back (what a body
/// decoded on the pool pays beyond the decode).
fn hand_over(runs: usize) -> Duration {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("runtime");
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            runtime.block_on(async {
                let started = Instant::now();
                tokio::task::spawn_blocking(|| black_box(1))
                    .await
                    .expect("joins");
                started.elapsed()
            })
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn main() {
    let quick =
        std::env::args().any(|a| a == "--quick") || !std::env::args().any(|a| a == "--bench");
    let (scale, runs) = if quick { (20, 3) } else { (1, 11) };
    let shapes = [
        (
            "270,000 numbers under a 480 KB key",
            opaque(270_000 / scale, 480_000 / scale),
        ),
        (
            "270,000 numbers under a short key",
            opaque(270_000 / scale, 8),
        ),
        ("8,000 typed chat messages", messages(8_000 / scale)),
    ];
    let hand = hand_over(if quick { 11 } else { 1001 });
    println!(
        "hand-over to a blocking thread and back: {:.1} µs",
        hand.as_secs_f64() * 1e6
    );
    for items in [10, 40, 160] {
        let small = body("\"5\"", &messages(items));
        println!(
            "tolerant decode of {} bytes: {:.1} µs",
            small.len(),
            time(&small, runs * 10).as_secs_f64() * 1e6
        );
    }
    println!();
    println!("| shape | body | strict | tolerant | tolerant / strict |");
    println!("|---|---|---|---|---|");
    for (name, rels) in shapes {
        let strict = body("5", &rels);
        let tolerant = body("\"5\"", &rels);
        let coerced = decode_with(&tolerant, Policy::Tolerant).expect("decodes");
        assert_eq!(
            coerced.deviations.len(),
            1,
            "{name}: only the id is coerced"
        );
        let fast = decode_with(&strict, Policy::Tolerant).expect("decodes");
        assert!(fast.deviations.is_empty(), "{name}: the strict body fits");
        let (s, t) = (time(&strict, runs), time(&tolerant, runs));
        println!(
            "| {name} | {} KB | {:.1} ms | {:.1} ms | {:.2} |",
            strict.len() / 1000,
            s.as_secs_f64() * 1e3,
            t.as_secs_f64() * 1e3,
            t.as_secs_f64() / s.as_secs_f64()
        );
    }
}
