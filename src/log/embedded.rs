//! The embedded durable [`EventLog`] (the default store): one redb file in the data dir.
//!
//! Why redb: it is a maintained, pure-Rust, ACID embedded B-tree store. A commit with
//! `Durability::Immediate` is fsynced before it returns, and a crash at any point leaves the file
//! at the last committed transaction (its commit slots are checksummed; a torn commit is
//! detected and discarded on open). That gives "acknowledged means durable" and "nothing
//! half-written is served" without a hand-written log format.
//!
//! Layout: table `events` (sequence -> received_at_ms ‖ event_id ‖ payload), table `ids`
//! (event id -> sequence, the dedup index, removed together with its event by retention), table
//! `meta` (`next`: the next sequence, so sequences never go back even when retention empties the
//! log; `bytes`: the size of the stored events; `format`: the layout's version, [`FORMAT`],
//! checked before anything is written, see `open.rs`).
//!
//! Group commit: one writer task takes every append request waiting in its queue and commits them
//! in one transaction (one fsync). A lone request is committed at once: the writer never waits
//! for more work to arrive. Retention runs in those transactions and, with a maximum age, also on
//! a timer ([`RETENTION_SWEEP`]) while no events arrive: a transaction of its own once the oldest
//! record has expired, so a quiet gateway removes expired events too.

// redb::Error is large (160 bytes); it only travels on the rare failure path, unboxed like redb returns it.
#![allow(clippy::result_large_err)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use tokio::sync::{mpsc, oneshot, watch};

pub use super::Retention;
use super::{Appended, Bounds, EventLog, LogError, LogStats, NewRecord, Record, RETENTION_SWEEP};
pub(crate) use open::in_use;
pub use open::FORMAT;
use open::{open_database, Access};

mod open;
mod storage;

const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const IDS: TableDefinition<i64, u64> = TableDefinition::new("ids");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const NEXT: &str = "next";
/// Total size of the `events` values, for byte retention.
const BYTES: &str = "bytes";
/// Bytes before the payload in an `events` value: received_at_ms, event_id.
const HEADER: usize = 16;
/// Records committed in one transaction at most.
const MAX_GROUP: usize = 8192;
/// Default size of redb's page cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 * 1024 * 1024;
/// Append requests waiting for the writer; when full, appenders wait for room.
const QUEUE: usize = 4096;

/// Statistics of the writer, for metrics and logs.
#[derive(Debug, Default)]
pub struct WriterStats {
    /// Transactions committed (each one fsync).
    pub syncs: AtomicU64,
    /// Records written by those transactions.
    pub records: AtomicU64,
}

/// The embedded store.
pub struct EmbeddedLog {
    shared: Arc<Shared>,
    /// Bounded queue to the writer task; when full, `append` waits.
    requests: mpsc::Sender<AppendRequest>,
    /// The writer task; it ends (and closes the file) when `requests` is dropped.
    writer: tokio::task::JoinHandle<()>,
}

struct Shared {
    path: PathBuf,
    cache_bytes: usize,
    /// The open database; `None` between closing and reopening it after an I/O error.
    db: RwLock<Option<Arc<Database>>>,
    first: AtomicU64,
    /// The received time of the oldest record (`i64::MAX` when empty): the retention timer
    /// starts a transaction only once it has expired.
    first_time: AtomicI64,
    next: AtomicU64,
    /// The received time of the newest record: the next one is stamped no earlier, so received
    /// times stay non-decreasing in sequence order (for `seek_time`) across restarts and clock
    /// steps back.
    last_time: AtomicI64,
    committed: watch::Sender<u64>,
    healthy: AtomicBool,
    stats: WriterStats,
    /// Armed only by tests: the next sync reaches the disk and then reports an error.
    fault: Arc<AtomicBool>,
    /// Reads that found the file damaged.
    damaged_reads: AtomicU64,
    /// The file's random id (`meta` key `store_id`).
    store_id: u64,
    /// This run's epoch: a random number recorded in the file when the store is opened
    /// (`meta` key `epoch:<hex>`, the next sequence then), part of the store's identity.
    epoch: u64,
    /// Every earlier epoch this file has recorded, with where it ended (the next sequence when
    /// the file was next opened): a cursor learnt in one of them, up to where it ended, belongs
    /// to this file's history. One from an epoch it does not hold, or past where that epoch
    /// ended here, came from another copy of the store (a restored backup, a copy taken while it
    /// ran, a copy run elsewhere), whose sequences name other events.
    epochs: std::collections::HashMap<u64, u64>,
}

