//! The event log seam: where events get their sequence and become durable.
//!
//! The log stores opaque payloads under strictly increasing sequences (from 1, no gaps), with the
//! time each was received and a deduplication key (`ChatEvent.Id`). Implementations:
//! [`memory::MemoryLog`] (tests, benchmarks) and the durable stores. Handlers see only
//! [`EventLog`]; a store plugs in by implementing it.

pub mod embedded;
pub mod jetstream;
pub mod memory;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

/// How often a store with retention by age looks for expired events, so that they go on a quiet
/// gateway too, not only when a new event is written (JetStream expires them itself).
pub const RETENTION_SWEEP: Duration = Duration::from_secs(1);

/// What a store keeps; every limit is optional and all set ones apply. The embedded and memory
/// stores apply all three (the oldest events go first); JetStream only the age (its stream's
/// `max_age`).
#[derive(Debug, Clone, Default)]
pub struct Retention {
    /// Keep at most this many events.
    pub max_events: Option<u64>,
    /// Keep events received within this age (by the gateway's receive time).
    pub max_age: Option<Duration>,
    /// Keep at most this many bytes of stored events.
    pub max_bytes: Option<u64>,
}

impl Retention {
    /// Whether any limit is set.
    pub fn limits(&self) -> bool {
        self.max_events.is_some() || self.max_age.is_some() || self.max_bytes.is_some()
    }

    /// The receive time (ms since the Unix epoch) below which an event has expired now, when
    /// retention is by age.
    pub fn oldest_allowed_ms(&self) -> Option<i64> {
        self.max_age.map(|age| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            now.saturating_sub(age.as_millis().min(i64::MAX as u128) as i64)
        })
    }
}

/// One event to append.
#[derive(Debug, Clone)]
pub struct NewRecord {
    /// Deduplication key: the same id is stored once. `None` for an event that is never
    /// deduplicated (a transitive one, such as typing: it has no id).
    pub event_id: Option<i64>,
    /// When the gateway received it, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Opaque bytes ([`crate::wire::StoredEvent`]).
    pub payload: Bytes,
}

/// The result of appending one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Appended {
    /// The record's sequence; for a duplicate, the sequence of the record stored first.
    pub sequence: u64,
    /// True when a record with the same `event_id` was already stored.
    pub duplicate: bool,
}

/// One stored record.
#[derive(Debug, Clone)]
pub struct Record {
    /// Position in the log.
    pub sequence: u64,
    /// When the gateway received it, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The payload as appended.
    pub payload: Bytes,
}

/// The retained range of sequences: `first..next` (empty when equal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// The oldest retained sequence.
    pub first: u64,
    /// The sequence the next appended record will get.
    pub next: u64,
}

/// Counters a store keeps about itself, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogStats {
    /// Durable commits (fsyncs, JetStream acks) since start.
    pub syncs: u64,
    /// Records made durable by those commits.
    pub synced_records: u64,
    /// Size of the stored events, bytes (0 when unknown).
    pub size_bytes: u64,
    /// Reads that found the store damaged (see [`LogError::Damaged`]).
    pub damaged_reads: u64,
    /// Bytes of records the store keeps in memory for readers (the JetStream tail cache).
    pub cache_bytes: u64,
}

