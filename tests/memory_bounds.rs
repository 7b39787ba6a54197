//! Memory is bounded in bytes whatever the sizes of the events and however many readers stop
//! reading (DESIGN invariant 4), on every store, against the real binary: seeded random mixes of
//! tiny and huge events (up to ~900 KB, in both orders), many gRPC and SSE readers that stop
//! reading, some catching up from the beginning and some on the live tail, and on NATS the tail
//! cache with nobody subscribed. The resident memory (VmRSS) may grow by the configured budgets
//! plus a constant per connection, nothing more.
//!
//! `IQGW_MEMORY_SEED=<n>` replays a run; `IQGW_MEMORY_LONG=1` runs more rounds with more events
//! (minutes instead of seconds).

mod binary;
mod nats;
mod stall;

use std::time::Duration;

use binary::Process;
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};
use nats::{reachable, require, TestStream, SHARED_NATS};
use stall::{stalled_grpc, stalled_sse};

/// The budgets given to the gateway under test (through their environment variables, so that
/// a binary without them still starts: the test then shows what it holds).
const CATCH_UP: usize = 16 << 20;

/// `--catch-up-memory` for `readers` readers that stop reading: at least [`CATCH_UP`], and enough
/// for each to hold two huge events and a page (README's sizing rule: what its socket's buffers
/// hold back, and its page), so that a reader that reads still gets its events while they all
/// stall.
fn catch_up(readers: usize) -> usize {
    CATCH_UP.max(readers * (2 * HUGE_MAX + (256 << 10)) + (2 << 20))
}
const LIVE: usize = 8 << 20;
const NATS_CACHE: usize = 8 << 20;
const STORE_CACHE: usize = 4 << 20;
/// What one connection may hold besides the budgets: HTTP/2 or HTTP/1.1 state and buffers, a
/// stream's encoder buffer, the SSE text of one event being written (README, "Limits").
const PER_CONNECTION: usize = 1200 << 10;
/// The allocator's slack (arenas, fragmentation) on top of everything counted.
const SLACK: usize = 24 << 20;
/// Under the default --max-body-bytes (1 MiB).
const HUGE_MAX: usize = 900 << 10;

/// xorshift64*: the seeded generator of sizes and orders.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn between(&mut self, low: usize, high: usize) -> usize {
        low + self.below(high - low + 1)
    }
}

/// An event whose body is padded to about `bytes` with a field the proto does not know (kept in
/// the raw JSON only).
fn event(id: i64, bytes: usize) -> String {
    format!(
        r#"{{"ChatEvent":{{"Id":{id},"Type":"message_created","ChatId":13}},"Padding":"{}"}}"#,
        "x".repeat(bytes)
    )
}

/// Sizes of a run of events: blocks of tiny and of huge ones, alternating, starting with either.
fn sizes(random: &mut Random, blocks: usize, tiny_first: bool) -> Vec<usize> {
    let mut sizes = Vec::new();
    for block in 0..blocks {
        let huge = (block % 2 == 0) != tiny_first;
        if huge {
            for _ in 0..random.between(16, 32) {
                sizes.push(random.between(300 << 10, HUGE_MAX));
            }
        } else {
            for _ in 0..random.between(50, 200) {
                sizes.push(random.between(10, 2000));
            }
        }
    }
    sizes
}

async fn post_all(gateway: &Process, first_id: i64, sizes: &[usize]) {
    let http = reqwest::Client::new();
    for (offset, &bytes) in sizes.iter().enumerate() {
        let response = http
            .post(gateway.url("/v1/events"))
            .header("content-type", "application/json")
            .body(event(first_id + offset as i64, bytes))
            .send()
            .await
            .expect("posted");
        assert_eq!(
            response.status(),
            200,
            "event of {bytes} bytes: {:?}",
            response.text().await
        );
    }
}

/// The largest RSS (KiB) seen over `period`.
async fn peak_rss(gateway: &Process, period: Duration) -> u64 {
    let until = tokio::time::Instant::now() + period;
    let mut peak = gateway.rss_kib();
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(gateway.rss_kib());
    }
    peak
}

enum Store {
    Memory,
    Embedded(tempfile::TempDir),
    Nats(TestStream),
}