/// The `meta` keys of epochs start with this (`epoch:` and 16 hex digits; the value: the next
/// sequence when it started).
const EPOCH_PREFIX: &str = "epoch:";
/// And where each ended (`epoch_end:` and its 16 hex digits; the value: the next sequence when
/// the file was next opened, which is all that run left in it).
const EPOCH_END_PREFIX: &str = "epoch_end:";

/// The epochs whose `meta` keys start with `prefix`, with their values.
fn recorded_epochs(
    meta: &redb::Table<&str, u64>,
    prefix: &str,
) -> Result<Vec<(u64, u64)>, redb::Error> {
    let mut found = Vec::new();
    for entry in meta.range(prefix..)? {
        let (key, value) = entry?;
        let Some(hex) = key.value().strip_prefix(prefix) else {
            break;
        };
        if let Ok(epoch) = u64::from_str_radix(hex, 16) {
            found.push((epoch, value.value()));
        }
    }
    Ok(found)
}

/// Records a new epoch in `db` (durably, before the store serves anything), ends the earlier
/// ones that have no end yet at `next` (what they left in the file), and reads them all.
fn start_epoch(
    db: &Database,
    next: u64,
) -> Result<(u64, std::collections::HashMap<u64, u64>), LogError> {
    let epoch = crate::log::random_id();
    let record = || -> Result<std::collections::HashMap<u64, u64>, redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        let mut epochs = std::collections::HashMap::new();
        {
            let mut meta = txn.open_table(META)?;
            let ended: std::collections::HashMap<u64, u64> =
                recorded_epochs(&meta, EPOCH_END_PREFIX)?
                    .into_iter()
                    .collect();
            for (known, _) in recorded_epochs(&meta, EPOCH_PREFIX)? {
                let end = match ended.get(&known) {
                    Some(&end) => end,
                    None => {
                        meta.insert(format!("{EPOCH_END_PREFIX}{known:016x}").as_str(), next)?;
                        next
                    }
                };
                epochs.insert(known, end);
            }
            meta.insert(format!("{EPOCH_PREFIX}{epoch:016x}").as_str(), next)?;
        }
        txn.commit()?;
        Ok(epochs)
    };
    parsing("the page that holds its epochs", record)?
        .map(|epochs| (epoch, epochs))
        .map_err(unavailable)
}

struct AppendRequest {
    records: Vec<NewRecord>,
    reply: oneshot::Sender<Result<Vec<Appended>, LogError>>,
}

fn unavailable(error: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(error.to_string())
}

impl EmbeddedLog {
    /// Opens (or creates) the store in `dir` and starts its writer. A crash-torn last
    /// transaction is discarded here by redb's recovery.
    pub fn open(dir: &Path, retention: Retention) -> Result<Self, LogError> {
        Self::open_with_cache(dir, retention, DEFAULT_CACHE_BYTES)
    }

    /// Like [`EmbeddedLog::open`], with the size of redb's page cache (memory the store may use).
    pub fn open_with_cache(
        dir: &Path,
        retention: Retention,
        cache_bytes: usize,
    ) -> Result<Self, LogError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| unavailable(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("events.redb");
        let fault = Arc::new(AtomicBool::new(false));
        // redb panics on damaged pages; each is turned into a clear error, so its own message
        // is kept quiet while the store opens (nothing else runs yet).
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = open_database(&path, cache_bytes, &fault, Access::ReadWrite).and_then(|db| {
            let bounds = read_bounds(&db).and_then(|bounds| {
                let epochs = start_epoch(&db, bounds.next)?;
                Ok((bounds, epochs))
            });
            match bounds {
                Ok((bounds, epochs)) => Ok((db, bounds, epochs)),
                Err(error) => {
                    open::close(db);
                    Err(error)
                }
            }
        });
        std::panic::set_hook(hook);
        let (db, bounds, (epoch, epochs)) = opened?;
        let StoredBounds {
            store_id,
            first,
            first_time,
            next,
            last_time,
        } = bounds;
        let shared = Arc::new(Shared {
            path,
            cache_bytes,
            db: RwLock::new(Some(Arc::new(db))),
            first: AtomicU64::new(first),
            first_time: AtomicI64::new(first_time),
            next: AtomicU64::new(next),
            last_time: AtomicI64::new(last_time),
            committed: watch::channel(next - 1).0,
            healthy: AtomicBool::new(true),
            stats: WriterStats::default(),
            fault,
            damaged_reads: AtomicU64::new(0),
            store_id,
            epoch,
            epochs,
        });
        let (requests, queue) = mpsc::channel(QUEUE);
        let writer = tokio::spawn(writer(shared.clone(), queue, retention));
        tracing::info!(path = %shared.path.display(), first, next, "embedded store open");
        Ok(Self {
            shared,
            requests,
            writer,
        })
    }

