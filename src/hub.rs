//! The live tail: the newest durable events, encoded once, broadcast to every subscriber.
//!
//! A feeder task follows the log's committed sequence, reads each new record once, turns it into
//! an [`EncodedEvent`] and broadcasts the `Arc`. The broadcast buffer is bounded
//! (`capacity` events): when a subscriber falls more than that behind, its receiver reports
//! `Lagged` and the subscriber continues from the log (see `subscribe`). Ingest never waits for
//! the hub, and the hub never waits for a subscriber.

use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::log::{LogError, SharedLog};
use crate::wire::EncodedEvent;

/// Records read from the log per feeder step.
const FEED_BATCH: usize = 1024;

/// The broadcast side of the live tail.
#[derive(Clone)]
pub struct Hub {
    /// Bounded: a full buffer overwrites the oldest event and lagging receivers are told so.
    sender: broadcast::Sender<Arc<EncodedEvent>>,
    /// The feeder task (ends at shutdown, also while the log fails).
    feeder: Arc<tokio::task::JoinHandle<()>>,
}

impl Hub {
    /// Starts the feeder for `log`, beginning after the log's current end. The feeder stops when
    /// `shutdown` changes.
    pub fn start(log: SharedLog, capacity: usize, mut shutdown: watch::Receiver<bool>) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        let feeder_sender = sender.clone();
        let feeder = tokio::spawn(async move {
            let sender = feeder_sender;
            let mut next = log.bounds().next;
            let mut committed = log.committed();
            loop {
                loop {
                    let end = *committed.borrow_and_update();
                    if next > end {
                        break;
                    }
                    if sender.receiver_count() == 0 {
                        // Nobody listens: nothing to read or encode. A subscriber attaches its
                        // receiver before it reads the log, so one attaching now still reads up
                        // to `end` from the log, and everything after `end` is broadcast.
                        next = end + 1;
                        break;
                    }
                    match log.read(next, FEED_BATCH).await {
                        Ok(records) if records.is_empty() => break,
                        Ok(records) => {
                            for record in records {
                                next = record.sequence + 1;
                                match EncodedEvent::from_payload(
                                    record.sequence,
                                    record.received_at_ms,
                                    record.payload,
                                ) {
                                    // No receivers is fine: nobody is subscribed right now.
                                    Ok(event) => drop(sender.send(Arc::new(event))),
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
            sender,
            feeder: Arc::new(feeder),
        }
    }

    /// Whether the feeder task has ended (after shutdown).
    pub fn stopped(&self) -> bool {
        self.feeder.is_finished()
    }

    /// A receiver of every event broadcast from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EncodedEvent>> {
        self.sender.subscribe()
    }

    /// How many receivers are attached.
    pub fn receivers(&self) -> usize {
        self.sender.receiver_count()
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
        fn bounds(&self) -> Bounds {
            Bounds { first: 1, next: 1 }
        }
        fn committed(&self) -> watch::Receiver<u64> {
            self.0.subscribe()
        }
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
}
