//! The live tail: the newest durable events, encoded once, shared by every subscriber.
//!
//! A feeder task follows the log's committed sequence, reads each new record once, turns it into
//! an [`EncodedEvent`] and appends the `Arc` to a ring bounded both in events (`--live-buffer`)
//! and in bytes (`--live-buffer-bytes`, DESIGN invariant 4): appending past either bound drops
//! the oldest events. A receiver whose next event was dropped reports `Lagged` and its
//! subscriber continues from the log (see `subscribe`). One event larger than the byte bound is
//! still kept, alone, so it can be delivered. Ingest never waits for the hub, and the hub never
//! waits for a subscriber. While nobody listens the ring is empty.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::log::{LogError, SharedLog};
use crate::wire::EncodedEvent;

/// Records read from the log per feeder step.
const FEED_BATCH: usize = 1024;

/// Default byte bound of the live tail (`--live-buffer-bytes`).
pub const DEFAULT_LIVE_BYTES: usize = 32 << 20;

/// Bytes counted for an event besides its stored parts: the `EncodedEvent`, its `Arc`, the
/// filter keys and the allocator's own overhead, so that many tiny events are counted too.
pub const EVENT_OVERHEAD: usize = 256;

/// The memory an event holds: its parts (slices of one buffer) and [`EVENT_OVERHEAD`].
pub fn event_bytes(event: &EncodedEvent) -> usize {
    event.envelope.len()
        + event.raw_json.len()
        + event.deviations.len()
        + event.references.len()
        + event.keys.event_type.len()
        + event.keys.actor.len()
        + EVENT_OVERHEAD
}

/// The shared side of the live tail.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
    /// The feeder task (ends at shutdown, also while the log fails).
    feeder: Arc<tokio::task::JoinHandle<()>>,
}

struct Inner {
    ring: Mutex<Ring>,
    /// The index one past the newest event appended: receivers wait on its changes.
    pushed: watch::Sender<u64>,
    receivers: AtomicUsize,
    /// Bytes held by the ring, for the gauge (also readable without the lock).
    bytes: AtomicUsize,
    max_events: usize,
    max_bytes: usize,
}

/// The events kept: `events[0]` has index `head`; indices grow by one per appended event.
#[derive(Default)]
struct Ring {
    events: VecDeque<(Arc<EncodedEvent>, usize)>,
    head: u64,
    bytes: usize,
}

impl Ring {
    fn end(&self) -> u64 {
        self.head + self.events.len() as u64
    }

    fn pop_front(&mut self) {
        if let Some((_, size)) = self.events.pop_front() {
            self.head += 1;
            self.bytes -= size;
        }
    }
}

impl Inner {
    fn push(&self, event: Arc<EncodedEvent>) {
        let size = event_bytes(&event);
        let end = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.events.push_back((event, size));
            ring.bytes += size;
            // The newest event stays even when it alone is over the byte bound.
            while ring.events.len() > 1
                && (ring.events.len() > self.max_events || ring.bytes > self.max_bytes)
            {
                ring.pop_front();
            }
            self.bytes.store(ring.bytes, Ordering::Relaxed);
            ring.end()
        };
        self.pushed.send_replace(end);
    }

    /// Drops every event (nobody listens any more).
    fn clear(&self) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        while !ring.events.is_empty() {
            ring.pop_front();
        }
        self.bytes.store(0, Ordering::Relaxed);
    }
}

/// Why [`Receiver::try_recv`] has no event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TryRecvError {
    /// Nothing new yet.
    Empty,
    /// Events this receiver had not taken were dropped (the tail's bounds): read the log.
    Lagged,
}

/// One subscriber's position in the live tail.
pub struct Receiver {
    inner: Arc<Inner>,
    next: u64,
    pushed: watch::Receiver<u64>,
}

impl Receiver {
    /// The next event if one is there, without waiting. After `Lagged` the receiver continues
    /// at the oldest event kept.
    pub fn try_recv(&mut self) -> Result<Arc<EncodedEvent>, TryRecvError> {
        let ring = self.inner.ring.lock().unwrap_or_else(|p| p.into_inner());
        if self.next < ring.head {
            self.next = ring.head;
            return Err(TryRecvError::Lagged);
        }
        match ring.events.get((self.next - ring.head) as usize) {
            Some((event, _)) => {
                self.next += 1;
                Ok(event.clone())
            }
            None => Err(TryRecvError::Empty),
        }
    }