    /// Finishes queued appends and closes the file (so it can be opened again in-process).
    pub async fn close(self) {
        let Self {
            shared,
            requests,
            writer,
        } = self;
        drop(requests);
        let _ = writer.await;
        drop(shared);
    }

    /// Writer statistics (syncs, records).
    pub fn stats(&self) -> &WriterStats {
        &self.shared.stats
    }

    async fn with_db<T: Send + 'static>(
        &self,
        work: impl FnOnce(&Database) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T, LogError> {
        let db = self.shared.database()?;
        match tokio::task::spawn_blocking(move || work(&db)).await {
            Ok(result) => result.map_err(unavailable),
            // redb panics on some damage (a page that does not parse): the file is damaged, not
            // unavailable, and retrying will not help. The caller says from where.
            Err(join) if join.is_panic() => {
                self.shared.damaged_reads.fetch_add(1, Ordering::Relaxed);
                Err(LogError::Damaged {
                    from: 0,
                    detail: panic_text(join.into_panic()),
                })
            }
            Err(join) => Err(unavailable(join)),
        }
    }
}

impl Shared {
    fn database(&self) -> Result<Arc<Database>, LogError> {
        let db = self
            .db
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        db.ok_or_else(|| LogError::Unavailable("the embedded store is being reopened".into()))
    }
}

/// What the file says of the log's range.
struct StoredBounds {
    /// The file's random id.
    store_id: u64,
    first: u64,
    /// The received time of the oldest record (`i64::MAX` when empty).
    first_time: i64,
    next: u64,
    /// The received time of the newest record (0 when empty).
    last_time: i64,
}

/// The bounds as stored: read at open and after every reopen (a commit reported as failed may
/// have reached the disk all the same).
/// `Some(next sequence)` when retention has emptied the store past `from` (nothing is left, and
/// `from` is below the next sequence): seen in the reading transaction itself, so that a read
/// racing a sweep reports the truncation instead of an end of the log (a subscriber from the
/// beginning then moves on to the oldest event, instead of failing later with OUT_OF_RANGE).
fn emptied_past(
    txn: &redb::ReadTransaction,
    events: &redb::ReadOnlyTable<u64, &[u8]>,
    from: u64,
) -> Result<Option<u64>, redb::Error> {
    if events.first()?.is_some() {
        return Ok(None);
    }
    let meta = txn.open_table(META)?;
    let next = meta.get(NEXT)?.map_or(1, |v| v.value());
    Ok((from < next).then_some(next))
}

fn read_bounds(db: &Database) -> Result<StoredBounds, LogError> {
    let read = || -> Result<Result<StoredBounds, String>, redb::Error> {
        let txn = db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let meta = txn.open_table(META)?;
        let last = events.last()?;
        let last_time = last.as_ref().map_or(0, |(_, v)| header(v.value()).0);
        let last = last.map(|(k, _)| k.value());
        let recorded = meta.get(NEXT)?.map(|v| v.value());
        let next = recorded
            .unwrap_or(1)
            .max(last.map_or(1, |l| l.saturating_add(1)));
        let oldest = events.first()?;
        let first = oldest.as_ref().map_or(next, |(k, _)| k.value());
        // What a whole index cannot say: its first record after its last, or a last record
        // that is not the one before the next sequence the store recorded (every commit records
        // it; retention only ever removes the oldest). A damaged key or entry count says so.
        if let (Some(last), Some(recorded)) = (last, recorded) {
            if first > last || last.checked_add(1) != Some(recorded) {
                return Ok(Err(format!(
                    "its index is damaged: its records run from sequence {first} to {last}, \
                     and the next sequence it recorded is {recorded}"
                )));
            }
        }
        let first_time = oldest.map_or(i64::MAX, |(_, v)| header(v.value()).0);
        let store_id = meta.get(open::STORE_ID_KEY)?.map_or(0, |v| v.value());
        Ok(Ok(StoredBounds {
            store_id,
            first,
            first_time,
            next,
            last_time,
        }))
    };
    // redb panics on a damaged page; say so instead of crashing the gateway at start.
    parsing("the pages that hold its first and last records", read)?
        .map_err(unavailable)?
        .map_err(|detail| LogError::Damaged { from: 0, detail })
}

