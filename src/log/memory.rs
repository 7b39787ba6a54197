//! An in-memory [`EventLog`]: nothing survives a restart. For tests and benchmarks
//! (`--store memory`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Appended, Bounds, EventLog, LogError, NewRecord, Record, Retention, RETENTION_SWEEP};

/// Records in a deque, ids in a map; one mutex, held only for the in-memory work.
pub struct MemoryLog {
    /// Shared with the retention sweeper (which holds it weakly and ends when the log is dropped).
    inner: Arc<Mutex<Inner>>,
    /// Highest stored sequence; subscribers and the hub wait on it.
    committed: watch::Sender<u64>,
    /// What is kept; the oldest records go first.
    retention: Retention,
    /// A random id: each memory store is another store.
    id: u64,
}

struct Inner {
    /// `records[i]` has sequence `first + i`.
    records: VecDeque<Record>,
    /// `event_ids[i]` is the id of `records[i]`, to forget ids that retention removes.
    event_ids: VecDeque<Option<i64>>,
    first: u64,
    ids: HashMap<i64, u64>,
    /// Total payload bytes of `records`, for retention by bytes.
    bytes: u64,
}

impl Inner {
    /// Removes the oldest records while a limit of `retention` is exceeded.
    fn apply(&mut self, retention: &Retention) {
        let oldest_allowed = retention.oldest_allowed_ms();
        while let Some(front) = self.records.front() {
            let too_many = retention
                .max_events
                .is_some_and(|max| self.records.len() as u64 > max);
            let too_big = retention.max_bytes.is_some_and(|max| self.bytes > max);
            let too_old = oldest_allowed.is_some_and(|oldest| front.received_at_ms < oldest);
            if !(too_many || too_big || too_old) {
                break;
            }
            self.bytes -= front.payload.len() as u64;
            self.records.pop_front();
            if let Some(Some(id)) = self.event_ids.pop_front() {
                self.ids.remove(&id);
            }
            self.first += 1;
        }
    }
}

impl MemoryLog {
    /// An empty log keeping at most `max_records` (all when `None`).
    pub fn new(max_records: Option<usize>) -> Self {
        Self::with_retention(Retention {
            max_events: max_records.map(|n| n as u64),
            ..Retention::default()
        })
    }

    /// An empty log with these limits. With retention by age, and inside a Tokio runtime, a task
    /// removes expired records every [`RETENTION_SWEEP`] (also when nothing is appended); it ends
    /// when the log is dropped.
    pub fn with_retention(retention: Retention) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            records: VecDeque::new(),
            event_ids: VecDeque::new(),
            first: 1,
            ids: HashMap::new(),
            bytes: 0,
        }));
        if retention.max_age.is_some() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(sweep(Arc::downgrade(&inner), retention.clone()));
            }
        }
        Self {
            inner,
            committed: watch::channel(0).0,
            retention,
            id: super::random_id(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        lock(&self.inner)
    }
}

fn lock(inner: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    // A panic while holding the lock cannot leave Inner half-updated in a way that matters more
    // than losing the process; keep serving.
    inner
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Removes expired records on a timer until the log is dropped.
async fn sweep(inner: Weak<Mutex<Inner>>, retention: Retention) {
    let mut interval = tokio::time::interval(RETENTION_SWEEP);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        lock(&inner).apply(&retention);
    }
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::new(None)
    }
}

#[async_trait]
impl EventLog for MemoryLog {
    async fn append(&self, records: Vec<NewRecord>) -> Vec<Result<Appended, LogError>> {
        let mut inner = self.lock();
        let mut results = Vec::with_capacity(records.len());
        for record in records {
            if let Some(&sequence) = record.event_id.and_then(|id| inner.ids.get(&id)) {
                results.push(Appended {
                    sequence,
                    duplicate: true,
                });
                continue;
            }
            let sequence = inner.first + inner.records.len() as u64;
            if let Some(id) = record.event_id {
                inner.ids.insert(id, sequence);
            }
            inner.event_ids.push_back(record.event_id);
            inner.bytes += record.payload.len() as u64;
            inner.records.push_back(Record {
                sequence,
                received_at_ms: record.received_at_ms,
                payload: record.payload,
            });
            results.push(Appended {
                sequence,
                duplicate: false,
            });
        }
        inner.apply(&self.retention);
        let last = inner.first + inner.records.len() as u64 - 1;
        drop(inner);
        self.committed.send_replace(last);
        results.into_iter().map(Ok).collect()
    }

    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Record>, LogError> {
        let inner = self.lock();
        if from < inner.first {
            return Err(LogError::Truncated {
                requested: from,
                oldest: inner.first,
            });
        }
        let start = (from - inner.first) as usize;
        Ok(inner
            .records
            .iter()
            .skip(start)
            .take(limit)
            .cloned()
            .collect())
    }