impl Store {
    fn name(&self) -> &'static str {
        match self {
            Store::Memory => "memory",
            Store::Embedded(_) => "embedded",
            Store::Nats(_) => "nats",
        }
    }

    fn start(&self, catch_up: usize) -> Process {
        let budgets = [
            ("IQGW_CATCH_UP_MEMORY", catch_up.to_string()),
            ("IQGW_LIVE_BUFFER_BYTES", LIVE.to_string()),
            ("IQGW_NATS_CACHE_BYTES", NATS_CACHE.to_string()),
            ("IQGW_STORE_CACHE_BYTES", STORE_CACHE.to_string()),
        ];
        let envs: Vec<(&str, &str)> = budgets.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let nats_store = format!("nats://{SHARED_NATS}");
        let args: Vec<&str> = match self {
            Store::Memory => vec!["--store", "memory"],
            Store::Embedded(dir) => vec![
                "--store",
                "embedded",
                "--data-dir",
                dir.path().to_str().expect("utf-8 path"),
            ],
            Store::Nats(stream) => stream.args(&nats_store),
        };
        Process::start_with("127.0.0.1:0", &args, &envs)
    }

    /// The budgets that apply to this store, bytes.
    fn budgets(&self, catch_up: usize) -> usize {
        catch_up
            + LIVE
            + match self {
                Store::Memory => 0,
                Store::Embedded(_) => STORE_CACHE,
                Store::Nats(_) => NATS_CACHE,
            }
    }
}