/// Why the log could not do what was asked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    /// The requested sequence was removed (by retention; on JetStream also by hand).
    #[error(
        "sequence {requested} is no longer retained; the oldest retained sequence after it is \
         {oldest}"
    )]
    Truncated {
        /// What was asked for.
        requested: u64,
        /// The oldest sequence still stored after `requested`, where reading can go on: with
        /// retention, the oldest of all. Always greater than `requested`.
        oldest: u64,
    },
    /// The storage failed (disk, network) before the record reached it: it is not stored.
    /// Callers answer "retry".
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// Whether the record was stored is not known: it was sent to the store, whose answer never
    /// came (NATS went away, or its acknowledgement timed out). It may be stored. Callers answer
    /// "retry" with `"outcome": "unknown"`: sent again, an event with an id (or an idempotency
    /// key) is stored once; a transitive event without a key may be stored twice.
    #[error("the outcome is unknown, the event may have been stored: {0}")]
    Unknown(String),
    /// The log is closed (the gateway is shutting down).
    #[error("the event log is closed")]
    Closed,
    /// Stored records cannot be read: the store is damaged. Retrying will not help.
    #[error(
        "the store is damaged{}: {detail}; with the gateway stopped, `iqchannels-gateway verify` \
         shows the damage and `export` writes what can be read, to rebuild the store",
        if *from > 0 { format!(" from sequence {from}") } else { String::new() }
    )]
    Damaged {
        /// The first sequence of the read that failed.
        from: u64,
        /// What failed.
        detail: String,
    },
    /// The store cannot be used as configured (a file named by a flag is missing, the store
    /// refuses the gateway's credentials or TLS): found at start; retrying will not help.
    #[error("{0}")]
    Misconfigured(String),
    /// The event cannot be stored whole: its record is over what the store takes (NATS
    /// `max_payload`), or its typed form over `--max-event-bytes` however it is cut. Refused
    /// (413); sending it again cannot help until the limit the message names is raised.
    #[error("{0}")]
    TooLarge(String),
    /// The store was written by a newer release, in a format this build does not know; it is
    /// left untouched.
    #[error(
        "{path} is in store format {found}, written by a newer release of the gateway; this \
         release reads formats up to {supported}: run the newer release (or restore a backup \
         made before the upgrade)"
    )]
    NewerFormat {
        /// The store's file.
        path: String,
        /// The format it has.
        found: u64,
        /// The newest format this build reads.
        supported: u64,
    },
}

/// The seam between ingest/subscribe and storage.
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends records in order, storing each `event_id` once (also within the batch; a record
    /// without one is always stored). Returns one result per record, in the order of `records`,
    /// only once the stored records are durable. The embedded and memory stores store all or
    /// none (one transaction); JetStream stores each record on its own, so some may be stored and
    /// others not (a record with an error was not acknowledged: the sender retries it).
    async fn append(&self, records: Vec<NewRecord>) -> Vec<Result<Appended, LogError>>;

    /// [`EventLog::append`] for callers that need every record stored (tests, tools): the
    /// results, or the first error (on JetStream, records before it may be stored).
    async fn append_all(&self, records: Vec<NewRecord>) -> Result<Vec<Appended>, LogError> {
        self.append(records).await.into_iter().collect()
    }

    /// Up to `limit` records from `from` on, consecutive: the first is `from` itself, and a page
    /// ends before any sequence that is missing. Empty at the end of the log. The one exception:
    /// a hole the store knows holds no loss (on JetStream, transitive events removed by their
    /// own retention) is passed over, and the page starts at the record after it.
    /// [`LogError::Truncated`] when `from` is no longer stored (older than the oldest retained
    /// record, or removed); never a later record in its place.
    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Record>, LogError>;

    /// A catch-up read: the records from `from` on that `wanted` accepts, looking at up to
    /// `limit` records and taking whole records while their payloads total at most `max_bytes`
    /// (always the first wanted one, whatever its size). `wanted` sees a record's sequence,
    /// received time and payload before it is copied, so a store can skip the records a filter
    /// refuses without copying them. The answer's `next` is the sequence to look at next: past
    /// the last record looked at (== `from` at the end of the log). Consecutive from `from`
    /// like [`EventLog::read`], and [`LogError::Truncated`] when `from` is gone.
    async fn scan(
        &self,
        from: u64,
        limit: usize,
        max_bytes: usize,
        wanted: Wanted,
    ) -> Result<Scanned, LogError> {
        // Read in chunks sized by the largest record seen, so that a page of large records is
        // never read whole only to be cut (the first chunk is one record).
        let mut scanned = Scanned {
            records: Vec::new(),
            next: from,
        };
        let (mut looked, mut bytes, mut largest) = (0usize, 0usize, 0usize);
        while looked < limit {
            let chunk = max_bytes
                .saturating_sub(bytes)
                .checked_div(largest)
                .map_or(1, |fit| fit.clamp(1, SCAN_CHUNK))
                .min(limit - looked);
            let records = match self.read(scanned.next, chunk).await {
                // Removed since the first chunk: the next scan says so.
                Err(LogError::Truncated { .. }) if looked > 0 => break,
                records => records?,
            };
            if records.is_empty() {
                break;
            }
            looked += records.len();
            for record in records {
                let held = wanted(record.sequence, record.received_at_ms, &record.payload);
                largest = largest.max(held.unwrap_or(record.payload.len()).max(1));
                if let Some(held) = held {
                    if !scanned.records.is_empty() && bytes + held > max_bytes {
                        return Ok(scanned);
                    }
                    bytes += held;
                    scanned.next = record.sequence + 1;
                    scanned.records.push(record);
                } else {
                    scanned.next = record.sequence + 1;
                }
            }
        }
        Ok(scanned)
    }

    /// The sequence under which `event_id` is stored.
    async fn find_event(&self, event_id: i64) -> Result<Option<u64>, LogError>;

    /// The first retained sequence received at or after `at_ms` (`next` if none).
    async fn seek_time(&self, at_ms: i64) -> Result<u64, LogError>;

    /// The retained range now.
    fn bounds(&self) -> Bounds;

    /// The highest durable sequence (0 when empty), updated after every append.
    fn committed(&self) -> watch::Receiver<u64>;

    /// The largest payload the store takes now, and how to raise it (`None`: no limit below the
    /// memory's). A record over it is refused at ingest ([`LogError::TooLarge`]).
    fn max_payload(&self) -> Option<PayloadLimit> {
        None
    }

    /// The store's counters.
    fn stats(&self) -> LogStats {
        LogStats::default()
    }

    /// Whether the log can take appends now (for readiness).
    fn healthy(&self) -> bool {
        true
    }

    /// What this store is, for the life of its events: the embedded file's random id (made when
    /// the file is created), the JetStream stream's name and creation time. A cursor (a
    /// sequence) means something only in the store it came from: a subscriber sends the identity
    /// back when it resumes, and a cursor from another store (a restored backup, a recreated
    /// stream) is refused.
    fn identity(&self) -> String;

    /// Whether a cursor (`after`, the last sequence a client received; `None` for a start that
    /// names none) learnt under `identity` belongs to this store's history: the identity of
    /// this store now, or of an earlier run of it that got that far.
    fn holds_cursors_of(&self, identity: &str, after: Option<u64>) -> bool {
        let _ = after;
        identity == self.identity()
    }

    /// Set (once) when the store under the gateway was replaced (a JetStream stream deleted and
    /// created again): every cursor, cache and bound the gateway holds is void. The gateway
    /// stops serving and exits, so that it starts again on the new store (`main`).
    fn replaced(&self) -> watch::Receiver<Option<String>> {
        watch::channel(None).1
    }
}