    async fn find_event(&self, event_id: i64) -> Result<Option<u64>, LogError> {
        let inner = self.lock();
        Ok(inner.ids.get(&event_id).copied())
    }

    async fn seek_time(&self, at_ms: i64) -> Result<u64, LogError> {
        let inner = self.lock();
        let index = inner
            .records
            .partition_point(|record| record.received_at_ms < at_ms);
        Ok(inner.first + index as u64)
    }

    fn identity(&self) -> String {
        format!("memory:{:016x}", self.id)
    }

    fn bounds(&self) -> Bounds {
        let inner = self.lock();
        Bounds {
            first: inner.first,
            next: inner.first + inner.records.len() as u64,
        }
    }

    fn committed(&self) -> watch::Receiver<u64> {
        self.committed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    fn record(event_id: i64, at: i64) -> NewRecord {
        NewRecord {
            event_id: Some(event_id),
            received_at_ms: at,
            payload: Bytes::from(format!("event {event_id}")),
        }
    }

    #[tokio::test]
    async fn duplicates_within_and_across_appends_keep_the_first_sequence() {
        let log = MemoryLog::default();
        let first = log
            .append_all(vec![record(10, 1), record(11, 2), record(10, 3)])
            .await
            .unwrap();
        assert_eq!(
            first,
            vec![
                Appended {
                    sequence: 1,
                    duplicate: false
                },
                Appended {
                    sequence: 2,
                    duplicate: false
                },
                Appended {
                    sequence: 1,
                    duplicate: true
                },
            ]
        );
        let again = log.append_all(vec![record(11, 4)]).await.unwrap();
        assert_eq!(
            again,
            vec![Appended {
                sequence: 2,
                duplicate: true
            }]
        );
        assert_eq!(log.bounds(), Bounds { first: 1, next: 3 });
        assert_eq!(*log.committed().borrow(), 2);
    }

    #[tokio::test]
    async fn retention_reports_truncation_instead_of_skipping() {
        let log = MemoryLog::new(Some(2));
        log.append_all((1..=5).map(|i| record(i, i)).collect())
            .await
            .unwrap();
        assert_eq!(log.bounds(), Bounds { first: 4, next: 6 });
        assert!(matches!(
            log.read(1, 10).await,
            Err(LogError::Truncated {
                requested: 1,
                oldest: 4
            })
        ));
        let records = log.read(4, 10).await.unwrap();
        assert_eq!(
            records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
            vec![4, 5]
        );
        assert_eq!(log.find_event(1).await.unwrap(), None);
        assert_eq!(log.seek_time(5).await.unwrap(), 5);
        assert_eq!(log.seek_time(100).await.unwrap(), 6);
    }

    #[tokio::test]
    async fn retention_by_bytes_and_by_age_applies_on_append() {
        let by_bytes = MemoryLog::with_retention(Retention {
            max_bytes: Some(20),
            ..Retention::default()
        });
        // Each payload is 8 bytes ("event N"): two fit in 20.
        by_bytes
            .append_all((1..=5).map(|i| record(i, i)).collect())
            .await
            .unwrap();
        assert_eq!(by_bytes.bounds(), Bounds { first: 4, next: 6 });

        let by_age = MemoryLog::with_retention(Retention {
            max_age: Some(std::time::Duration::from_secs(60)),
            ..Retention::default()
        });
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        by_age
            .append_all(vec![record(1, 0), record(2, now)])
            .await
            .unwrap();
        assert_eq!(by_age.bounds(), Bounds { first: 2, next: 3 });
        assert_eq!(by_age.find_event(1).await.unwrap(), None);
    }
}
