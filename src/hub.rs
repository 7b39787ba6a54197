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
}

impl Hub {
    /// Starts the feeder for `log`, beginning after the log's current end. The feeder stops when
    /// `shutdown` changes.
    pub fn start(log: SharedLog, capacity: usize, mut shutdown: watch::Receiver<bool>) -> Self {
        let (sender, _) = broadcast::channel(capacity.max(1));
        let hub = Self {
            sender: sender.clone(),
        };
        tokio::spawn(async move {
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
                            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        }
                    }
                }
                tokio::select! {
                    changed = committed.changed() => if changed.is_err() { break },
                    _ = shutdown.changed() => break,
                }
            }
        });
        hub
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
