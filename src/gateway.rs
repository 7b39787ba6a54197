//! The gateway's core, shared by the HTTP and gRPC edges: ingest (decode, record, append) and
//! subscriptions and lookups over the log and the live tail.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;

use crate::decode::pool::{Busy, DecodePool};
use crate::decode::{self, DecodeError, Decoded, Deviation, Policy};
use crate::hub::Hub;
use crate::log::{Appended, LogError, NewRecord, SharedLog};
use crate::metrics::{Metrics, Snapshot};
use crate::pb::webhook::v1::Envelope;
use crate::subscribe::{Filter, Registry, Start, SubscribeError, Subscription};
use crate::wire::{record, Digests, EncodedEvent, Identity, StoredEvent};

/// Why an event was not stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngestError {
    /// The body is not a valid webhook event; the sender must fix it.
    #[error(transparent)]
    Invalid(#[from] DecodeError),
    /// Storage failed; nothing was acknowledged; the sender should retry.
    #[error(transparent)]
    Unavailable(#[from] LogError),
    /// Every decode worker is busy and as many bodies wait (`--decode-queue`); retry shortly.
    #[error(transparent)]
    Busy(#[from] Busy),
}

/// What ingest answers for a stored event: where it is, and what of its body did not fit the
/// protos (serialized beside `sequence`, only when there is something).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Ingested {
    /// Sequence and duplicate flag.
    #[serde(flatten)]
    pub appended: Appended,
    /// Fields coerced, dropped or cut at decode (DESIGN invariant 7).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deviations: Vec<Deviation>,
    /// A duplicate whose content differs from the event stored under its id: the sender reused
    /// an id for another event (a sender bug; the first event stays stored).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub conflict: bool,
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
    /// How strictly bodies must match the protos.
    policy: Policy,
    /// Bytes an event may take as a subscriber receives it, all optional fields asked for.
    max_event_bytes: usize,
    /// Where bodies are decoded (`--decode-threads`, `--decode-queue`).
    decoder: DecodePool,
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
    /// Tolerant (default) or strict decoding (`--strict-decode`).
    pub decode_policy: Policy,
    /// Bytes all subscribers may hold together outside the live tail (`--catch-up-memory`).
    pub catch_up_bytes: usize,
    /// Bytes an event may take as a subscriber receives it with every optional field
    /// (`--max-event-bytes`): past it, opaque values are cut at ingest (see [`crate::fit`]).
    pub max_event_bytes: usize,
    /// Bytes the live tail holds at most (`--live-buffer-bytes`).
    pub live_buffer_bytes: usize,
    /// Catch-up reads running at once (`--catch-up-reads`).
    pub catch_up_reads: usize,
    /// How long a subscriber may hold memory without giving any back while others wait for it
    /// before its connection is closed (`--subscriber-stall-timeout`).
    pub subscriber_stall_timeout: std::time::Duration,
    /// Threads that decode bodies larger than [`decode::pool::INLINE_BYTES`] at once
    /// (`--decode-threads`).
    pub decode_threads: usize,
    /// Such bodies that may wait for a decode thread; more are refused at once
    /// (`--decode-queue`).
    pub decode_queue: usize,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            live_buffer: 4096,
            max_subscribers: 10_000,
            max_in_flight: 1024,
            decode_policy: Policy::Tolerant,
            catch_up_bytes: crate::subscribe::DEFAULT_CATCH_UP_BYTES,
            max_event_bytes: crate::fit::DEFAULT_MAX_EVENT_BYTES,
            live_buffer_bytes: crate::hub::DEFAULT_LIVE_BYTES,
            catch_up_reads: crate::subscribe::DEFAULT_CATCH_UP_READS,
            subscriber_stall_timeout: crate::budget::DEFAULT_STALL_TIMEOUT,
            decode_threads: decode::pool::default_threads(),
            decode_queue: decode::pool::DEFAULT_QUEUE,
        }
    }
}

