//! Prometheus metrics: counters and histograms updated by the edges, and gauges read at scrape
//! time from the gateway (subscribers and their lag, store statistics). Label values come from
//! fixed sets, so cardinality stays bounded; per-subscriber lag is reported for at most
//! [`MAX_LAG_SERIES`] subscribers (the furthest behind).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::log::LogStats;

/// Subscribers whose lag gets its own series.
pub const MAX_LAG_SERIES: usize = 16;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviationLabels {
    /// The field path with indices removed ([`crate::decode::Deviation::pattern`]).
    path: String,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    /// `health` or `reflection`.
    service: &'static str,
    /// `admitted` or `refused` (over `--max-health-reflection-calls`).
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubscriberLabels {
    subscriber: String,
}

/// What the gateway knows at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Highest durable sequence.
    pub committed: u64,
    /// `(subscriber id, next sequence it will look at)` for every open subscription.
    pub subscribers: Vec<(u64, u64)>,
    /// The store's statistics.
    pub store: LogStats,
    /// Bytes the live tail holds.
    pub live_tail_bytes: u64,
    /// Bytes held for subscribers outside the live tail: catch-up pages and events on their
    /// way to the socket.
    pub subscriber_bytes: u64,
    /// Subscribers evicted so far for stalling while others waited for memory.
    pub subscribers_evicted: u64,
    /// Records catch-up reads looked at, and those they kept (copied and decoded).
    pub catch_up_records: (u64, u64),
}

