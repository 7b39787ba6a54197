//! An in-memory [`EventLog`]: nothing survives a restart. For tests and benchmarks
//! (`--store memory`).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{Appended, Bounds, EventLog, LogError, NewRecord, Record};

/// Records in a deque, ids in a map; one mutex, held only for the in-memory work.
pub struct MemoryLog {
    inner: Mutex<Inner>,
    /// Highest stored sequence; subscribers and the hub wait on it.
    committed: watch::Sender<u64>,
    /// Records kept at most (the oldest are dropped first); `None` keeps everything.
    max_records: Option<usize>,
}

struct Inner {
    /// `records[i]` has sequence `first + i`.
    records: VecDeque<Record>,
    /// `event_ids[i]` is the id of `records[i]`, to forget ids that retention removes.
    event_ids: VecDeque<Option<i64>>,
    first: u64,
    ids: HashMap<i64, u64>,
}

impl MemoryLog {
    /// An empty log keeping at most `max_records` (all when `None`).
    pub fn new(max_records: Option<usize>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                records: VecDeque::new(),
                event_ids: VecDeque::new(),
                first: 1,
                ids: HashMap::new(),
            }),
            committed: watch::channel(0).0,
            max_records,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave Inner half-updated in a way that matters
        // more than losing the process; keep serving.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        if let Some(max) = self.max_records {
            while inner.records.len() > max {
                inner.records.pop_front();
                if let Some(Some(id)) = inner.event_ids.pop_front() {
                    inner.ids.remove(&id);
                }
                inner.first += 1;
            }
        }
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
}