    /// The next event, waiting for one; `Err(Lagged)` as in [`Receiver::try_recv`].
    pub async fn recv(&mut self) -> Result<Arc<EncodedEvent>, TryRecvError> {
        loop {
            // Marked seen before the ring is looked at: an append after this wakes the wait.
            self.pushed.borrow_and_update();
            match self.try_recv() {
                Err(TryRecvError::Empty) => {
                    // The sender lives in `inner`, which this receiver holds: never closed.
                    let _ = self.pushed.changed().await;
                }
                other => return other,
            }
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if self.inner.receivers.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.inner.clear();
        }
    }
}

impl Hub {
    /// Starts the feeder for `log` with a tail of `capacity` events and
    /// [`DEFAULT_LIVE_BYTES`], beginning after the log's current end.
    pub fn start(log: SharedLog, capacity: usize, shutdown: watch::Receiver<bool>) -> Self {
        Self::with_bytes(log, capacity, DEFAULT_LIVE_BYTES, shutdown)
    }

    /// Starts the feeder for `log`, beginning after the log's current end, with a tail of at
    /// most `capacity` events and `max_bytes` bytes (one larger event is kept alone). The
    /// feeder stops when `shutdown` changes.
    pub fn with_bytes(
        log: SharedLog,
        capacity: usize,
        max_bytes: usize,
        mut shutdown: watch::Receiver<bool>,
    ) -> Self {
        let inner = Arc::new(Inner {
            ring: Mutex::new(Ring::default()),
            pushed: watch::channel(0).0,
            receivers: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_events: capacity.max(1),
            max_bytes: max_bytes.max(1),
        });
        let feeder_inner = inner.clone();
        let every: crate::log::Wanted =
            Arc::new(|_, _, payload: &[u8]| Some(crate::wire::held_len(payload)));
        // Where the feeder starts is taken now, not when its task first runs: a subscriber may
        // attach, and events be stored, before that (on a busy runtime), and those events must
        // reach the tail (a subscriber at the log's end waits for them there).
        let mut next = log.bounds().next;
        let mut committed = log.committed();
        let feeder = tokio::spawn(async move {
            let inner = feeder_inner;
            loop {
                loop {
                    let end = *committed.borrow_and_update();
                    if next > end {
                        break;
                    }
                    if inner.receivers.load(Ordering::Acquire) == 0 {
                        // Nobody listens: nothing to read or encode. A subscriber attaches its
                        // receiver before it reads the log, so one attaching now still reads up
                        // to `end` from the log, and everything after `end` is appended.
                        next = end + 1;
                        break;
                    }
                    // At most the tail's bytes per step (at least one record): a burst of large
                    // events is never read whole only to leave the tail at once.
                    let read = log
                        .scan(next, FEED_BATCH, inner.max_bytes, every.clone())
                        .await;
                    match read.map(|scanned| scanned.records) {
                        Ok(records) if records.is_empty() => break,
                        Ok(records) => {
                            for record in records {
                                next = record.sequence + 1;
                                match EncodedEvent::from_payload(
                                    record.sequence,
                                    record.received_at_ms,
                                    record.payload,
                                ) {
                                    Ok(event) => inner.push(Arc::new(event)),
                                    Err(error) => {
                                        tracing::error!(sequence = record.sequence, %error, "undecodable record in the log")
                                    }
                                }
                            }
                        }
                        Err(LogError::Truncated { oldest, .. }) => next = oldest,
                        Err(error) => {
                            tracing::warn!(%error, "live tail cannot read the log; retrying");
                            tokio::select! {
                                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                                _ = shutdown.changed() => return,
                            }
                        }
                    }
                }
                tokio::select! {
                    changed = committed.changed() => if changed.is_err() { break },
                    _ = shutdown.changed() => break,
                }
            }
        });
        Self {
            inner,
            feeder: Arc::new(feeder),
        }
    }

    /// Whether the feeder task has ended (after shutdown).
    pub fn stopped(&self) -> bool {
        self.feeder.is_finished()
    }

    /// A receiver of every event appended from now on.
    pub fn subscribe(&self) -> Receiver {
        self.inner.receivers.fetch_add(1, Ordering::AcqRel);
        let pushed = self.inner.pushed.subscribe();
        let next = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .end();
        Receiver {
            inner: self.inner.clone(),
            next,
            pushed,
        }
    }

    /// How many receivers are attached.
    pub fn receivers(&self) -> usize {
        self.inner.receivers.load(Ordering::Acquire)
    }