/// Checks that the records' keys are in order and below `next` (an index whose pages parse may
/// still hold a damaged key: redb finds records by keys it takes to be in order). Reads every
/// key once; stops at a page that does not parse (the scan reports its records).
fn check_order(db: &Database, next: u64) -> Result<(), LogError> {
    let walk = || -> Result<Option<String>, redb::Error> {
        let txn = db.begin_read()?;
        let events = txn.open_table(EVENTS)?;
        let mut previous: Option<u64> = None;
        for entry in events.iter()? {
            let key = entry?.0.value();
            if previous.is_some_and(|previous| key <= previous) || key >= next {
                return Ok(Some(format!(
                    "its index is damaged: sequence {key} comes after {} (the next sequence is \
                     {next})",
                    previous.map_or("the start".into(), |p| p.to_string())
                )));
            }
            previous = Some(key);
        }
        Ok(None)
    };
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(walk)) {
        Ok(Ok(Some(detail))) => Err(LogError::Damaged { from: 0, detail }),
        _ => Ok(()),
    }
}

#[async_trait]
impl EventLog for EmbeddedLog {
    async fn append(&self, records: Vec<NewRecord>) -> Vec<Result<Appended, LogError>> {
        let count = records.len();
        let (reply, answer) = oneshot::channel();
        let all = match self.requests.send(AppendRequest { records, reply }).await {
            Ok(()) => answer.await.unwrap_or(Err(LogError::Closed)),
            Err(_) => Err(LogError::Closed),
        };
        super::all_or_none(all, count)
    }

    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Record>, LogError> {
        let first = self.shared.first.load(Ordering::Acquire);
        if from < first {
            return Err(LogError::Truncated {
                requested: from,
                oldest: first,
            });
        }
        let records = self
            .with_db(move |db| {
                let txn = db.begin_read()?;
                let events = txn.open_table(EVENTS)?;
                let mut records = Vec::new();
                for entry in events.range(from..)?.take(limit) {
                    let (key, value) = entry?;
                    records.push(decode_record(key.value(), value.value()));
                }
                let emptied = if records.is_empty() {
                    emptied_past(&txn, &events, from)?
                } else {
                    None
                };
                Ok((records, emptied))
            })
            .await
            .map_err(|error| match error {
                LogError::Damaged { detail, .. } => {
                    tracing::error!(
                        sequence = from,
                        %detail,
                        "the embedded store is damaged: records from this sequence cannot be read"
                    );
                    LogError::Damaged { from, detail }
                }
                other => other,
            })?;
        let (records, emptied) = records;
        // Retention may have run between the check and the read.
        match records.first().map(|record| record.sequence).or(emptied) {
            Some(oldest) if oldest != from => Err(LogError::Truncated {
                requested: from,
                oldest,
            }),
            _ => Ok(records),
        }
    }

    async fn scan(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
        wanted: super::Wanted,
    ) -> Result<super::Scanned, LogError> {
        let first = self.shared.first.load(Ordering::Acquire);
        if from < first {
            return Err(LogError::Truncated {
                requested: from,
                oldest: first,
            });
        }
        // Records the filter refuses are looked at in place (redb's page), never copied.
        let (scanned, looked_first) = self
            .with_db(move |db| {
                let txn = db.begin_read()?;
                let events = txn.open_table(EVENTS)?;
                let mut scanned = super::Scanned {
                    records: Vec::new(),
                    next: from,
                };
                let mut looked_first = None;
                let mut bytes = 0usize;
                for entry in events.range(from..)?.take(limit) {
                    let (key, value) = entry?;
                    let (sequence, value) = (key.value(), value.value());
                    looked_first.get_or_insert(sequence);
                    let (received_at_ms, _) = header(value);
                    let payload = value.get(HEADER..).unwrap_or_default();
                    if let Some(held) = wanted(sequence, received_at_ms, payload) {
                        if !scanned.records.is_empty() && bytes + held > max_bytes {
                            break;
                        }
                        bytes += held;
                        scanned.records.push(decode_record(sequence, value));
                    }
                    scanned.next = sequence + 1;
                }
                if looked_first.is_none() {
                    looked_first = emptied_past(&txn, &events, from)?;
                }
                Ok((scanned, looked_first))
            })
            .await
            .map_err(|error| match error {
                LogError::Damaged { detail, .. } => LogError::Damaged { from, detail },
                other => other,
            })?;
        // Retention may have run between the check and the read.
        match looked_first {
            Some(sequence) if sequence != from => Err(LogError::Truncated {
                requested: from,
                oldest: sequence,
            }),
            _ => Ok(scanned),
        }
    }

    async fn find_event(&self, event_id: i64) -> Result<Option<u64>, LogError> {
        self.with_db(move |db| {
            let txn = db.begin_read()?;
            let ids = txn.open_table(IDS)?;
            Ok(ids.get(event_id)?.map(|v| v.value()))
        })
        .await
    }

