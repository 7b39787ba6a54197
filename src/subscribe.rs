//! One subscriber's cursor: catch-up reads from the log, then the live tail, and back to the log
//! whenever the tail has moved on without it. Events arrive in sequence order, without gaps or
//! repeats, whatever the subscriber's speed.

use std::collections::VecDeque;
use std::sync::Arc;

use tokio::sync::{broadcast, watch};

use crate::hub::Hub;
use crate::log::{LogError, SharedLog};
use crate::wire::{EncodedEvent, Keys};

/// Records read from the log per catch-up step.
const CATCH_UP_PAGE: usize = 256;

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
}

/// A subscriber's position and source.
pub struct Subscription {
    log: SharedLog,
    live: broadcast::Receiver<Arc<EncodedEvent>>,
    shutdown: watch::Receiver<bool>,
    filter: Filter,
    /// The next sequence this subscriber has not yet looked at.
    next: u64,
    /// Matching events read from the log and not yet handed out (at most one page).
    pending: VecDeque<Arc<EncodedEvent>>,
    /// Reading from the log (true) or from the live tail (false).
    catching_up: bool,
}

impl Subscription {
    /// Positions a new subscription. The live receiver is attached before the start is resolved,
    /// so nothing stored in between is missed.
    pub async fn new(
        log: SharedLog,
        hub: &Hub,
        shutdown: watch::Receiver<bool>,
        filter: Filter,
        start: Start,
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
                next
            }
            Start::Since(at_ms) => log.seek_time(at_ms).await?,
        };
        Ok(Self {
            log,
            live,
            shutdown,
            filter,
            next,
            pending: VecDeque::new(),
            catching_up: true,
        })
    }

    /// The sequence the subscription will look at next.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The next matching event. Waits for one to be stored; ends only with an error.
    pub async fn next(&mut self) -> Result<Arc<EncodedEvent>, SubscribeError> {
        loop {
            if *self.shutdown.borrow() {
                return Err(SubscribeError::ShuttingDown);
            }
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
            }
            if self.catching_up {
                self.catch_up_page().await?;
                continue;
            }
            let received = tokio::select! {
                received = self.live.recv() => received,
                _ = self.shutdown.changed() => return Err(SubscribeError::ShuttingDown),
            };
            match received {
                Ok(event) if event.sequence < self.next => {}
                Ok(event) if event.sequence > self.next => self.catching_up = true,
                Ok(event) => {
                    self.next += 1;
                    if self.filter.matches(&event.keys) {
                        return Ok(event);
                    }
                }
                // Fell behind the bounded tail: the log has everything it missed.
                Err(broadcast::error::RecvError::Lagged(_)) => self.catching_up = true,
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(SubscribeError::ShuttingDown)
                }
            }
        }
    }

    /// Reads one page from the log; at the end of the log, switches to the live tail.
    async fn catch_up_page(&mut self) -> Result<(), SubscribeError> {
        let records = self.log.read(self.next, CATCH_UP_PAGE).await?;
        if records.is_empty() {
            self.catching_up = false;
            return Ok(());
        }
        for record in records {
            let sequence = record.sequence;
            let event = EncodedEvent::from_payload(sequence, record.received_at_ms, record.payload)
                .map_err(|_| SubscribeError::Corrupt(sequence))?;
            self.next = sequence + 1;
            if self.filter.matches(&event.keys) {
                self.pending.push_back(Arc::new(event));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
