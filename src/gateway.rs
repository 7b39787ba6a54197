//! The gateway's core, shared by the HTTP and gRPC edges: ingest (decode, record, append) and
//! subscriptions and lookups over the log and the live tail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;

use crate::decode::{self, DecodeError};
use crate::hub::Hub;
use crate::log::{Appended, LogError, NewRecord, SharedLog};
use crate::metrics::{Metrics, Snapshot};
use crate::pb::webhook::v1::Envelope;
use crate::subscribe::{Filter, Registry, Start, SubscribeError, Subscription};
use crate::wire::{EncodedEvent, StoredEvent};

/// Why an event was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// The body is not a valid webhook event; the sender must fix it.
    #[error(transparent)]
    Invalid(#[from] DecodeError),
    /// Storage failed; nothing was acknowledged; the sender should retry.
    #[error(transparent)]
    Unavailable(#[from] LogError),
}

/// Shared state behind every handler. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    log: SharedLog,
    hub: Hub,
    /// Fires once when the gateway starts shutting down; streams end, readiness drops.
    shutdown: watch::Receiver<bool>,
    /// False while draining.
    accepting: Arc<AtomicBool>,
    /// Open subscriptions (bounded) and their positions.
    subscribers: Registry,
    /// Exported metrics.
    metrics: Arc<Metrics>,
    /// Ingest requests in flight at most; a request finding none free is shed (429).
    ingest_slots: Arc<tokio::sync::Semaphore>,
}

/// What `GET /v1/stats` reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Stats {
    /// Events stored since start.
    pub stored: u64,
    /// Duplicates answered since start.
    pub duplicates: u64,
    /// Oldest retained sequence.
    pub first_sequence: u64,
    /// Newest durable sequence.
    pub last_sequence: u64,
    /// Whether ingest is accepted.
    pub ready: bool,
    /// Open subscriptions.
    pub subscribers: Vec<SubscriberStats>,
}

/// One open subscription.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubscriberStats {
    /// Its id (also in metrics).
    pub id: u64,
    /// The last sequence it has looked at.
    pub position: u64,
    /// Events it is behind.
    pub lag: u64,
}

/// Limits of the gateway core.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Events in the live tail before a slow subscriber is moved to reading from the log.
    pub live_buffer: usize,
    /// Open subscriptions at most.
    pub max_subscribers: usize,
    /// Ingest requests (HTTP or gRPC Publish) in flight at most.
    pub max_in_flight: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            live_buffer: 4096,
            max_subscribers: 10_000,
            max_in_flight: 1024,
        }
    }
}