impl Gateway {
    /// A gateway over `log`.
    pub fn new(log: SharedLog, config: &GatewayConfig, shutdown: watch::Receiver<bool>) -> Self {
        let hub = Hub::with_bytes(
            log.clone(),
            config.live_buffer,
            config.live_buffer_bytes,
            shutdown.clone(),
        );
        Self {
            log,
            hub,
            shutdown,
            accepting: Arc::new(AtomicBool::new(true)),
            subscribers: Registry::with_stall(
                config.max_subscribers,
                config.catch_up_bytes,
                config.catch_up_reads,
                config.subscriber_stall_timeout,
            ),
            metrics: Arc::new(Metrics::new()),
            ingest_slots: Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1))),
            policy: config.decode_policy,
            max_event_bytes: config.max_event_bytes,
            decoder: DecodePool::new(config.decode_threads, config.decode_queue),
        }
    }

    /// Where bodies are decoded: the edges decode batches there.
    pub fn decoder(&self) -> &DecodePool {
        &self.decoder
    }

    /// A slot for one ingest request, or `None` when all are taken (shed the request).
    pub fn admit(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.ingest_slots.clone().try_acquire_owned().ok()
    }

    /// How strictly bodies must match the protos (for edges that decode themselves: batches).
    pub fn decode_policy(&self) -> Policy {
        self.policy
    }

    /// Stores one webhook JSON body. The body is kept verbatim beside the typed message, without
    /// a leading byte-order mark ([`decode::strip_bom`]).
    ///
    /// `key` is the sender's idempotency key, if any: a transitive event sent with it is stored
    /// once, however often it is sent again with the same key.
    pub async fn ingest_json(
        &self,
        body: Bytes,
        key: Option<&str>,
    ) -> Result<Ingested, IngestError> {
        let body = body.slice_ref(decode::strip_bom(&body));
        let (policy, max_event_bytes) = (self.policy, self.max_event_bytes);
        // Decoding and building the record (the cut to fit, the digests, compression) both cost
        // in proportion to the body: both run on the decode pool, off the async workers.
        let (event_id, built) = self
            .decoder
            .run(body.len(), move || {
                decode::decode_with(&body, policy).map(|decoded| {
                    let event_id = decode::dedup_id(&decoded.envelope);
                    let built =
                        stored_record(decoded.envelope, body, decoded.deviations, max_event_bytes);
                    (event_id, built)
                })
            })
            .await??;
        let event_id = event_id.or_else(|| key.map(|key| decode::idempotency_id(key, None)));
        let (record, identity, deviations) = self.finish(event_id, built)?;
        self.note_deviations(&deviations);
        let appended = self.append_one(record).await?;
        Ok(Ingested {
            appended,
            deviations,
            conflict: self.conflict(&identity, &appended).await,
        })
    }

    /// Stores several decoded webhook bodies (each with its original JSON) with one append (one
    /// sync). One result per item, in order: an item the store did not take (JetStream stores
    /// each on its own) has its storage error, and does not stop the others.
    pub async fn ingest_batch(&self, items: Vec<Built>) -> Vec<Result<Ingested, LogError>> {
        if items.is_empty() {
            return Vec::new();
        }
        let mut records = Vec::with_capacity(items.len());
        // Per item: its deviations and identity, or why it cannot be stored (too large).
        let mut kept = Vec::with_capacity(items.len());
        for Built { event_id, built } in items {
            match self.finish(event_id, built) {
                Ok((record, identity, deviations)) => {
                    self.note_deviations(&deviations);
                    records.push(record);
                    kept.push(Ok((deviations, identity)));
                }
                Err(IngestError::Unavailable(error)) => kept.push(Err(error)),
                Err(IngestError::Invalid(error)) => {
                    kept.push(Err(LogError::TooLarge(error.to_string())))
                }
                // Building a record takes no decode slot; should it ever, the item may be retried.
                Err(IngestError::Busy(busy)) => {
                    kept.push(Err(LogError::Unavailable(busy.to_string())))
                }
            }
        }
        let appended = if records.is_empty() {
            Vec::new()
        } else {
            self.log.append(records).await
        };
        self.count(&appended);
        let mut appended = appended.into_iter();
        let mut results = Vec::with_capacity(kept.len());
        for kept in kept {
            let (deviations, identity) = match kept {
                Ok(kept) => kept,
                Err(error) => {
                    results.push(Err(error));
                    continue;
                }
            };
            let appended = appended.next().unwrap_or_else(|| {
                Err(LogError::Unavailable("log returned too few results".into()))
            });
            results.push(match appended {
                Ok(appended) => Ok(Ingested {
                    conflict: self.conflict(&identity, &appended).await,
                    appended,
                    deviations,
                }),
                Err(error) => Err(error),
            });
        }
        results
    }

    /// `--max-event-bytes`: what [`built`] of a batch's items takes.
    pub fn max_event_bytes(&self) -> usize {
        self.max_event_bytes
    }

    /// Stores a typed envelope (gRPC Publish); there is no original JSON to keep. It must carry
    /// what a JSON body must (a type, and a positive id unless transitive).
    pub async fn ingest_envelope(
        &self,
        envelope: Envelope,
        key: Option<&str>,
    ) -> Result<Ingested, IngestError> {
        decode::validate(&envelope)?;
        // JSON has no NaN nor infinities; a typed envelope may carry them in opaque values.
        let (envelope, deviations) = crate::fit::finite(envelope);
        let (record, identity, deviations) =
            self.record(envelope, Bytes::new(), deviations, key)?;
        self.note_deviations(&deviations);
        let appended = self.append_one(record).await?;
        Ok(Ingested {
            conflict: self.conflict(&identity, &appended).await,
            appended,
            deviations,
        })
    }

    /// Whether a duplicate's `ChatEvent` differs from the event stored under its id (a
    /// redelivery is the same event, its `Rels` possibly refreshed; another `ChatEvent` under a
    /// reused id is a sender bug worth seeing). Decided by the digests kept with the record (the
    /// same body bytes, the same typed form, the same `ChatEvent`), never by decoding the stored
    /// body; only a record of an earlier release (without the digests it needs) or one typed by
    /// other protos is decoded (counted). Conflicts are counted and their id logged once;
    /// refreshed redeliveries are counted apart. A lookup that fails says "no conflict".
    async fn conflict(&self, new: &NewIdentity, appended: &Appended) -> bool {
        if !appended.duplicate {
            return false;
        }
        let payload = match self.log.read(appended.sequence, 1).await {
            Ok(records) => records
                .into_iter()
                .find(|record| record.sequence == appended.sequence)
                .map(|record| record.payload),
            Err(_) => None,
        };
        let Some(stored) = payload
            .as_ref()
            .and_then(|payload| record::identity(payload).ok())
        else {
            return false;
        };
        let stored_event = |payload: Option<Bytes>| payload.and_then(|p| record::stored(p).ok());
        let (verdict, event_id) = match stored {
            Identity::Digests(digests, keys) => {
                let verdict = match new.digests.same_event(&digests) {
                    Some(true) => Redelivery::Same,
                    Some(false) => match new.digests.same_chat_event(&digests) {
                        Some(true) => Redelivery::Refreshed,
                        Some(false) => Redelivery::Conflict,
                        // Kept before `ChatEvent` digests were: its typed form tells.
                        None => match stored_event(payload) {
                            Some(stored) => self.compare_typed(&stored.envelope, new),
                            None => Redelivery::Same,
                        },
                    },
                    // Typed by other protos: the stored body, typed by this build's.
                    None => match stored_event(payload) {
                        Some(stored) => self.compare_retyped(&stored, new).await,
                        None => Redelivery::Same,
                    },
                };
                (verdict, keys.event_id)
            }
            Identity::Legacy(stored) => {
                let verdict = if stored.envelope == new.envelope {
                    Redelivery::Same
                } else {
                    self.compare_retyped(&stored, new).await
                };
                (verdict, stored.keys.map_or(0, |k| k.event_id))
            }
        };
        if verdict == Redelivery::Refreshed {
            self.metrics.observe_refreshed();
        }
        let conflict = verdict == Redelivery::Conflict;
        if conflict {
            if let Some(event_id) = self.metrics.observe_conflict(Some(event_id)) {
                tracing::warn!(
                    event_id,
                    sequence = appended.sequence,
                    "a different event reuses an event id already stored; it was answered as a \
                     duplicate with conflict=true and not stored (logged once per id)"
                );
            }
        }
        conflict
    }

    /// How a new event compares with the stored event whose original body, typed by this
    /// build's protos, may differ from its stored typed form: an event stored by an earlier
    /// release lacks the fields its protos did not have yet, so a redelivery after an upgrade
    /// differs from it in bytes and is still the same event. The one place a stored body is
    /// decoded again (counted in the metrics), on the decode pool. Without a body (a typed
    /// Publish), its typed form tells.
    async fn compare_retyped(&self, stored: &StoredEvent, new: &NewIdentity) -> Redelivery {
        if stored.raw_json.is_empty() {
            return self.compare_typed(&stored.envelope, new);
        }
        self.metrics.observe_stored_body_decode();
        let raw_json = stored.raw_json.clone();
        let (envelope, chat_event) = (new.envelope.clone(), new.chat_event.clone());
        self.decoder
            .run_waiting(raw_json.len(), move || {
                match decode::decode_with(&raw_json, Policy::Tolerant) {
                    Ok(decoded) if decoded.envelope.encode_to_vec() == envelope.as_ref() => {
                        Redelivery::Same
                    }
                    Ok(decoded) if chat_event_bytes(&decoded.envelope) == chat_event => {
                        Redelivery::Refreshed
                    }
                    Ok(_) => Redelivery::Conflict,
                    // The stored body no longer decodes: nothing to hold against the new one.
                    Err(_) => Redelivery::Same,
                }
            })
            .await
            .unwrap_or(Redelivery::Same)
    }

    /// How a new event, not the same as the stored one, compares with the stored typed form
    /// `envelope`: the same `ChatEvent` (refreshed `Rels`) or another. Decodes the stored
    /// envelope (counted with the stored-body decodes).
    fn compare_typed(&self, envelope: &Bytes, new: &NewIdentity) -> Redelivery {
        self.metrics.observe_stored_body_decode();
        match Envelope::decode(envelope.clone()) {
            Ok(stored) if chat_event_bytes(&stored) == new.chat_event => Redelivery::Refreshed,
            Ok(_) => Redelivery::Conflict,
            Err(_) => Redelivery::Same,
        }
    }

    /// Counts deviations, and logs each field pattern the first time it deviates (the pattern
    /// only: never a value, nor a key chosen by the sender).
    fn note_deviations(&self, deviations: &[Deviation]) {
        for pattern in self.metrics.observe_deviations(deviations) {
            tracing::warn!(
                path = %pattern,
                "an ingested body has a field that does not fit its proto type; the event is \
                 stored and the deviation reported on it (logged once per field)"
            );
        }
    }

    async fn append_one(&self, record: NewRecord) -> Result<Appended, IngestError> {
        let appended = self.log.append(vec![record]).await;
        self.count(&appended);
        appended
            .into_iter()
            .next()
            .unwrap_or_else(|| Err(LogError::Unavailable("log returned no result".into())))
            .map_err(IngestError::from)
    }

    /// Counts the stored records and the duplicates among the results of an append.
    fn count(&self, appended: &[Result<Appended, LogError>]) {
        let (mut stored, mut duplicates) = (0, 0);
        for appended in appended.iter().flatten() {
            if appended.duplicate {
                duplicates += 1;
            } else {
                stored += 1;
            }
        }
        self.metrics.observe_appended(stored, duplicates);
    }

    /// The log record of an event (cut to fit `--max-event-bytes`, see [`crate::fit`]), what
    /// identifies it for a conflict check, and its deviations (the cuts added). Refused
    /// ([`LogError::TooLarge`]) when it cannot fit, or its record is over what the store takes.
    fn record(
        &self,
        envelope: Envelope,
        raw_json: Bytes,
        deviations: Vec<Deviation>,
        key: Option<&str>,
    ) -> Result<(NewRecord, NewIdentity, Vec<Deviation>), IngestError> {
        let event_id = decode::dedup_id(&envelope)
            .or_else(|| key.map(|key| decode::idempotency_id(key, None)));
        let built = stored_record(envelope, raw_json, deviations, self.max_event_bytes);
        self.finish(event_id, built)
    }

    /// The log record of an event whose record [`stored_record`] built (or refused), once it is
    /// checked against what the store takes.
    fn finish(
        &self,
        event_id: Option<i64>,
        built: Result<(Bytes, NewIdentity, Vec<Deviation>), crate::fit::TooLarge>,
    ) -> Result<(NewRecord, NewIdentity, Vec<Deviation>), IngestError> {
        let (payload, identity, deviations) =
            built.map_err(|error| LogError::TooLarge(error.to_string()))?;
        if let Some(limit) = self.log.max_payload() {
            if payload.len() > limit.bytes {
                return Err(LogError::TooLarge(format!(
                    "the event is too large to store: its record is {} bytes (compressed), over \
                     the {} bytes the store takes; {}",
                    payload.len(),
                    limit.bytes,
                    limit.advice
                ))
                .into());
            }
        }
        let record = NewRecord {
            event_id,
            received_at_ms: now_ms(),
            payload,
        };
        Ok((record, identity, deviations))
    }

    /// Opens a subscription.
    pub async fn subscribe(
        &self,
        filter: Filter,
        start: Start,
    ) -> Result<Subscription, SubscribeError> {
        self.subscribe_evictable(filter, start, None).await
    }

    /// Opens a subscription whose client's connection `evict` closes, should the client stop
    /// reading while others wait for the memory it holds (see `budget`).
    pub async fn subscribe_evictable(
        &self,
        filter: Filter,
        start: Start,
        evict: Option<crate::budget::Evict>,
    ) -> Result<Subscription, SubscribeError> {
        Subscription::new(
            self.log.clone(),
            &self.hub,
            &self.subscribers,
            self.shutdown.clone(),
            filter,
            start,
            evict,
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
        // Ids are positive; the store's negative keys are transitive events' idempotency keys.
        if event_id <= 0 {
            return Ok(None);
        }
        match self.log.find_event(event_id).await? {
            Some(sequence) => self.get_by_sequence(sequence).await,
            None => Ok(None),
        }
    }

    /// The identity of the store this gateway serves ([`crate::log::EventLog::identity`]).
    pub fn store_identity(&self) -> String {
        self.log.identity()
    }

    /// Whether a cursor learnt under the store identity `theirs` may resume here.
    pub fn holds_cursors_of(&self, theirs: &str, after: Option<u64>) -> bool {
        self.log.holds_cursors_of(theirs, after)
    }

    /// Whether the gateway takes ingest now: not draining and the log is healthy.
    pub fn ready(&self) -> bool {
        self.accepting.load(Ordering::Relaxed) && !*self.shutdown.borrow() && self.log.healthy()
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// The shutdown signal: true once streams must end.
    pub fn shutdown(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
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
            live_tail_bytes: self.hub.bytes() as u64,
            subscriber_bytes: self.subscribers.held_bytes() as u64,
            subscribers_evicted: self.subscribers.evicted(),
            catch_up_records: self.subscribers.catch_up_records(),
        };
        self.metrics.render(&snapshot)
    }
}