    async fn seek_time(&self, at_ms: i64) -> Result<u64, LogError> {
        // Received times are non-decreasing in sequence order (the writer keeps them so).
        let Bounds { first, next } = self.bounds();
        self.with_db(move |db| {
            let txn = db.begin_read()?;
            let events = txn.open_table(EVENTS)?;
            let (mut low, mut high) = (first, next);
            while low < high {
                let mid = low + (high - low) / 2;
                let time = events
                    .range(mid..)?
                    .next()
                    .transpose()?
                    .map(|(_, v)| header(v.value()).0);
                match time {
                    Some(time) if time < at_ms => low = mid + 1,
                    _ => high = mid,
                }
            }
            Ok(low)
        })
        .await
    }

    fn bounds(&self) -> Bounds {
        Bounds {
            first: self.shared.first.load(Ordering::Acquire),
            next: self.shared.next.load(Ordering::Acquire),
        }
    }

    fn committed(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    fn identity(&self) -> String {
        format!(
            "embedded:{:016x}.{:016x}",
            self.shared.store_id, self.shared.epoch
        )
    }

    fn holds_cursors_of(&self, identity: &str, after: Option<u64>) -> bool {
        let Some((id, epoch)) = identity
            .strip_prefix("embedded:")
            .and_then(|rest| rest.split_once('.'))
        else {
            return false;
        };
        if id.len() != 16 || epoch.len() != 16 {
            return false;
        }
        if u64::from_str_radix(id, 16) != Ok(self.shared.store_id) {
            return false;
        }
        let Ok(epoch) = u64::from_str_radix(epoch, 16) else {
            return false;
        };
        if epoch == self.shared.epoch {
            return true;
        }
        // An earlier run of this file: what it received is what it left here.
        self.shared
            .epochs
            .get(&epoch)
            .is_some_and(|&end| after.is_none_or(|after| after < end))
    }

    fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire)
    }

    fn stats(&self) -> LogStats {
        LogStats {
            syncs: self.shared.stats.syncs.load(Ordering::Relaxed),
            synced_records: self.shared.stats.records.load(Ordering::Relaxed),
            size_bytes: std::fs::metadata(&self.shared.path)
                .map(|m| m.len())
                .unwrap_or(0),
            damaged_reads: self.shared.damaged_reads.load(Ordering::Relaxed),
            cache_bytes: 0,
        }
    }
}

/// The message of a caught panic.
/// Runs `work`, which reads pages of the file: a page that does not parse (redb panics on it) is
/// [`LogError::Damaged`], saying that `what` does not parse.
fn parsing<T>(what: &str, work: impl FnOnce() -> T) -> Result<T, LogError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).map_err(|panic| {
        LogError::Damaged {
            from: 0,
            detail: format!("{what} does not parse: {}", panic_text(panic)),
        }
    })
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a page does not parse".to_owned())
}

fn header(value: &[u8]) -> (i64, i64) {
    let mut time = [0u8; 8];
    let mut id = [0u8; 8];
    if value.len() >= HEADER {
        time.copy_from_slice(&value[..8]);
        id.copy_from_slice(&value[8..16]);
    }
    (i64::from_be_bytes(time), i64::from_be_bytes(id))
}

fn decode_record(sequence: u64, value: &[u8]) -> Record {
    let (received_at_ms, _) = header(value);
    Record {
        sequence,
        received_at_ms,
        payload: Bytes::copy_from_slice(value.get(HEADER..).unwrap_or_default()),
    }
}

