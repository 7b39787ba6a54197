//! One subscriber's cursor: catch-up reads from the log, then the live tail, and back to the log
//! whenever the tail has moved on without it. Events arrive in sequence order, without gaps or
//! repeats, whatever the subscriber's speed.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{watch, Semaphore};

use crate::budget::{Budget, Evict, Holder, Permit};
use crate::hub::{event_bytes, Hub, Receiver, TryRecvError};
use crate::log::{LogError, SharedLog, Wanted};
use crate::wire::{EncodedEvent, Keys};

/// Records a catch-up read looks at, at most (those the filter refuses are not copied).
const SCAN_RECORDS: usize = 2048;

/// Bytes a catch-up page takes at most, when the budget is not shared: small, so that a
/// subscriber whose client stops reading holds little beyond the event being sent.
const PAGE_BYTES: usize = 256 << 10;

/// Default [`Registry`] budget: bytes held for all subscribers together, outside the live tail
/// (`--catch-up-memory`, see `budget`).
pub const DEFAULT_CATCH_UP_BYTES: usize = 64 << 20;

/// Default cap on catch-up reads running at once, over all subscriptions (`--catch-up-reads`).
pub const DEFAULT_CATCH_UP_READS: usize = 1;

/// How long a cursor ahead of the log's end waits for the log to reach it: a replica may lag a
/// moment behind the one that served the cursor.
const AHEAD_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Which events a subscriber wants. Fields combine with AND, values within a field with OR; an
/// empty field does not restrict.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// `ChatEvent.Type` wire strings.
    pub event_types: Vec<String>,
    /// Project of the event's chat.
    pub project_ids: Vec<i64>,
    /// Channel of the event's chat.
    pub channel_ids: Vec<i64>,
    /// `ChatEvent.ChatId`.
    pub chat_ids: Vec<i64>,
    /// `ChatEvent.ClientId`.
    pub client_ids: Vec<i64>,
    /// `ChatEvent.UserId`.
    pub user_ids: Vec<i64>,
    /// `ChatEvent.Actor` wire strings.
    pub actors: Vec<String>,
}

impl Filter {
    /// Whether an event with these keys passes.
    pub fn matches(&self, keys: &Keys) -> bool {
        fn any<T: PartialEq>(wanted: &[T], value: &T) -> bool {
            wanted.is_empty() || wanted.contains(value)
        }
        fn any_opt(wanted: &[i64], value: Option<i64>) -> bool {
            wanted.is_empty() || value.is_some_and(|v| wanted.contains(&v))
        }
        any(&self.event_types, &keys.event_type)
            && any(&self.actors, &keys.actor)
            && any_opt(&self.project_ids, keys.project_id)
            && any_opt(&self.channel_ids, keys.channel_id)
            && any_opt(&self.chat_ids, keys.chat_id)
            && any_opt(&self.client_ids, keys.client_id)
            && any_opt(&self.user_ids, keys.user_id)
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Start {
    /// Only events stored after the subscription begins.
    #[default]
    Live,
    /// Every retained event.
    Beginning,
    /// Events with a sequence greater than this.
    After(u64),
    /// Events received at or after this time (milliseconds since the Unix epoch).
    Since(i64),
}

/// Why a subscription ended.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubscribeError {
    /// The log could not serve the cursor (truncated by retention, or unavailable).
    #[error(transparent)]
    Log(#[from] LogError),
    /// A stored record could not be decoded.
    #[error("stored record {0} is corrupt")]
    Corrupt(u64),
    /// The gateway is shutting down; reconnect (elsewhere) with the last sequence.
    #[error("the gateway is shutting down")]
    ShuttingDown,
    /// The configured maximum of concurrent subscribers is reached.
    #[error("too many subscribers (the limit is {0}); retry later or elsewhere")]
    TooMany(usize),
    /// The cursor is past the newest stored event (a store restored from an older backup, or
    /// a cursor from another gateway): resuming there would silently skip what is stored later
    /// under lower sequences.
    #[error(
        "cursor {requested} is ahead of the newest stored sequence {newest}: this store does not \
         hold the events the cursor came from (restored from an older backup?); resume from the \
         beginning or after {newest}"
    )]
    Ahead {
        /// The sequence asked for (the cursor).
        requested: u64,
        /// The newest stored sequence.
        newest: u64,
    },
}