/// One round on one store: a log of mixed sizes, readers that stop reading (catch-up and live,
/// gRPC and SSE), more mixed events while they stall; RSS growth within the bound.
async fn round(store: Store, random: &mut Random, scale: usize) {
    let readers = 10 * scale;
    let catch_up = catch_up(readers);
    let gateway = store.start(catch_up);
    let name = store.name();
    // The log goes from tiny to huge and from huge to tiny: it starts with tiny events, and so
    // do the pages of a reader from the beginning (where a page sized on the events read so
    // far would be the largest); the events that arrive while the readers stall start either
    // way.
    let tiny_first = random.below(2) == 0;
    let mut stored = sizes(random, 1 + 3 * scale, true);
    if matches!(store, Store::Nats(_)) {
        // Far more than the tail cache may keep: it must let the oldest go.
        let extra: Vec<usize> = (0..80)
            .map(|_| random.between(700 << 10, HUGE_MAX))
            .collect();
        stored.splice(0..0, extra);
    }
    let stored_bytes: usize = stored.iter().sum();
    // The memory store holds every event itself: that is its data, not a reader's buffer.
    let data = if matches!(store, Store::Memory) {
        stored_bytes
    } else {
        0
    };
    let baseline = gateway.rss_kib();
    post_all(&gateway, 1, &stored).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after_ingest = gateway.rss_kib();
    if !matches!(store, Store::Memory) {
        // Nobody subscribes: what the gateway keeps of the events is its caches.
        let grown = after_ingest.saturating_sub(baseline) as usize * 1024;
        let bound = store.budgets(catch_up) - catch_up - LIVE + SLACK;
        assert!(
            grown <= bound,
            "{name}: RSS grew by {} MiB storing {} MiB with nobody subscribed (bound {} MiB)",
            grown >> 20,
            stored_bytes >> 20,
            bound >> 20
        );
    }

    let grpc_catch_up = 3 * scale;
    let sse_catch_up = 3 * scale;
    let grpc_live = 2 * scale;
    let sse_live = 2 * scale;
    let mut grpc = Vec::new();
    let mut sse = Vec::new();
    // Readers stall at different places: some at once, some after megabytes.
    const WINDOWS: [u32; 4] = [16 << 10, 256 << 10, 2 << 20, 8 << 20];
    for _ in 0..grpc_catch_up {
        let window = WINDOWS[random.below(WINDOWS.len())];
        grpc.push(stalled_grpc(gateway.addr, Some(Start::Beginning(())), window).await);
    }
    for _ in 0..sse_catch_up {
        sse.push(stalled_sse(gateway.addr, "from=beginning"));
    }
    // Let the catch-up readers go as far as their windows take them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..grpc_live {
        let window = WINDOWS[random.below(WINDOWS.len())];
        grpc.push(stalled_grpc(gateway.addr, None, window).await);
    }
    for _ in 0..sse_live {
        sse.push(stalled_sse(gateway.addr, ""));
    }
    let connections = grpc.len() + sse.len();

    // More events while every reader stalls, in the other order.
    let live = sizes(random, 2 * scale, tiny_first);
    let live_bytes: usize = live.iter().sum();
    post_all(&gateway, 1 + stored.len() as i64, &live).await;
    let peak = peak_rss(&gateway, Duration::from_secs(3)).await;
    let held = gateway.metric("iqgw_subscriber_held_bytes").await;
    let tail = gateway.metric("iqgw_live_tail_bytes").await;
    let cache = gateway.metric("iqgw_store_cache_bytes").await;
    let data = if data > 0 { data + live_bytes } else { 0 };
    let grown = peak.saturating_sub(baseline) as usize * 1024;
    let bound = store.budgets(catch_up) + data + connections * PER_CONNECTION + SLACK;
    eprintln!(
        "{name}: stored {} + {} MiB ({} + {} events, tiny first: {tiny_first}), {connections} \
         stalled readers; RSS {baseline} -> {after_ingest} -> peak {peak} KiB (grew {} MiB, \
         bound {} MiB); gauges: subscribers {} KiB, live tail {} KiB, store cache {} KiB",
        stored_bytes >> 20,
        live_bytes >> 20,
        stored.len(),
        live.len(),
        grown >> 20,
        bound >> 20,
        held >> 10,
        tail >> 10,
        cache >> 10,
    );
    assert!(
        grown <= bound,
        "{name}: RSS grew by {} MiB with {connections} stalled readers (bound {} MiB: budgets \
         {} MiB, data {} MiB, {} KiB per connection, slack {} MiB)",
        grown >> 20,
        bound >> 20,
        store.budgets(catch_up) >> 20,
        data >> 20,
        PER_CONNECTION >> 10,
        SLACK >> 20
    );
    assert!(
        held as usize <= catch_up,
        "{name}: subscribers hold {held} bytes"
    );
    assert!(
        tail as usize <= LIVE.max(HUGE_MAX + 4096),
        "{name}: live tail {tail}"
    );
    assert!(
        cache as usize <= NATS_CACHE.max(HUGE_MAX + 4096),
        "{name}: cache {cache}"
    );

    // A reader that reads still gets everything while the others stall.
    let total = (stored.len() + live.len()) as u64;
    let mut client = gateway.grpc().await;
    let mut stream = client
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            ..SubscribeRequest::default()
        })
        .await
        .expect("subscribes")
        .into_inner();
    for sequence in 1..=total {
        let event = tokio::time::timeout(Duration::from_secs(20), stream.message())
            .await
            .unwrap_or_else(|_| panic!("{name}: event {sequence} in time"))
            .expect("no error")
            .expect("not ended");
        assert_eq!(event.sequence, sequence);
    }
    drop((grpc, sse));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rss_stays_within_the_byte_budgets_whatever_the_sizes_and_the_stalled_readers() {
    let seed = std::env::var("IQGW_MEMORY_SEED")
        .ok()
        .and_then(|seed| seed.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
                | 1
        });
    let long = std::env::var_os("IQGW_MEMORY_LONG").is_some();
    eprintln!("IQGW_MEMORY_SEED={seed}");
    // splitmix64 of the seed: nearby seeds give unrelated runs.
    let mut mixed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    mixed = (mixed ^ (mixed >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    mixed = (mixed ^ (mixed >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    let mut random = Random((mixed ^ (mixed >> 31)) | 1);
    let (rounds, scale) = if long { (3, 3) } else { (1, 1) };
    // `IQGW_MEMORY_STORES=embedded,nats` runs only those.
    let only = std::env::var("IQGW_MEMORY_STORES").unwrap_or_default();
    let runs = |store: &str| only.is_empty() || only.split(',').any(|s| s.trim() == store);
    for _ in 0..rounds {
        if runs("memory") {
            round(Store::Memory, &mut random, scale).await;
        }
        if runs("embedded") {
            round(
                Store::Embedded(tempfile::tempdir().expect("a temporary directory")),
                &mut random,
                scale,
            )
            .await;
        }
        if runs("nats")
            && require(
                "NATS with JetStream on 127.0.0.1:4222",
                reachable(SHARED_NATS),
            )
        {
            round(
                Store::Nats(TestStream::new(SHARED_NATS)),
                &mut random,
                scale,
            )
            .await;
        }
    }
}