impl Gateway {
    /// A gateway over `log`.
    pub fn new(log: SharedLog, config: &GatewayConfig, shutdown: watch::Receiver<bool>) -> Self {
        let hub = Hub::start(log.clone(), config.live_buffer, shutdown.clone());
        Self {
            log,
            hub,
            shutdown,
            accepting: Arc::new(AtomicBool::new(true)),
            subscribers: Registry::new(config.max_subscribers),
            metrics: Arc::new(Metrics::new()),
            ingest_slots: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1))),
        }
    }

    /// A slot for one ingest request, or `None` when all are taken (shed the request).
    pub fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.ingest_slots.clone().try_acquire_owned().ok()
    }

    /// Stores one webhook JSON body. The body is kept verbatim beside the typed message.
    pub async fn ingest_json(&self, body: Bytes) -> Result<Appended, IngestError> {
        let record = Self::record_from_json(body)?;
        self.append_one(record).await
    }

    /// Stores several decoded webhook bodies (each with its original JSON) with one append (one
    /// sync). An item that did not decode keeps its error and does not stop the others.
    pub async fn ingest_batch(
        &self,
        decoded: Vec<Result<(Envelope, Bytes), DecodeError>>,
    ) -> Result<Vec<Result<Appended, DecodeError>>, LogError> {
        let mut records = Vec::with_capacity(decoded.len());
        let mut errors = Vec::with_capacity(decoded.len());
        for item in decoded {
            match item {
                Ok((envelope, raw_json)) => {
                    records.push(Self::record(&envelope, raw_json));
                    errors.push(None);
                }
                Err(error) => errors.push(Some(error)),
            }
        }
        let appended = if records.is_empty() {
            Vec::new()
        } else {
            self.log.append(records).await?
        };
        self.count(&appended);
        let mut appended = appended.into_iter();
        errors
            .into_iter()
            .map(|error| match error {
                Some(error) => Ok(Err(error)),
                None => appended
                    .next()
                    .map(Ok)
                    .ok_or_else(|| LogError::Unavailable("log returned too few results".into())),
            })
            .collect()
    }

    /// Stores a typed envelope (gRPC Publish); there is no original JSON to keep.
    pub async fn ingest_envelope(&self, envelope: Envelope) -> Result<Appended, IngestError> {
        decode::validate(&envelope)?;
        self.append_one(Self::record(&envelope, Bytes::new())).await
    }

    async fn append_one(&self, record: NewRecord) -> Result<Appended, IngestError> {
        let appended = self.log.append(vec![record]).await?;
        self.count(&appended);
        appended
            .into_iter()
            .next()
            .ok_or_else(|| LogError::Unavailable("log returned no result".into()).into())
    }

    fn count(&self, appended: &[Appended]) {
        let duplicates = appended.iter().filter(|a| a.duplicate).count() as u64;
        self.metrics
            .observe_appended(appended.len() as u64 - duplicates, duplicates);
    }

    fn record_from_json(body: Bytes) -> Result<NewRecord, DecodeError> {
        let envelope = decode::decode(&body)?;
        Ok(Self::record(&envelope, body))
    }

    fn record(envelope: &Envelope, raw_json: Bytes) -> NewRecord {
        let stored = stored_event(envelope, raw_json);
        NewRecord {
            event_id: stored.keys.as_ref().map_or(0, |keys| keys.event_id),
            received_at_ms: now_ms(),
            payload: stored.encode_to_vec().into(),
        }
    }

    /// Opens a subscription.
    pub async fn subscribe(
        &self,
        filter: Filter,
        start: Start,
    ) -> Result<Subscription, SubscribeError> {
        Subscription::new(
            self.log.clone(),
            &self.hub,
            &self.subscribers,
            self.shutdown.clone(),
            filter,
            start,
        )
        .await
    }

    /// The stored event with this sequence.
    pub async fn get_by_sequence(
        &self,
        sequence: u64,
    ) -> Result<Option<EncodedEvent>, SubscribeError> {
        let records = match self.log.read(sequence, 1).await {
            Ok(records) => records,
            Err(LogError::Truncated { .. }) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        let Some(record) = records
            .into_iter()
            .next()
            .filter(|record| record.sequence == sequence)
        else {
            return Ok(None);
        };
        EncodedEvent::from_payload(record.sequence, record.received_at_ms, record.payload)
            .map(Some)
            .map_err(|_| SubscribeError::Corrupt(sequence))
    }

    /// The stored event with this `ChatEvent.Id`.
    pub async fn get_by_event_id(
        &self,
        event_id: i64,
    ) -> Result<Option<EncodedEvent>, SubscribeError> {
        match self.log.find_event(event_id).await? {
            Some(sequence) => self.get_by_sequence(sequence).await,
            None => Ok(None),
        }
    }

    /// Whether the gateway takes ingest now: not draining and the log is healthy.
    pub fn ready(&self) -> bool {
        self.accepting.load(Ordering::Relaxed) && !*self.shutdown.borrow() && self.log.healthy()
    }

    /// Marks the gateway as draining (readiness and health go down first).
    pub fn start_draining(&self) {
        self.accepting.store(false, Ordering::Relaxed);
    }

    /// Number of open subscriptions.
    pub fn subscribers(&self) -> usize {
        self.subscribers.positions().len()
    }

    /// The metrics, for the edges to count requests.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The highest durable sequence (0 when empty).
    pub fn last_sequence(&self) -> u64 {
        *self.log.committed().borrow()
    }

    /// Totals, the log's range and every subscriber's lag, for the console.
    pub fn stats(&self) -> Stats {
        let (stored, duplicates) = self.metrics.totals();
        let last = self.last_sequence();
        let mut subscribers: Vec<SubscriberStats> = self
            .subscribers
            .positions()
            .into_iter()
            .map(|(id, next)| SubscriberStats {
                id,
                position: next.saturating_sub(1),
                lag: (last + 1).saturating_sub(next),
            })
            .collect();
        subscribers.sort_by_key(|s| s.id);
        Stats {
            stored,
            duplicates,
            first_sequence: self.log.bounds().first,
            last_sequence: last,
            ready: self.ready(),
            subscribers,
        }
    }

    /// The Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        let snapshot = Snapshot {
            committed: *self.log.committed().borrow(),
            subscribers: self.subscribers.positions(),
            store: self.log.stats(),
        };
        self.metrics.render(&snapshot)
    }
}

/// What the log stores for an event: the typed envelope encoded, the original body, and what
/// ingest reads from the envelope once (the filter keys, the references resolved from `Rels`).
pub fn stored_event(envelope: &Envelope, raw_json: Bytes) -> StoredEvent {
    StoredEvent {
        envelope: envelope.encode_to_vec().into(),
        raw_json,
        keys: Some(decode::keys(envelope)),
        references: decode::references(envelope).encode_to_vec().into(),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
