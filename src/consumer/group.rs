//! One consumer group over the log: admits the events its filter wants into its [`Schedule`] (a
//! bounded window ahead of the oldest unfinished one), hands them to instances with their
//! records, and wakes waiting pulls when events arrive or a timer is due. In memory: its state is
//! not yet kept in the store (issue 20, in progress).

use std::sync::Arc;
use std::time::Duration;

use std::sync::Mutex;

use tokio::sync::Notify;

use super::schedule::{AckId, AckOutcome, Admitted, Delivery, Ms, Schedule, Settings};
use crate::log::{LogError, Record, SharedLog, Wanted};
use crate::subscribe::Filter;

/// Records looked at per admission read.
const ADMIT_SCAN: usize = 4_096;

/// A delivery and the stored record it hands out.
#[derive(Debug, Clone)]
pub struct Handed {
    pub delivery: Delivery,
    pub record: Record,
}

/// One consumer group.
pub struct Group {
    log: SharedLog,
    filter: Filter,
    /// Held only for the schedule's own (synchronous, quick) steps, never across a read of the
    /// log: acks never wait for an admission.
    schedule: Mutex<Schedule>,
    /// One admission at a time (held across its read of the log).
    admitting: tokio::sync::Mutex<()>,
    /// Woken when an ack, a nack or a release may have made an event ready.
    changed: Notify,
    /// Unfinished events admitted at most (the window ahead of the oldest unfinished).
    window: usize,
}

impl Group {
    /// A group that reads the log from `from` on.
    pub fn new(
        log: SharedLog,
        filter: Filter,
        settings: Settings,
        from: u64,
        window: usize,
    ) -> Self {
        Self {
            log,
            filter,
            schedule: Mutex::new(Schedule::new(settings, from)),
            admitting: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            window: window.max(1),
        }
    }

    /// Admits what the log holds past the schedule's cursor, up to the window. Records the
    /// filter refuses are passed over without being copied; a record whose keys do not read is
    /// admitted (its delivery reports it).
    async fn admit(&self) -> Result<(), LogError> {
        let _admitting = self.admitting.lock().await;
        loop {
            let (from, room) = {
                let schedule = self.lock();
                if schedule.pending() >= self.window {
                    return Ok(());
                }
                (schedule.admit_from(), self.window - schedule.pending())
            };
            let found: Arc<std::sync::Mutex<Vec<Admitted>>> = Arc::default();
            let filter = self.filter.clone();
            let sink = found.clone();
            let wanted: Wanted = Arc::new(move |sequence, _, payload: &[u8]| {
                let keys = crate::wire::keys_of(payload);
                if keys.as_ref().is_none_or(|keys| filter.matches(keys)) {
                    if let Ok(mut found) = sink.lock() {
                        found.push(Admitted {
                            sequence,
                            chat: keys.and_then(|keys| keys.chat_id),
                            bytes: payload.len() as u64,
                        });
                    }
                }
                // Never copied here: the delivery reads the record it hands out.
                None
            });
            let scanned = self
                .log
                .scan(from, ADMIT_SCAN.min(room.max(1) * 64), usize::MAX, wanted)
                .await?;
            let found = std::mem::take(&mut *found.lock().unwrap_or_else(|p| p.into_inner()));
            let admitted = found.len();
            let mut schedule = self.lock();
            if schedule.admit_from() != from {
                // Moved meanwhile (a seek): read again from where it is now.
                continue;
            }
            for event in found.into_iter().take(room) {
                let sequence = event.sequence;
                schedule
                    .admit(event)
                    .map_err(|error| LogError::Unavailable(format!("{error} at {sequence}")))?;
            }
            if admitted > room {
                // The window is full: the rest is admitted again by a later read.
                return Ok(());
            }
            schedule.skip_to(scanned.next);
            if scanned.next <= from {
                return Ok(());
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.schedule
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Up to `max` events for `instance`, waiting up to `wait` for the first; `now` gives the
    /// schedule's clock.
    pub async fn pull(
        &self,
        instance: u64,
        max: usize,
        wait: Duration,
        now: impl Fn() -> Ms,
    ) -> Result<Vec<Handed>, LogError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut committed = self.log.committed();
        loop {
            let notified = self.changed.notified();
            self.admit().await?;
            let (deliveries, due) = {
                let mut schedule = self.lock();
                let deliveries = schedule.pull(instance, max, now());
                (deliveries, schedule.next_due())
            };
            if !deliveries.is_empty() {
                return self.records(deliveries).await;
            }
            let mut sleep_until = deadline;
            if let Some(due) = due {
                let in_ms = due.saturating_sub(now()).max(0) as u64;
                sleep_until =
                    sleep_until.min(tokio::time::Instant::now() + Duration::from_millis(in_ms));
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Vec::new());
            }
            tokio::select! {
                _ = notified => {}
                changed = committed.changed() => if changed.is_err() { return Err(LogError::Closed) },
                _ = tokio::time::sleep_until(sleep_until) => {}
            }
        }
    }

    /// The records of `deliveries`, read from the log.
    async fn records(&self, deliveries: Vec<Delivery>) -> Result<Vec<Handed>, LogError> {
        let mut handed = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            let record = self
                .log
                .read(delivery.sequence, 1)
                .await?
                .into_iter()
                .find(|record| record.sequence == delivery.sequence)
                .ok_or(LogError::Truncated {
                    requested: delivery.sequence,
                    oldest: delivery.sequence + 1,
                })?;
            handed.push(Handed { delivery, record });
        }
        Ok(handed)
    }