/// A random 64-bit number for a store's identity (not a secret: only different from every other
/// store's).
pub fn random_id() -> u64 {
    use sha2::{Digest as _, Sha256};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let digest = Sha256::new()
        .chain_update(nuid::next().as_bytes())
        .chain_update(nanos.to_le_bytes())
        .chain_update(std::process::id().to_le_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_le_bytes(first)
}

/// The largest payload a store takes, and what raises it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayloadLimit {
    /// Bytes of payload at most.
    pub bytes: usize,
    /// What refusing a larger one says: the limit, and the setting that raises it.
    pub advice: String,
}

/// Records read at once by the default [`EventLog::scan`], at most.
const SCAN_CHUNK: usize = 64;

/// What a catch-up read wants of a record `(sequence, received_at_ms, payload)`: `None` to pass
/// over it, or the bytes it will hold once read back (the reader knows the record's format: a
/// compressed record holds more than its stored length), which [`EventLog::scan`] counts.
pub type Wanted = Arc<dyn Fn(u64, i64, &[u8]) -> Option<usize> + Send + Sync>;

/// The answer of [`EventLog::scan`].
#[derive(Debug, Default)]
pub struct Scanned {
    /// The wanted records, in sequence order.
    pub records: Vec<Record>,
    /// The sequence to look at next.
    pub next: u64,
}

/// A shared log.
pub type SharedLog = Arc<dyn EventLog>;

/// The per-record results of a store that stores all records of an append or none.
fn all_or_none(
    result: Result<Vec<Appended>, LogError>,
    count: usize,
) -> Vec<Result<Appended, LogError>> {
    match result {
        Ok(appended) => appended.into_iter().map(Ok).collect(),
        Err(error) => vec![Err(error); count],
    }
}