/// The `result` label of an ingest request answered with `status` (also gRPC `Publish`'s, by the
/// status its code maps to).
pub fn result_word(status: u16) -> &'static str {
    match status {
        200 => "ok",
        400 => "invalid",
        401 | 403 => "unauthorized",
        408 => "timeout",
        413 => "too_large",
        415 => "unsupported_media_type",
        429 => "overloaded",
        503 => "unavailable",
        _ => "error",
    }
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<RouteLabels, Histogram>,
    /// Bytes request bodies hold in `--request-body-memory`.
    request_body_bytes: Gauge,
    /// Bodies refused because `--request-body-memory` was spent.
    request_bodies_refused: Counter,
    /// Health and reflection calls, by service and whether they were admitted.
    health_reflection_calls: Family<CallLabels, Counter>,
    /// Health and reflection calls open now.
    health_reflection_open: Gauge,
    stored: Counter,
    duplicates: Counter,
    deviations: Family<DeviationLabels, Counter>,
    /// Duplicates whose content differs from the stored event.
    conflicts: Counter,
    /// Duplicates with the stored `ChatEvent` and other `Rels` (the vendor's refreshed
    /// snapshots): the same event, not a conflict.
    refreshed: Counter,
    /// Stored bodies decoded again to decide a duplicate's conflict (records without digests).
    stored_body_decodes: Counter,
    /// Event ids logged as conflicting (bounded: cleared when full), to log each once.
    conflict_ids: std::sync::Mutex<std::collections::HashSet<i64>>,
    /// Deviation patterns seen since start (bounded by the protos' fields), to log each once.
    deviation_patterns: std::sync::Mutex<std::collections::HashSet<String>>,
    subscribers: Gauge,
    lag: Family<SubscriberLabels, Gauge>,
    lag_max: Gauge,
    syncs: Gauge,
    synced_records: Gauge,
    store_bytes: Gauge,
    store_damaged_reads: Gauge,
    connections: Gauge,
    connections_refused: Counter,
    live_tail_bytes: Gauge,
    subscriber_bytes: Gauge,
    store_cache_bytes: Gauge,
    subscribers_evicted: Counter,
    /// What `subscribers_evicted` was last set from.
    subscribers_evicted_seen: std::sync::atomic::AtomicU64,
    catch_up_scanned: Counter,
    catch_up_scanned_seen: std::sync::atomic::AtomicU64,
    catch_up_kept: Counter,
    catch_up_kept_seen: std::sync::atomic::AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("iqgw");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "ingest_requests",
            "Ingest requests by route and result",
            requests.clone(),
        );
        let latency = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "ingest_duration_seconds",
            "Ingest request latency, acknowledgement included",
            latency.clone(),
        );
        let request_body_bytes = Gauge::default();
        registry.register(
            "request_body_bytes",
            "Bytes of request bodies held while they arrive and are handled (HTTP ingest and \
             batch, gRPC EventGateway messages), at most --request-body-memory",
            request_body_bytes.clone(),
        );
        let request_bodies_refused = Counter::default();
        registry.register(
            "request_bodies_refused",
            "Request bodies refused at once because --request-body-memory was held by others",
            request_bodies_refused.clone(),
        );
        let health_reflection_calls = Family::<CallLabels, Counter>::default();
        registry.register(
            "health_reflection_calls",
            "grpc.health.v1 and reflection calls, by service and result (admitted, or refused \
             over --max-health-reflection-calls)",
            health_reflection_calls.clone(),
        );
        let health_reflection_open = Gauge::default();
        registry.register(
            "health_reflection_calls_open",
            "grpc.health.v1 and reflection calls open now (watches and reflection streams \
             included)",
            health_reflection_open.clone(),
        );
        let stored = Counter::default();
        registry.register(
            "events_stored",
            "Events stored (first delivery)",
            stored.clone(),
        );
        let duplicates = Counter::default();
        registry.register(
            "duplicates",
            "Redeliveries of an already stored event",
            duplicates.clone(),
        );
        let deviations = Family::<DeviationLabels, Counter>::default();
        registry.register(
            "decode_deviations",
            "Fields of ingested bodies that did not fit their proto type, by field path (indices \
             removed) and outcome (coerced, dropped, cut, replaced)",
            deviations.clone(),
        );
        let conflicts = Counter::default();
        registry.register(
            "duplicate_conflicts",
            "Duplicates whose ChatEvent differs from the event stored under the same id (a \
             sender reusing ids)",
            conflicts.clone(),
        );
        let refreshed = Counter::default();
        registry.register(
            "duplicate_refreshes",
            "Duplicates with the stored ChatEvent and other Rels (a redelivery carrying newer \
             snapshots of the chat, the client...): the same event, not stored again",
            refreshed.clone(),
        );
        let stored_body_decodes = Counter::default();
        registry.register(
            "conflict_check_decodes",
            "Stored bodies decoded again to decide whether a duplicate conflicts (only records \
             stored before records kept digests, or typed by other protos)",
            stored_body_decodes.clone(),
        );
        let subscribers = Gauge::default();
        registry.register("subscribers", "Open Subscribe streams", subscribers.clone());
        let lag = Family::<SubscriberLabels, Gauge>::default();
        registry.register(
            "subscriber_lag_events",
            "Events a subscriber is behind (the furthest behind only)",
            lag.clone(),
        );
        let lag_max = Gauge::default();
        registry.register(
            "subscriber_lag_max_events",
            "Largest lag of any subscriber",
            lag_max.clone(),
        );
        let syncs = Gauge::default();
        registry.register(
            "store_syncs",
            "Durable commits (fsyncs or JetStream acks) since start",
            syncs.clone(),
        );
        let synced_records = Gauge::default();
        registry.register(
            "store_synced_records",
            "Records made durable by those commits; records per sync = this / store_syncs",
            synced_records.clone(),
        );
        let store_bytes = Gauge::default();
        registry.register(
            "store_bytes",
            "Size of the stored events (file or stream)",
            store_bytes.clone(),
        );
        let store_damaged_reads = Gauge::default();
        registry.register(
            "store_damaged_reads",
            "Reads that found the store damaged (pages that do not read, records whose checksum does not match; run `verify`)",
            store_damaged_reads.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "connections",
            "Open client connections (HTTP/1.1 and HTTP/2, cleartext and TLS)",
            connections.clone(),
        );
        let connections_refused = Counter::default();
        registry.register(
            "connections_refused",
            "Connections closed at once because --max-connections were open",
            connections_refused.clone(),
        );
        let live_tail_bytes = Gauge::default();
        registry.register(
            "live_tail_bytes",
            "Bytes of events the live tail holds (bounded by --live-buffer-bytes)",
            live_tail_bytes.clone(),
        );
        let subscriber_bytes = Gauge::default();
        registry.register(
            "subscriber_held_bytes",
            "Bytes held for subscribers outside the live tail: catch-up pages and events on their \
             way to the socket (bounded by --catch-up-memory)",
            subscriber_bytes.clone(),
        );
        let subscribers_evicted = Counter::default();
        registry.register(
            "subscribers_evicted",
            "Subscriber connections closed because their client read nothing for \
             --subscriber-stall-timeout while other subscribers waited for --catch-up-memory",
            subscribers_evicted.clone(),
        );
        let catch_up_scanned = Counter::default();
        registry.register(
            "catch_up_records_scanned",
            "Records catch-up reads looked at (filter keys checked in place)",
            catch_up_scanned.clone(),
        );
        let catch_up_kept = Counter::default();
        registry.register(
            "catch_up_records_kept",
            "Records catch-up reads kept for their subscriber (copied and decoded)",
            catch_up_kept.clone(),
        );
        let store_cache_bytes = Gauge::default();
        registry.register(
            "store_cache_bytes",
            "Bytes of records the store keeps in memory for readers: the JetStream tail cache \
             (bounded by --nats-cache-bytes)",
            store_cache_bytes.clone(),
        );
        Self {
            subscribers_evicted,
            subscribers_evicted_seen: Default::default(),
            catch_up_scanned,
            catch_up_scanned_seen: Default::default(),
            catch_up_kept,
            catch_up_kept_seen: Default::default(),
            live_tail_bytes,
            subscriber_bytes,
            store_cache_bytes,
            store_damaged_reads,
            registry,
            requests,
            latency,
            request_body_bytes,
            request_bodies_refused,
            health_reflection_calls,
            health_reflection_open,
            stored,
            duplicates,
            deviations,
            deviation_patterns: Default::default(),
            refreshed,
            conflicts,
            stored_body_decodes,
            conflict_ids: Default::default(),
            subscribers,
            lag,
            lag_max,
            syncs,
            synced_records,
            store_bytes,
            connections,
            connections_refused,
        }
    }

    /// Counts a connection that is being served.
    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    /// Counts a served connection that ended.
    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    /// Counts a connection closed at once over the cap.
    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// The gauge of bytes held by request bodies and the counter of bodies refused over the
    /// budget, for [`crate::request_budget::BodyBudget::new`].
    pub fn request_body_metrics(&self) -> (Gauge, Counter) {
        (
            self.request_body_bytes.clone(),
            self.request_bodies_refused.clone(),
        )
    }

    /// Counts a health or reflection call (`service`: `health` or `reflection`), admitted or
    /// refused; an admitted one is open until [`Self::health_reflection_call_ended`].
    pub fn health_reflection_call(&self, service: &'static str, admitted: bool) {
        let result = if admitted { "admitted" } else { "refused" };
        self.health_reflection_calls
            .get_or_create(&CallLabels { service, result })
            .inc();
        if admitted {
            self.health_reflection_open.inc();
        }
    }

    /// Counts the end of an admitted health or reflection call.
    pub fn health_reflection_call_ended(&self) {
        self.health_reflection_open.dec();
    }

    /// Counts one ingest request and its latency. `result` is one of a fixed set of words.
    pub fn observe_request(&self, route: &'static str, result: &'static str, elapsed: Duration) {
        self.requests
            .get_or_create(&RequestLabels { route, result })
            .inc();
        self.latency
            .get_or_create(&RouteLabels { route })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts stored events and duplicates.
    pub fn observe_appended(&self, stored: u64, duplicates: u64) {
        self.stored.inc_by(stored);
        self.duplicates.inc_by(duplicates);
    }

    /// Counts deviations of an ingested body. Returns the patterns counted for the first time
    /// (to be logged once).
    pub fn observe_deviations(&self, deviations: &[crate::decode::Deviation]) -> Vec<String> {
        let mut new = Vec::new();
        if deviations.is_empty() {
            return new;
        }
        let mut seen = self
            .deviation_patterns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for deviation in deviations {
            if seen.insert(deviation.pattern.clone()) {
                new.push(deviation.pattern.clone());
            }
            self.deviations
                .get_or_create(&DeviationLabels {
                    path: deviation.pattern.clone(),
                    outcome: deviation.outcome.as_str(),
                })
                .inc();
        }
        new
    }

    /// Counts a conflicting duplicate; returns its event id the first time it is seen (to be
    /// logged once).
    pub fn observe_conflict(&self, event_id: Option<i64>) -> Option<i64> {
        self.conflicts.inc();
        let event_id = event_id?;
        let mut seen = self
            .conflict_ids
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.len() >= 10_000 {
            seen.clear();
        }
        seen.insert(event_id).then_some(event_id)
    }

    /// Counts a stored body decoded again for a conflict check.
    pub fn observe_refreshed(&self) {
        self.refreshed.inc();
    }

    /// Counts one decode of a stored body or typed form to compare a duplicate with it.
    pub fn observe_stored_body_decode(&self) {
        self.stored_body_decodes.inc();
    }

    /// Events stored and duplicates answered since start.
    pub fn totals(&self) -> (u64, u64) {
        (self.stored.get(), self.duplicates.get())
    }

    /// The Prometheus text exposition, with scrape-time values from `snapshot`.
    pub fn render(&self, snapshot: &Snapshot) -> String {
        self.subscribers.set(snapshot.subscribers.len() as i64);
        let mut lags: Vec<(u64, u64)> = snapshot
            .subscribers
            .iter()
            .map(|&(id, next)| (id, (snapshot.committed + 1).saturating_sub(next)))
            .collect();
        lags.sort_by_key(|&(_, lag)| std::cmp::Reverse(lag));
        self.lag.clear();
        for (id, lag) in lags.iter().take(MAX_LAG_SERIES) {
            self.lag
                .get_or_create(&SubscriberLabels {
                    subscriber: id.to_string(),
                })
                .set(*lag as i64);
        }
        self.lag_max.set(lags.first().map_or(0, |l| l.1) as i64);
        self.syncs.set(snapshot.store.syncs as i64);
        self.synced_records
            .set(snapshot.store.synced_records as i64);
        self.store_bytes.set(snapshot.store.size_bytes as i64);
        // The store's own (pages that do not read) and the records' (checksums that do not match).
        let damaged_records =
            crate::wire::record::DAMAGED_READS.load(std::sync::atomic::Ordering::Relaxed);
        self.store_damaged_reads
            .set(snapshot.store.damaged_reads.saturating_add(damaged_records) as i64);
        self.live_tail_bytes.set(snapshot.live_tail_bytes as i64);
        self.subscriber_bytes.set(snapshot.subscriber_bytes as i64);
        // Totals kept elsewhere: each counter goes up by what is new since the last render.
        let totals = [
            (
                &self.subscribers_evicted,
                &self.subscribers_evicted_seen,
                snapshot.subscribers_evicted,
            ),
            (
                &self.catch_up_scanned,
                &self.catch_up_scanned_seen,
                snapshot.catch_up_records.0,
            ),
            (
                &self.catch_up_kept,
                &self.catch_up_kept_seen,
                snapshot.catch_up_records.1,
            ),
        ];
        for (counter, seen, total) in totals {
            let before = seen.fetch_max(total, std::sync::atomic::Ordering::Relaxed);
            counter.inc_by(total.saturating_sub(before));
        }
        self.store_cache_bytes
            .set(snapshot.store.cache_bytes as i64);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_bounded_lag_series() {
        let metrics = Metrics::new();
        metrics.observe_request("events", "stored", Duration::from_millis(2));
        metrics.observe_appended(1, 0);
        let subscribers: Vec<(u64, u64)> = (0..40).map(|id| (id, id)).collect();
        let text = metrics.render(&Snapshot {
            committed: 100,
            subscribers,
            store: LogStats::default(),
            ..Snapshot::default()
        });
        assert!(
            text.contains("iqgw_ingest_requests_total{route=\"events\",result=\"stored\"} 1"),
            "{text}"
        );
        assert!(text.contains("iqgw_events_stored_total 1"));
        assert!(text.contains("iqgw_subscribers 40"));
        assert!(text.contains("iqgw_subscriber_lag_max_events 101"));
        assert_eq!(
            text.matches("iqgw_subscriber_lag_events{").count(),
            MAX_LAG_SERIES
        );
    }
}