    /// Acknowledges `id`.
    pub async fn ack(&self, id: AckId) -> AckOutcome {
        let outcome = self.lock().ack(id);
        self.changed.notify_waiters();
        outcome
    }

    /// Extends `id`'s deadline by `extend_ms` from `now`, or nacks it (0).
    pub async fn modify_deadline(
        &self,
        id: AckId,
        extend_ms: Ms,
        now: Ms,
        note: Option<String>,
    ) -> AckOutcome {
        let outcome = self.lock().modify_deadline(id, extend_ms, now, note);
        self.changed.notify_waiters();
        outcome
    }

    /// An instance is gone: what it holds is taken back (an attempt each).
    pub async fn release(&self, instance: u64, now: Ms) {
        self.lock().release(instance, now);
        self.changed.notify_waiters();
    }

    /// Events admitted and not finished; events parked.
    pub async fn counts(&self) -> (usize, usize) {
        let schedule = self.lock();
        (schedule.pending(), schedule.parked().count())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::memory::MemoryLog;
    use crate::log::NewRecord;

    /// A stored record for `id` in `chat` (a real compact record, so that its keys read).
    fn record(id: i64, chat: i64, event_type: &str) -> NewRecord {
        let body =
            format!(r#"{{"ChatEvent": {{"Id": {id}, "Type": "{event_type}", "ChatId": {chat}}}}}"#);
        let decoded = crate::decode::decode(body.as_bytes()).expect("a valid body");
        let (payload, _, _) = crate::gateway::stored_record(
            decoded.envelope,
            bytes::Bytes::from(body),
            decoded.deviations,
            usize::MAX,
        )
        .expect("fits");
        NewRecord {
            event_id: Some(id),
            received_at_ms: id,
            payload,
        }
    }

    fn clock() -> impl Fn() -> Ms {
        let start = std::time::Instant::now();
        move || start.elapsed().as_millis() as Ms
    }

    #[tokio::test]
    async fn two_instances_share_a_group_in_chat_order_and_a_filter_passes_over_the_rest() {
        let log: SharedLog = Arc::new(MemoryLog::new(None));
        // Chats 1 and 2, and events the filter refuses in between.
        let mut records = Vec::new();
        for id in 1..=30 {
            let kind = if id % 3 == 0 {
                "typing"
            } else {
                "message_created"
            };
            records.push(record(id, id % 2 + 1, kind));
        }
        log.append_all(records).await.unwrap();
        let filter = Filter {
            event_types: vec!["message_created".into()],
            ..Filter::default()
        };
        let group = Arc::new(Group::new(log.clone(), filter, Settings::default(), 1, 8));
        let now = clock();
        let mut seen: Vec<(u64, i64)> = Vec::new();
        for round in 0..100 {
            let instance = round % 2;
            let handed = group
                .pull(instance, 5, Duration::from_millis(10), &now)
                .await
                .unwrap();
            if handed.is_empty() {
                break;
            }
            for handed in handed {
                let keys = crate::wire::keys_of(&handed.record.payload).unwrap();
                assert_eq!(keys.event_type, "message_created");
                seen.push((handed.record.sequence, keys.chat_id.unwrap()));
                assert_eq!(group.ack(handed.delivery.ack_id).await, AckOutcome::Done);
            }
        }
        let want: Vec<u64> = (1..=30).filter(|id| id % 3 != 0).collect();
        let mut got: Vec<u64> = seen.iter().map(|(s, _)| *s).collect();
        got.sort_unstable();
        assert_eq!(got, want, "every wanted event once");
        for chat in [1, 2] {
            let order: Vec<u64> = seen
                .iter()
                .filter(|(_, c)| *c == chat)
                .map(|(s, _)| *s)
                .collect();
            assert!(
                order.windows(2).all(|w| w[0] < w[1]),
                "chat {chat}: {order:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_waiting_pull_wakes_for_a_new_event_and_for_a_nack_after_its_backoff() {
        let log: SharedLog = Arc::new(MemoryLog::new(None));
        let settings = Settings {
            backoff: vec![50],
            ..Settings::default()
        };
        let group = Arc::new(Group::new(log.clone(), Filter::default(), settings, 1, 100));
        let now = Arc::new(clock());
        let waiting = {
            let (group, now) = (group.clone(), now.clone());
            tokio::spawn(async move {
                group
                    .pull(1, 1, Duration::from_secs(10), move || now())
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        log.append_all(vec![record(7, 1, "message_created")])
            .await
            .unwrap();
        let handed = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken by the new event")
            .unwrap()
            .unwrap();
        assert_eq!(handed.len(), 1);
        let id = handed[0].delivery.ack_id;
        assert_eq!(
            group.modify_deadline(id, 0, now(), None).await,
            AckOutcome::Done
        );
        let again = tokio::time::timeout(
            Duration::from_secs(5),
            group.pull(2, 1, Duration::from_secs(10), || now()),
        )
        .await
        .expect("handed again after the backoff")
        .unwrap();
        assert_eq!(
            (again[0].delivery.sequence, again[0].delivery.attempt),
            (1, 2)
        );
        assert_eq!(group.ack(id).await, AckOutcome::Stale);
        assert_eq!(group.ack(again[0].delivery.ack_id).await, AckOutcome::Done);
        assert_eq!(group.counts().await, (0, 0));
    }
}