/// The open subscriptions and their positions (for lag metrics), with a cap on how many, and the
/// memory their catch-up pages may hold together.
#[derive(Clone)]
pub struct Registry {
    positions: Arc<Mutex<HashMap<u64, Arc<AtomicU64>>>>,
    ids: Arc<AtomicU64>,
    max: usize,
    /// Bytes all subscriptions may hold together outside the live tail (DESIGN invariant 4):
    /// their pages and the events on their way to the socket (see `budget`).
    budget: Budget,
    /// Catch-up reads running at once, over all subscriptions: scans do not take the CPU that
    /// ingest needs, however many subscribers catch up.
    reads: Arc<Semaphore>,
    /// Subscriptions reading from the log now, among which the budget is shared.
    catching_up: Arc<AtomicU64>,
    /// Records catch-up reads have looked at (their filter keys checked), and those they kept
    /// (copied and decoded): a filter that matches nothing costs the first only.
    scanned: Arc<AtomicU64>,
    kept: Arc<AtomicU64>,
}

impl Registry {
    /// A registry admitting at most `max` subscriptions at once, whose catch-up pages hold
    /// [`DEFAULT_CATCH_UP_BYTES`] together.
    pub fn new(max: usize) -> Self {
        Self::with_catch_up_bytes(max, DEFAULT_CATCH_UP_BYTES)
    }

    /// A registry whose subscriptions hold `catch_up_bytes` together.
    pub fn with_catch_up_bytes(max: usize, catch_up_bytes: usize) -> Self {
        Self::with_limits(max, catch_up_bytes, DEFAULT_CATCH_UP_READS)
    }

    /// A registry whose subscriptions hold `catch_up_bytes` together and run at most
    /// `catch_up_reads` catch-up reads at once.
    pub fn with_limits(max: usize, catch_up_bytes: usize, catch_up_reads: usize) -> Self {
        Self::with_stall(
            max,
            catch_up_bytes,
            catch_up_reads,
            crate::budget::DEFAULT_STALL_TIMEOUT,
        )
    }

    /// A registry as [`Registry::with_limits`] whose subscribers holding bytes without giving
    /// any back for `stall` are evicted when others wait for them (see `budget`).
    pub fn with_stall(
        max: usize,
        catch_up_bytes: usize,
        catch_up_reads: usize,
        stall: std::time::Duration,
    ) -> Self {
        Self {
            positions: Arc::default(),
            ids: Arc::default(),
            max,
            budget: Budget::with_stall(catch_up_bytes, stall),
            reads: Arc::new(Semaphore::new(catch_up_reads.max(1))),
            catching_up: Arc::default(),
            scanned: Arc::default(),
            kept: Arc::default(),
        }
    }

    /// The bytes one more catch-up page may take now: an equal share of the budget.
    fn page_bytes(&self) -> usize {
        let sharing = self.catching_up.load(Ordering::Relaxed).max(1) as usize;
        (self.budget.total() / sharing).clamp(1, PAGE_BYTES)
    }

    /// Bytes held for subscribers now, outside the live tail (pages and events being sent).
    pub fn held_bytes(&self) -> usize {
        self.budget.held()
    }

    /// `(records catch-up reads looked at, records they kept and decoded)` so far.
    pub fn catch_up_records(&self) -> (u64, u64) {
        (
            self.scanned.load(Ordering::Relaxed),
            self.kept.load(Ordering::Relaxed),
        )
    }

    /// Subscribers whose connection was closed because their client read nothing while others
    /// waited for memory.
    pub fn evicted(&self) -> u64 {
        self.budget.evicted()
    }

    fn register(&self, position: u64) -> Result<Registered, SubscribeError> {
        let mut positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        if positions.len() >= self.max {
            return Err(SubscribeError::TooMany(self.max));
        }
        let id = self.ids.fetch_add(1, Ordering::Relaxed) + 1;
        let cell = Arc::new(AtomicU64::new(position));
        positions.insert(id, cell.clone());
        // A new subscription starts by catching up.
        self.catching_up.fetch_add(1, Ordering::Relaxed);
        Ok(Registered {
            id,
            position: cell,
            registry: self.clone(),
            catching_up: true,
        })
    }