/// The writer: groups waiting requests into one transaction, commits (fsync), answers, publishes
/// the new committed sequence. After a failure it reports unhealthy, answers 503 (the requests
/// are not acknowledged) and probes the disk until a commit succeeds again.
async fn writer(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<AppendRequest>,
    retention: Retention,
) {
    let mut sweep = tokio::time::interval(RETENTION_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = if shared.healthy.load(Ordering::Acquire) {
            tokio::select! {
                request = queue.recv() => request,
                _ = sweep.tick(), if retention.max_age.is_some() => {
                    expire(&shared, &retention).await;
                    continue;
                }
            }
        } else {
            match tokio::time::timeout(Duration::from_secs(1), queue.recv()).await {
                Ok(request) => request,
                Err(_) => {
                    probe(&shared).await;
                    continue;
                }
            }
        };
        let Some(first) = first else { return };
        let mut group = vec![first];
        let mut count = group[0].records.len();
        while count < MAX_GROUP {
            match queue.try_recv() {
                Ok(request) => {
                    count += request.records.len();
                    group.push(request);
                }
                Err(_) => break,
            }
        }
        let batches: Vec<Vec<NewRecord>> = group
            .iter_mut()
            .map(|r| std::mem::take(&mut r.records))
            .collect();
        let db = match shared.database() {
            Ok(db) => db,
            Err(error) => {
                fail(&shared, group, &error).await;
                continue;
            }
        };
        let next = shared.next.load(Ordering::Acquire);
        let last_time = shared.last_time.load(Ordering::Acquire);
        let retention = retention.clone();
        let outcome =
            tokio::task::spawn_blocking(move || commit(&db, next, last_time, batches, &retention))
                .await;
        let outcome = match outcome {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(error)) => {
                fail(&shared, group, &error).await;
                continue;
            }
            Err(join) => {
                fail(&shared, group, &unavailable(join)).await;
                continue;
            }
        };
        shared.last_time.store(outcome.last_time, Ordering::Release);
        shared.first.store(outcome.first, Ordering::Release);
        shared
            .first_time
            .store(outcome.first_time, Ordering::Release);
        shared.next.store(outcome.next, Ordering::Release);
        shared.stats.syncs.fetch_add(1, Ordering::Relaxed);
        shared
            .stats
            .records
            .fetch_add(count as u64, Ordering::Relaxed);
        if !shared.healthy.swap(true, Ordering::AcqRel) {
            tracing::info!("embedded store writable again");
        }
        tracing::debug!(
            records = count,
            requests = group.len(),
            "group commit synced"
        );
        shared.committed.send_replace(outcome.next - 1);
        for (request, results) in group.into_iter().zip(outcome.results) {
            // The requester may have gone (client disconnected); the event is stored anyway.
            let _ = request.reply.send(Ok(results));
        }
    }
}

/// Removes expired records in a transaction of their own, when the oldest one has expired (on a
/// quiet gateway no append would remove them). A failure is handled like a failed append.
async fn expire(shared: &Shared, retention: &Retention) {
    let expired = retention
        .oldest_allowed_ms()
        .is_some_and(|oldest| shared.first_time.load(Ordering::Acquire) < oldest);
    if !expired {
        return;
    }
    let db = match shared.database() {
        Ok(db) => db,
        Err(error) => return fail(shared, Vec::new(), &error).await,
    };
    let next = shared.next.load(Ordering::Acquire);
    let last_time = shared.last_time.load(Ordering::Acquire);
    let retention = retention.clone();
    let outcome =
        tokio::task::spawn_blocking(move || commit(&db, next, last_time, Vec::new(), &retention))
            .await
            .map_err(unavailable)
            .and_then(|outcome| outcome);
    match outcome {
        Ok(outcome) => {
            let before = shared.first.swap(outcome.first, Ordering::AcqRel);
            shared
                .first_time
                .store(outcome.first_time, Ordering::Release);
            tracing::debug!(
                removed = outcome.first.saturating_sub(before),
                first = outcome.first,
                "retention removed expired events"
            );
        }
        Err(error) => fail(shared, Vec::new(), &error).await,
    }
}

async fn fail(shared: &Shared, group: Vec<AppendRequest>, error: &LogError) {
    if shared.healthy.swap(false, Ordering::AcqRel) {
        tracing::error!(%error, "embedded store write failed; answering 503 until it recovers");
    }
    for request in group {
        let _ = request.reply.send(Err(error.clone()));
    }
    reopen(shared).await;
}

/// After an I/O error redb refuses further writes on that handle; open the file afresh. redb
/// allows one open handle per file, so ours is dropped first; if a reader still holds it, the
/// next probe tries again.
async fn reopen(shared: &Shared) {
    let old = shared.db.write().unwrap_or_else(|p| p.into_inner()).take();
    drop(old);
    let (path, cache_bytes, fault) = (
        shared.path.clone(),
        shared.cache_bytes,
        shared.fault.clone(),
    );
    let opened = tokio::task::spawn_blocking(move || {
        let db = open_database(&path, cache_bytes, &fault, Access::ReadWrite)?;
        let bounds = read_bounds(&db)?;
        Ok::<_, LogError>((db, bounds))
    })
    .await;
    match opened {
        Ok(Ok((db, bounds))) => {
            // A commit reported as failed may have reached the disk: take the bounds from the
            // file, so the next commit never overwrites its sequences (and a retry of its event
            // id is answered as the duplicate it is).
            let before = shared.next.load(Ordering::Acquire);
            shared.first.store(bounds.first, Ordering::Release);
            shared
                .first_time
                .store(bounds.first_time, Ordering::Release);
            shared.next.store(bounds.next, Ordering::Release);
            shared
                .last_time
                .fetch_max(bounds.last_time, Ordering::AcqRel);
            if bounds.next != before {
                tracing::warn!(
                    next = bounds.next,
                    expected = before,
                    "the embedded store holds records from a commit reported as failed"
                );
                shared.committed.send_replace(bounds.next - 1);
            }
            *shared.db.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(db));
        }
        Ok(Err(error)) => tracing::warn!(%error, "cannot reopen the embedded store yet"),
        Err(error) => tracing::warn!(%error, "cannot reopen the embedded store yet"),
    }
}