/// What identifies a new event, to compare it with the one stored under its id.
#[derive(Debug, Clone)]
pub struct NewIdentity {
    /// Its digests (as its record keeps them).
    pub digests: Digests,
    /// Its typed envelope as decoded (before any cut), for records of earlier releases.
    pub envelope: Bytes,
    /// Its typed `ChatEvent`, encoded.
    pub chat_event: Bytes,
}

/// The encoded `ChatEvent` of `envelope` (empty without one).
fn chat_event_bytes(envelope: &Envelope) -> Bytes {
    envelope
        .chat_event
        .as_ref()
        .map_or_else(Bytes::new, |event| event.encode_to_vec().into())
}

/// How a duplicate compares with the event stored under its id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Redelivery {
    /// The same event (the same body, or the same typed form).
    Same,
    /// The same `ChatEvent` with other `Rels`: the vendor builds `Rels` when it sends, so a
    /// retry may carry newer snapshots of the chat or the client. The same event.
    Refreshed,
    /// Another `ChatEvent` under a reused id: a sender bug worth seeing.
    Conflict,
}

/// Why a resume with a cursor from the store `theirs` is refused by a gateway serving `ours`.
pub fn other_store(theirs: &str, ours: &str) -> String {
    let cut = |text: &str| text.chars().take(200).collect::<String>();
    format!(
        "the cursor is from the store {:?}, and this gateway serves {:?} (a restored backup, or a \
         stream deleted and created again): its sequences name other events; resume from the \
         beginning or by time",
        cut(theirs),
        cut(ours)
    )
}