    /// Bytes the live tail holds now (see [`event_bytes`]).
    pub fn bytes(&self) -> usize {
        self.inner.bytes.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::{Appended, Bounds, EventLog, NewRecord, Record};

    /// A log that has events but cannot read them.
    struct Broken(watch::Sender<u64>);

    #[async_trait::async_trait]
    impl EventLog for Broken {
        async fn append(&self, records: Vec<NewRecord>) -> Vec<Result<Appended, LogError>> {
            records
                .iter()
                .map(|_| Err(LogError::Unavailable("broken".into())))
                .collect()
        }
        async fn read(&self, _: u64, _: usize) -> Result<Vec<Record>, LogError> {
            Err(LogError::Unavailable("broken".into()))
        }
        async fn find_event(&self, _: i64) -> Result<Option<u64>, LogError> {
            Ok(None)
        }
        async fn seek_time(&self, _: i64) -> Result<u64, LogError> {
            Ok(1)
        }
        fn identity(&self) -> String {
            "test".into()
        }

        fn bounds(&self) -> Bounds {
            Bounds { first: 1, next: 1 }
        }
        fn committed(&self) -> watch::Receiver<u64> {
            self.0.subscribe()
        }
    }

    /// Found by the model test on a loaded machine: a subscriber attached and a batch was stored
    /// before the feeder's task first ran; the feeder then started after the batch, and the
    /// subscriber, at the log's end, waited for ever for events the tail never got.
    #[tokio::test(flavor = "current_thread")]
    async fn events_stored_before_the_feeder_first_runs_reach_the_tail() {
        use crate::log::memory::MemoryLog;
        let log = Arc::new(MemoryLog::new(None));
        let (_shutdown, shutdown_rx) = watch::channel(false);
        // On a current-thread runtime the feeder's task has not run yet.
        let hub = Hub::start(log.clone(), 16, shutdown_rx);
        let mut receiver = hub.subscribe();
        let record = |id| NewRecord {
            event_id: Some(id),
            received_at_ms: 0,
            payload: prost::Message::encode_to_vec(&crate::wire::StoredEvent {
                raw_json: bytes::Bytes::from(format!("{{\"id\":{id}}}")),
                ..crate::wire::StoredEvent::default()
            })
            .into(),
        };
        log.append_all(vec![record(1), record(2)]).await.unwrap();
        let first = tokio::time::timeout(std::time::Duration::from_secs(5), receiver.recv())
            .await
            .expect("the tail gets the events stored before the feeder ran")
            .expect("no lag");
        assert_eq!(first.sequence, 1);
        assert_eq!(receiver.recv().await.expect("no lag").sequence, 2);
    }

    #[tokio::test]
    async fn the_feeder_stops_at_shutdown_even_while_the_log_fails() {
        let log = Arc::new(Broken(watch::channel(0).0));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let hub = Hub::start(log.clone(), 16, shutdown_rx);
        let _listener = hub.subscribe();
        log.0.send_replace(5);
        // Let the feeder meet the failing read and start retrying.
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        assert!(!hub.stopped());
        shutdown.send_replace(true);
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while !hub.stopped() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the feeder ends after shutdown");
    }

    #[tokio::test]
    async fn the_tail_keeps_at_most_its_bytes_and_a_receiver_behind_it_lags() {
        use crate::log::memory::MemoryLog;
        use crate::wire::StoredEvent;
        use prost::Message;
        let log = Arc::new(MemoryLog::new(None));
        let (_shutdown, shutdown_rx) = watch::channel(false);
        let hub = Hub::with_bytes(log.clone(), 1000, 10_000, shutdown_rx);
        let mut receiver = hub.subscribe();
        // The feeder starts following the log.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let append = |size: usize, id: i64| {
            let stored = StoredEvent {
                raw_json: bytes::Bytes::from(vec![b'x'; size]),
                ..StoredEvent::default()
            };
            NewRecord {
                event_id: Some(id),
                received_at_ms: 0,
                payload: stored.encode_to_vec().into(),
            }
        };
        // Ten events of 3,000 bytes: at most three fit in 10,000 bytes.
        log.append_all((1..=10).map(|id| append(3000, id)).collect())
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(hub.bytes() <= 10_000, "{}", hub.bytes());
        assert_eq!(receiver.try_recv().err(), Some(TryRecvError::Lagged));
        let oldest = receiver.try_recv().expect("the oldest kept");
        assert!(oldest.sequence >= 8, "{}", oldest.sequence);
        // One event larger than the bound is kept, alone.
        log.append_all(vec![append(50_000, 11)]).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(hub.bytes() > 10_000);
        assert_eq!(receiver.try_recv().err(), Some(TryRecvError::Lagged));
        assert_eq!(receiver.try_recv().expect("the large one").sequence, 11);
        drop(receiver);
        assert_eq!(hub.bytes(), 0, "emptied when nobody listens");
    }
}