    /// `(subscriber id, next sequence it will look at)` for every open subscription.
    pub fn positions(&self) -> Vec<(u64, u64)> {
        let positions = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        positions
            .iter()
            .map(|(id, cell)| (*id, cell.load(Ordering::Relaxed)))
            .collect()
    }
}

/// A subscription's entry in the [`Registry`]; removed on drop.
struct Registered {
    id: u64,
    position: Arc<AtomicU64>,
    registry: Registry,
    /// Counted in `registry.catching_up`.
    catching_up: bool,
}

impl Registered {
    fn set_catching_up(&mut self, catching_up: bool) {
        if self.catching_up != catching_up {
            self.catching_up = catching_up;
            if catching_up {
                self.registry.catching_up.fetch_add(1, Ordering::Relaxed);
            } else {
                self.registry.catching_up.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.set_catching_up(false);
        self.registry
            .positions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A subscriber's position and source.
pub struct Subscription {
    log: SharedLog,
    live: Receiver,
    shutdown: watch::Receiver<bool>,
    filter: Arc<Filter>,
    /// The next sequence this subscriber has not yet looked at.
    next: u64,
    /// Events received before this time (ms since the Unix epoch) are skipped: `since_time`
    /// in the future (received times are non-decreasing in sequence order).
    not_before: i64,
    /// Matching events read from the log and not yet handed out (at most one page), each with
    /// its bytes of the budget.
    pending: VecDeque<(Arc<EncodedEvent>, Permit)>,
    /// The budget's bytes of the event handed out last, until the stream takes them
    /// ([`Subscription::take_permit`]) or asks for the next event.
    handed: Option<Permit>,
    /// Reading from the log (true) or from the live tail (false).
    catching_up: bool,
    /// The size of an event the last page could not take: the next page waits for that much.
    too_large: usize,
    /// `Some(next sequence when it began)` while a subscription that asked for the oldest
    /// retained events (the beginning, or a time) has read nothing yet: events retention removed
    /// before it began (a replica may learn of that late) are not a gap for it, so it starts at
    /// the new oldest. A removal of anything stored after it began, or any later truncation, is
    /// reported.
    from_oldest: Option<u64>,
    /// This subscription's entry in the registry: its position, for lag metrics.
    registered: Registered,
    /// What it holds of the registry's budget.
    holder: Holder,
}

impl Subscription {
    /// Positions a new subscription. The live receiver is attached before the start is resolved,
    /// so nothing stored in between is missed. `evict` closes its client's connection, should
    /// the client stop reading while others wait for the bytes it holds (`None`: never).
    pub async fn new(
        log: SharedLog,
        hub: &Hub,
        registry: &Registry,
        shutdown: watch::Receiver<bool>,
        filter: Filter,
        start: Start,
        evict: Option<Evict>,
    ) -> Result<Self, SubscribeError> {
        let live = hub.subscribe();
        let bounds = log.bounds();
        let next = match start {
            Start::Live => bounds.next,
            Start::Beginning => bounds.first,
            Start::After(sequence) => {
                let next = sequence.saturating_add(1);
                if next < bounds.first {
                    return Err(LogError::Truncated {
                        requested: next,
                        oldest: bounds.first,
                    }
                    .into());
                }
                if next > bounds.next {
                    reached(&log, sequence, shutdown.clone()).await?;
                }
                next
            }
            Start::Since(at_ms) => log.seek_time(at_ms).await?,
        };
        let not_before = match start {
            Start::Since(at_ms) => at_ms,
            _ => i64::MIN,
        };
        let registered = registry.register(next)?;
        let holder = registry.budget.holder(evict);
        Ok(Self {
            log,
            live,
            shutdown,
            filter: Arc::new(filter),
            next,
            not_before,
            pending: VecDeque::new(),
            handed: None,
            catching_up: true,
            too_large: 0,
            from_oldest: matches!(start, Start::Beginning | Start::Since(_)).then_some(bounds.next),
            registered,
            holder,
        })
    }

    /// The sequence the subscription will look at next.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The budget's bytes of the event returned last by [`Subscription::next`] or
    /// [`Subscription::try_next`]: the stream keeps them until that event's bytes have left for
    /// the socket (see `budget`). Not taken, they are given back at the next call.
    pub fn take_permit(&mut self) -> Option<Permit> {
        self.handed.take()
    }

    /// This subscription's id in the registry (for logs and metrics).
    pub fn id(&self) -> u64 {
        self.registered.id
    }

    fn advance_to(&mut self, next: u64) {
        self.next = next;
        self.registered.position.store(next, Ordering::Relaxed);
    }

    /// The next matching event. Waits for one to be stored; ends only with an error.
    pub async fn next(&mut self) -> Result<Arc<EncodedEvent>, SubscribeError> {
        loop {
            if *self.shutdown.borrow() {
                return Err(SubscribeError::ShuttingDown);
            }
            if let Some(ready) = self.try_next() {
                return ready;
            }
            if self.catching_up {
                self.catch_up_page().await?;
                continue;
            }
            let received = tokio::select! {
                biased;
                received = self.live.recv() => received,
                _ = self.shutdown.changed() => return Err(SubscribeError::ShuttingDown),
            };
            match received {
                Ok(event) => {
                    if let Some(event) = self.take_live(event) {
                        return Ok(event);
                    }
                }
                // Fell behind the bounded tail: the log has everything it missed.
                Err(TryRecvError::Lagged) => self.set_catching_up(true),
                Err(TryRecvError::Empty) => {}
            }
        }
    }

    /// The next matching event if one is at hand without waiting: from the page already read,
    /// or already in the live tail. `None` when [`Subscription::next`] has to wait (for the log
    /// or for a new event). A busy stream takes every event here, without a future per event.
    pub fn try_next(&mut self) -> Option<Result<Arc<EncodedEvent>, SubscribeError>> {
        // `has_changed` reads one atomic; the only change ever made is to `true`.
        if self.shutdown.has_changed().unwrap_or(false) && *self.shutdown.borrow() {
            return Some(Err(SubscribeError::ShuttingDown));
        }
        self.handed = None;
        loop {
            if let Some((event, permit)) = self.pending.pop_front() {
                self.handed = Some(permit);
                return Some(Ok(event));
            }
            if self.catching_up {
                return None;
            }
            match self.live.try_recv() {
                Ok(event) => {
                    if let Some(event) = self.take_live(event) {
                        return Some(Ok(event));
                    }
                }
                Err(TryRecvError::Empty) => return None,
                // Fell behind the bounded tail: the log has everything it missed.
                Err(TryRecvError::Lagged) => {
                    self.set_catching_up(true);
                    return None;
                }
            }
        }
    }

    /// Moves the cursor past a live event; the event if it is the next one and matches. A gap
    /// sends the subscription back to the log, and so does a budget with no room for the
    /// event now (the log has it; the catch-up read waits for room).
    fn take_live(&mut self, event: Arc<EncodedEvent>) -> Option<Arc<EncodedEvent>> {
        if event.sequence > self.next {
            self.set_catching_up(true);
            return None;
        }
        if event.sequence < self.next {
            return None;
        }
        if !self.wants(&event) {
            self.advance_to(self.next + 1);
            return None;
        }
        let Some(permit) = self
            .registered
            .registry
            .budget
            .try_acquire(&self.holder, event_bytes(&event))
        else {
            self.set_catching_up(true);
            return None;
        };
        self.advance_to(self.next + 1);
        self.handed = Some(permit);
        Some(event)
    }

    fn wants(&self, event: &EncodedEvent) -> bool {
        event.received_at_ms >= self.not_before && self.filter.matches(&event.keys)
    }

    /// Switches between reading the log and the live tail.
    fn set_catching_up(&mut self, catching_up: bool) {
        self.catching_up = catching_up;
        self.registered.set_catching_up(catching_up);
    }

    /// Reads one page from the log: first it takes this subscription's share of the budget
    /// (waiting while others hold it), then a read slot (at most `--catch-up-reads` run at
    /// once); the read skips the records the filter refuses without copying them and keeps
    /// whole events within the bytes taken (at least one, whatever its size). Each event kept
    /// holds its bytes until it has left for the socket; an event the bytes taken cannot hold
    /// is read again by the next page, which waits for its size. At the end of the log,
    /// switches to the live tail.
    async fn catch_up_page(&mut self) -> Result<(), SubscribeError> {
        let registry = self.registered.registry.clone();
        let want = registry.page_bytes().max(self.too_large);
        let mut shutdown = self.shutdown.clone();
        let page = tokio::select! {
            biased;
            _ = shutdown.changed() => return Err(SubscribeError::ShuttingDown),
            page = registry.budget.acquire(&self.holder, want) => page,
        };
        let max_bytes = page.num_permits();
        let mut page = Some(page);
        let filter = self.filter.clone();
        let not_before = self.not_before;
        let wanted: Wanted = Arc::new(move |_, received_at_ms, payload: &[u8]| {
            // A payload whose keys do not decode is kept: decoding it below reports it.
            let kept = received_at_ms >= not_before
                && crate::wire::keys_of(payload).is_none_or(|keys| filter.matches(&keys));
            // Counted as held once decompressed, never by its compressed length.
            kept.then(|| crate::wire::held_len(payload))
        });
        let from = self.next;
        // The read runs in a task of its own, which takes a read slot and gives it back when
        // done: this future may wait unpolled for a long time (a stream whose client stopped
        // reading is not polled), and must not hold a slot meanwhile.
        let (log, reads) = (self.log.clone(), registry.reads.clone());
        // Busy until the read is done (cleared by the task: this future may not be polled
        // again soon), so that the bytes of its page do not count against its client.
        let holder = self.holder.clone();
        holder.set_busy(true);
        let read = tokio::spawn(async move {
            let scanned = match reads.acquire_owned().await {
                Ok(_slot) => log.scan(from, SCAN_RECORDS, max_bytes, wanted).await,
                Err(_) => Err(LogError::Closed),
            };
            holder.set_busy(false);
            scanned
        });
        let scanned = tokio::select! {
            biased;
            _ = shutdown.changed() => return Err(SubscribeError::ShuttingDown),
            read = read => read.unwrap_or_else(|error| Err(LogError::Unavailable(error.to_string()))),
        };
        let scanned = match scanned {
            Err(LogError::Truncated { oldest, .. })
                if self
                    .from_oldest
                    .is_some_and(|began| from < oldest && oldest <= began) =>
            {
                self.advance_to(oldest);
                return Ok(());
            }
            scanned => scanned?,
        };
        self.from_oldest = None;
        if scanned.next <= from && scanned.records.is_empty() {
            self.set_catching_up(false);
            return Ok(());
        }
        let mut next = scanned.next;
        self.too_large = 0;
        // Counted once per read, never per record: the records looked at are those it passed.
        registry
            .scanned
            .fetch_add(scanned.next.saturating_sub(from), Ordering::Relaxed);
        registry
            .kept
            .fetch_add(scanned.records.len() as u64, Ordering::Relaxed);
        for record in scanned.records {
            let sequence = record.sequence;
            let event =
                match EncodedEvent::from_payload(sequence, record.received_at_ms, record.payload) {
                    Ok(event) => event,
                    // The events before it are handed out first; the next read stops here.
                    Err(_) if !self.pending.is_empty() => {
                        next = sequence;
                        break;
                    }
                    Err(_) => return Err(SubscribeError::Corrupt(sequence)),
                };
            let size = event_bytes(&event);
            let Some(permit) = registry.budget.take(&self.holder, &mut page, size) else {
                // No room for it now: read again by the next page, which waits for its size.
                if self.pending.is_empty() {
                    self.too_large = size;
                }
                next = sequence;
                break;
            };
            self.pending.push_back((Arc::new(event), permit));
        }
        self.advance_to(next);
        drop(page);
        // Catch-up reads take turns with everything else on the runtime.
        tokio::task::yield_now().await;
        Ok(())
    }
}

/// Waits (a moment, see [`AHEAD_GRACE`]) until the log holds `sequence`; `Ahead` if it does not.
async fn reached(
    log: &SharedLog,
    sequence: u64,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SubscribeError> {
    let mut committed = log.committed();
    let wait = async {
        loop {
            if *committed.borrow_and_update() >= sequence {
                return true;
            }
            if committed.changed().await.is_err() {
                return false;
            }
        }
    };
    let reached = tokio::select! {
        reached = tokio::time::timeout(AHEAD_GRACE, wait) => reached.unwrap_or(false),
        _ = shutdown.changed() => return Err(SubscribeError::ShuttingDown),
    };
    if reached {
        Ok(())
    } else {
        Err(SubscribeError::Ahead {
            requested: sequence,
            newest: *log.committed().borrow(),
        })
    }
}

#[cfg(test)]
mod tests;