/// One stored sequence as the offline scan found it.
#[derive(Debug)]
pub enum Scanned {
    /// Readable, with its payload.
    Record(Record),
    /// Within the retained range but unreadable (or missing): why.
    Unreadable(String),
}

/// Why `path` is not a store file to read (`None` when it is a regular file, or a link to one):
/// what it is instead, in words.
fn not_a_file(path: &Path) -> Option<String> {
    fn kind(file_type: std::fs::FileType) -> &'static str {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_dir() {
            "a directory"
        } else if file_type.is_fifo() {
            "a named pipe (FIFO)"
        } else if file_type.is_socket() {
            "a socket"
        } else if file_type.is_char_device() {
            "a character device"
        } else if file_type.is_block_device() {
            "a block device"
        } else {
            "not a regular file"
        }
    }
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Some("does not exist".to_owned())
        }
        Err(error) => return Some(format!("cannot be looked at: {error}")),
    };
    if meta.is_file() {
        return None;
    }
    if !meta.file_type().is_symlink() {
        return Some(format!("is {}, not a store file", kind(meta.file_type())));
    }
    let target = std::fs::read_link(path)
        .map(|target| target.display().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    match std::fs::metadata(path) {
        Ok(followed) if followed.is_file() => None,
        Ok(followed) => Some(format!(
            "is a link to {target}, which is {}, not a store file",
            kind(followed.file_type())
        )),
        Err(error) => Some(format!(
            "is a link to {target}, which cannot be read: {error}"
        )),
    }
}

/// Reads every retained record of the store in `dir`, one at a time, for `verify` and `export`:
/// a damaged page costs the records on it, not the scan. The gateway must not be running on it
/// (redb allows one process per file). The file is never changed (neither repaired nor
/// upgraded), and one of a newer format is refused. Returns the retained range `first..next`.
pub fn scan(
    dir: &Path,
    mut visit: impl FnMut(u64, Scanned) -> Result<(), LogError>,
) -> Result<Bounds, LogError> {
    let path = dir.join("events.redb");
    if let Some(what) = not_a_file(&path) {
        return Err(unavailable(format!("{} {what}", path.display())));
    }
    // Quiet the default panic message while redb trips over damaged pages; each is reported.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = open_database(
        &path,
        DEFAULT_CACHE_BYTES,
        &Arc::new(AtomicBool::new(false)),
        Access::ReadOnly,
    );
    let db = match opened {
        Ok(db) => db,
        Err(error) => {
            std::panic::set_hook(hook);
            return Err(error);
        }
    };
    let scanned = scan_open(&db, &mut visit);
    open::close(db);
    std::panic::set_hook(hook);
    scanned
}

/// [`scan`] over the opened database.
fn scan_open(
    db: &Database,
    visit: &mut impl FnMut(u64, Scanned) -> Result<(), LogError>,
) -> Result<Bounds, LogError> {
    // Pages of the first and last records that do not parse, or a damaged index: the scan
    // would miss or invent records; `export` salvages the records by their checksums instead.
    let StoredBounds { first, next, .. } = read_bounds(db)?;
    check_order(db, next)?;
    let mut outcome = Ok(());
    for sequence in first..next {
        let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(
            || -> Result<Option<Record>, redb::Error> {
                let txn = db.begin_read()?;
                let events = txn.open_table(EVENTS)?;
                let value = events.get(sequence)?;
                Ok(value.map(|v| decode_record(sequence, v.value())))
            },
        ));
        let scanned = match read {
            Ok(Ok(Some(record))) => Scanned::Record(record),
            Ok(Ok(None)) => Scanned::Unreadable("missing".to_owned()),
            Ok(Err(error)) => Scanned::Unreadable(error.to_string()),
            Err(panic) => Scanned::Unreadable(panic_text(panic)),
        };
        if let Err(error) = visit(sequence, scanned) {
            outcome = Err(error);
            break;
        }
    }
    outcome.map(|()| Bounds { first, next })
}

#[cfg(test)]
impl EmbeddedLog {
    /// Makes the next sync reach the disk and then report an error.
    fn fail_next_sync_after_writing(&self) {
        self.shared.fault.store(true, Ordering::Release);
    }
}