/// An event's record as [`stored_record`] built it (or why it cannot be stored), with its id:
/// what a batch keeps of each item once decoded, on the decode pool, so that its typed form is
/// dropped at once (a body of many small items would otherwise hold all their envelopes).
pub struct Built {
    event_id: Option<i64>,
    built: Result<(Bytes, NewIdentity, Vec<Deviation>), crate::fit::TooLarge>,
}

impl Built {
    /// Gives a transitive event (no deduplication key) the key of item `index` of a request
    /// sent with the idempotency key `key` ([`decode::idempotency_id`]).
    pub fn keyed(&mut self, key: Option<&str>, index: usize) {
        if let (None, Some(key)) = (self.event_id, key) {
            self.event_id = Some(decode::idempotency_id(key, Some(index)));
        }
    }
}

/// The record of a decoded item of `raw_json` (see [`Built`]).
pub fn built(decoded: Decoded, raw_json: Bytes, max_event_bytes: usize) -> Built {
    Built {
        event_id: decode::dedup_id(&decoded.envelope),
        built: stored_record(
            decoded.envelope,
            raw_json,
            decoded.deviations,
            max_event_bytes,
        ),
    }
}

/// What the log stores for an event: its compact record ([`record`]): the typed envelope (cut to
/// fit `max_event_bytes` in its largest form, see [`crate::fit`]), the original body, the
/// deviations, the references as pointers into the envelope, the filter keys and the digests;
/// with what identifies the event and its deviations (the cuts added).
pub fn stored_record(
    envelope: Envelope,
    raw_json: Bytes,
    mut deviations: Vec<Deviation>,
    max_event_bytes: usize,
) -> Result<(Bytes, NewIdentity, Vec<Deviation>), crate::fit::TooLarge> {
    let decoded: Bytes = envelope.encode_to_vec().into();
    let chat_event: Bytes = chat_event_bytes(&envelope);
    let digests = Digests::of(&raw_json, &decoded, &chat_event);
    // Cuts change no id or key: both are read before the envelope goes to the cut.
    let keys = decode::keys(&envelope);
    let indices = decode::indices(&envelope);
    let (encoded, _cut) = crate::fit::fit(
        envelope,
        decoded.clone(),
        &indices,
        raw_json.len(),
        &mut deviations,
        max_event_bytes,
    )?;
    let payload = record::encode(&record::Parts {
        envelope: &encoded,
        raw_json: &raw_json,
        keys: &keys,
        deviations: &crate::wire::encode_deviations(&deviations),
        references: &indices,
        digests: &digests,
    });
    Ok((
        payload,
        NewIdentity {
            digests,
            envelope: decoded,
            chat_event,
        },
        deviations,
    ))
}

/// What the log stores for an event, as a [`StoredEvent`] (as records of earlier releases held
/// it, and as a record reads back): the typed envelope encoded, the original body, and what
/// ingest reads from the envelope once (the filter keys, the references resolved from `Rels`).
pub fn stored_event(envelope: &Envelope, raw_json: Bytes, deviations: &[Deviation]) -> StoredEvent {
    StoredEvent {
        envelope: envelope.encode_to_vec().into(),
        raw_json,
        keys: Some(decode::keys(envelope)),
        deviations: crate::wire::encode_deviations(deviations),
        references: decode::references(envelope).encode_to_vec().into(),
    }
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