/// Tries a small durable write; on success the store is healthy again.
async fn probe(shared: &Shared) {
    let Ok(db) = shared.database() else {
        reopen(shared).await;
        return;
    };
    let next = shared.next.load(Ordering::Acquire);
    let result = tokio::task::spawn_blocking(move || -> Result<(), redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        txn.open_table(META)?.insert(NEXT, next)?;
        txn.commit()?;
        Ok(())
    })
    .await;
    match result {
        Ok(Ok(())) => {
            shared.healthy.store(true, Ordering::Release);
            tracing::info!("embedded store writable again");
        }
        _ => reopen(shared).await,
    }
}

struct CommitOutcome {
    results: Vec<Vec<Appended>>,
    first: u64,
    /// The received time of the oldest record left (`i64::MAX` when empty).
    first_time: i64,
    next: u64,
    last_time: i64,
}

fn commit(
    db: &Database,
    mut next: u64,
    mut last_time: i64,
    batches: Vec<Vec<NewRecord>>,
    retention: &Retention,
) -> Result<CommitOutcome, LogError> {
    let run = || -> Result<CommitOutcome, redb::Error> {
        let mut txn = db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        let mut results = Vec::with_capacity(batches.len());
        let mut bytes = txn
            .open_table(META)?
            .get(BYTES)?
            .map(|v| v.value())
            .unwrap_or(0);
        {
            let mut events = txn.open_table(EVENTS)?;
            let mut ids = txn.open_table(IDS)?;
            let mut value = Vec::new();
            for batch in batches {
                let mut batch_results = Vec::with_capacity(batch.len());
                for record in batch {
                    let mut found = match record.event_id {
                        Some(id) => ids.get(id)?.map(|v| v.value()),
                        None => None,
                    };
                    // An entry whose event is no longer stored under it is stale (retention
                    // could not clear it: the record's id was damaged): the event is new again.
                    if let (Some(sequence), Some(id)) = (found, record.event_id) {
                        let stored = events.get(sequence)?;
                        if stored.is_none_or(|value| header(value.value()).1 != id) {
                            found = None;
                        }
                    }
                    if let Some(sequence) = found {
                        batch_results.push(Appended {
                            sequence,
                            duplicate: true,
                        });
                        continue;
                    }
                    // Keep received times non-decreasing in sequence order, for seek_time.
                    last_time = last_time.max(record.received_at_ms);
                    value.clear();
                    value.extend_from_slice(&last_time.to_be_bytes());
                    // 0 for an event without a deduplication key: no `ids` entry has it.
                    value.extend_from_slice(&record.event_id.unwrap_or(0).to_be_bytes());
                    value.extend_from_slice(&record.payload);
                    events.insert(next, value.as_slice())?;
                    bytes = bytes.saturating_add(value.len() as u64);
                    if let Some(id) = record.event_id {
                        ids.insert(id, next)?;
                    }
                    batch_results.push(Appended {
                        sequence: next,
                        duplicate: false,
                    });
                    next += 1;
                }
                results.push(batch_results);
            }
            bytes = apply_retention(&mut events, &mut ids, retention, bytes)?;
        }
        let mut meta = txn.open_table(META)?;
        meta.insert(NEXT, next)?;
        meta.insert(BYTES, bytes)?;
        drop(meta);
        let (first, first_time) = txn
            .open_table(EVENTS)?
            .first()?
            .map_or((next, i64::MAX), |(k, v)| (k.value(), header(v.value()).0));
        txn.commit()?;
        Ok(CommitOutcome {
            results,
            first,
            first_time,
            next,
            last_time,
        })
    };
    run().map_err(unavailable)
}

/// Removes the oldest events while any limit is exceeded; returns the remaining byte total.
fn apply_retention(
    events: &mut redb::Table<u64, &[u8]>,
    ids: &mut redb::Table<i64, u64>,
    retention: &Retention,
    mut bytes: u64,
) -> Result<u64, redb::Error> {
    if !retention.limits() {
        return Ok(bytes);
    }
    let oldest_allowed = retention.oldest_allowed_ms();
    let mut count = events.len()?;
    loop {
        let (sequence, time, id, size) = match events.first()? {
            Some((key, value)) => {
                let value = value.value();
                let (time, id) = header(value);
                (key.value(), time, id, value.len() as u64)
            }
            None => break,
        };
        let too_many = retention.max_events.is_some_and(|max| count > max);
        let too_old = oldest_allowed.is_some_and(|oldest| time < oldest);
        let too_big = retention.max_bytes.is_some_and(|max| bytes > max);
        if !(too_many || too_old || too_big) {
            break;
        }
        events.pop_first()?;
        // Only its own entry: a damaged id must not take another event's dedup with it.
        if ids.get(id)?.is_some_and(|entry| entry.value() == sequence) {
            ids.remove(id)?;
        }
        count -= 1;
        bytes = bytes.saturating_sub(size);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests;
