//! The schedule of one consumer group: which of the events it admitted from the log are out (with
//! which instance, until when), which wait for their backoff, which are parked, and which may go
//! next. Pure and synchronous: time comes in as milliseconds, so that every rule is tested with a
//! model ([`tests`]) before it is wired to a store and to the network.
//!
//! The rules (issue 20):
//! - **Per-chat order**: with `per_chat`, a chat's next event is handed out only once the one
//!   before it is finished (acknowledged or parked): at most one event of a chat is out or waiting
//!   for its backoff, and while it waits the chat waits with it. Events without a chat, and every
//!   event with `per_chat` off, are independent.
//! - **Every failed attempt waits for the backoff**, whether nacked, expired, or released with its
//!   instance; after `max_deliveries` attempts the event is parked (`on_park`: the chat goes on,
//!   or is held until the parked event is replayed).
//! - **Fenced acknowledgements**: an ack names its attempt ([`AckId`]). It is taken while no newer
//!   attempt was handed out (also after the deadline, which cancels the retry); an older
//!   attempt's is [`AckOutcome::Stale`] and changes nothing. A seek starts a new epoch: every
//!   lease handed out before it is stale.
//! - **Ready chats are found without scanning**: `ready` holds exactly the events that may be
//!   handed out now; timers are ordered by time.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Milliseconds (of any clock the caller keeps monotonic).
pub type Ms = i64;

/// A consumer's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// How long an instance holds an event before it is taken back (an attempt counted).
    pub ack_deadline: Ms,
    /// Attempts before an event is parked (at least 1).
    pub max_deliveries: u32,
    /// The wait after the n-th failed attempt: `backoff[n - 1]`, the last one repeating (empty:
    /// no wait).
    pub backoff: Vec<Ms>,
    /// Per-chat order (`ordering: per_chat`); off: every event is independent.
    pub per_chat: bool,
    /// `on_park: hold`: a chat stays held while one of its events is parked.
    pub hold_on_park: bool,
    /// Events out at once, all instances together, and per instance.
    pub max_outstanding: usize,
    pub max_outstanding_per_instance: usize,
    /// Bytes out at once (at least one event is always handed out).
    pub max_outstanding_bytes: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            ack_deadline: 30_000,
            max_deliveries: 5,
            backoff: vec![1_000, 10_000, 60_000, 600_000],
            per_chat: true,
            hold_on_park: false,
            max_outstanding: 1_000,
            max_outstanding_per_instance: 1_000,
            max_outstanding_bytes: 64 << 20,
        }
    }
}

/// What the schedule needs of a stored event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub sequence: u64,
    pub chat: Option<i64>,
    /// Its size, for the bytes outstanding.
    pub bytes: u64,
}

/// One attempt of one event: what an instance acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AckId {
    pub epoch: u32,
    pub sequence: u64,
    pub attempt: u32,
}

impl std::fmt::Display for AckId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.epoch, self.sequence, self.attempt)
    }
}

impl std::str::FromStr for AckId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let mut parts = text.split('.').map(str::parse::<u64>);
        match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(Ok(epoch)), Some(Ok(sequence)), Some(Ok(attempt)), None) => Ok(AckId {
                epoch: u32::try_from(epoch).map_err(|_| format!("ack id `{text}`: bad epoch"))?,
                sequence,
                attempt: u32::try_from(attempt)
                    .map_err(|_| format!("ack id `{text}`: bad attempt"))?,
            }),
            _ => Err(format!(
                "ack id `{text}` is not one the gateway handed out (EPOCH.SEQUENCE.ATTEMPT)"
            )),
        }
    }
}

/// An event handed to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub ack_id: AckId,
    pub sequence: u64,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// How many earlier events of this event's chat are parked (`on_park: continue`), counted
    /// up to [`PARKED_NAMED`].
    pub parked_before: usize,
}

/// Parked events of its chat a delivery counts at most.
pub const PARKED_NAMED: usize = 16;

/// What became of an acknowledgement, nack or deadline change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// Taken.
    Done,
    /// A newer attempt was handed out (or the consumer was moved): nothing changed.
    Stale,
    /// The event is already finished (acknowledged, or parked).
    AlreadyDone,
    /// No such event was handed out.
    Unknown,
}

/// A parked event.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Parked {
    pub sequence: u64,
    pub chat: Option<i64>,
    pub attempts: u32,
    pub first_attempt: Ms,
    pub last_attempt: Ms,
    /// The note of the last nack, if any.
    pub note: Option<String>,
    /// Being replayed: it leaves the park once that replay is acknowledged.
    pub replaying: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// May be handed out once it is its chat's turn.
    Ready,
    Out {
        instance: u64,
        deadline: Ms,
    },
    /// Failed; waits for its backoff.
    Waiting {
        until: Ms,
    },
}

#[derive(Debug, Clone)]
struct Entry {
    chat: Option<i64>,
    bytes: u64,
    attempts: u32,
    stage: Stage,
    first_attempt: Ms,
    last_attempt: Ms,
    note: Option<String>,
    /// A replay of a parked event.
    replay: bool,
    /// Attempts made before this replay: attempt numbers go on (an ack of an attempt before the
    /// park stays stale), `max_deliveries` counts from here.
    base: u32,
}

/// An admitted, unfinished event, as [`Durable`] keeps it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Unfinished {
    pub sequence: u64,
    pub chat: Option<i64>,
    pub bytes: u64,
    /// Attempts handed out so far, and those before its replay (if it is one).
    pub attempts: u32,
    pub base: u32,
    pub replay: bool,
    pub first_attempt: Ms,
    pub last_attempt: Ms,
    pub note: Option<String>,
}

/// What a schedule keeps across a restart (small: the admitted window and the park). An event
/// that was out or waiting when it was taken is handed out again after [`Schedule::restore`], the
/// attempt it was on counted; acks of attempts before it are stale (a new epoch).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Durable {
    pub epoch: u32,
    pub admit_from: u64,
    pub unfinished: Vec<Unfinished>,
    pub parked: Vec<Parked>,
}

/// The schedule of one consumer.
#[derive(Debug, Clone)]
pub struct Schedule {
    settings: Settings,
    epoch: u32,
    /// Admitted events not finished, by sequence.
    entries: BTreeMap<u64, Entry>,
    /// Per chat (with `per_chat`): its unfinished events in sequence order; only the first may be
    /// out or waiting. Also when held by a park.
    chats: HashMap<i64, VecDeque<u64>>,
    /// Chats held by a parked event (`hold_on_park`): chat -> the parked sequence.
    held_by_park: HashMap<i64, u64>,
    /// Exactly the events that may be handed out now.
    ready: BTreeSet<u64>,
    /// Deadlines and backoffs: (when, sequence).
    timers: BTreeSet<(Ms, u64)>,
    parked: BTreeMap<u64, Parked>,
    /// Out, per instance: (events, bytes).
    out: HashMap<u64, (usize, u64)>,
    out_events: usize,
    out_bytes: u64,
    /// The next sequence to admit from the log.
    admit_from: u64,
}

impl Schedule {
    /// A schedule that admits from `from` on.
    pub fn new(settings: Settings, from: u64) -> Self {
        Self {
            settings,
            epoch: 0,
            entries: BTreeMap::new(),
            chats: HashMap::new(),
            held_by_park: HashMap::new(),
            ready: BTreeSet::new(),
            timers: BTreeSet::new(),
            parked: BTreeMap::new(),
            out: HashMap::new(),
            out_events: 0,
            out_bytes: 0,
            admit_from: from,
        }
    }

    /// What to keep to go on after a restart.
    pub fn durable(&self) -> Durable {
        Durable {
            epoch: self.epoch,
            admit_from: self.admit_from,
            unfinished: self
                .entries
                .iter()
                .map(|(&sequence, entry)| Unfinished {
                    sequence,
                    chat: entry.chat,
                    bytes: entry.bytes,
                    attempts: entry.attempts,
                    base: entry.base,
                    replay: entry.replay,
                    first_attempt: entry.first_attempt,
                    last_attempt: entry.last_attempt,
                    note: entry.note.clone(),
                })
                .collect(),
            parked: self.parked.values().cloned().collect(),
        }
    }

    /// A schedule that goes on from `durable`, in a new epoch.
    pub fn restore(settings: Settings, durable: Durable) -> Self {
        let mut schedule = Schedule::new(settings, durable.admit_from);
        schedule.epoch = durable.epoch.wrapping_add(1);
        for parked in durable.parked {
            schedule.parked.insert(parked.sequence, parked);
        }
        for unfinished in durable.unfinished {
            let sequence = unfinished.sequence;
            schedule.insert(
                sequence,
                unfinished.chat,
                unfinished.bytes,
                unfinished.replay.then_some(unfinished.base),
            );
            if let Some(entry) = schedule.entries.get_mut(&sequence) {
                entry.attempts = unfinished.attempts;
                entry.base = unfinished.base;
                entry.first_attempt = unfinished.first_attempt;
                entry.last_attempt = unfinished.last_attempt;
                entry.note = unfinished.note;
                // Its last attempt was out when the schedule was kept: failed, and it was the
                // last one allowed.
                if entry.attempts - entry.base >= schedule.settings.max_deliveries.max(1) {
                    entry.note = Some("the gateway restarted while it was out".into());
                    schedule.park(sequence);
                }
            }
        }
        // A chat held by a parked event stays held.
        if schedule.settings.per_chat && schedule.settings.hold_on_park {
            let holds: Vec<(i64, u64)> = schedule
                .parked
                .values()
                .filter(|parked| !parked.replaying)
                .filter_map(|parked| parked.chat.map(|chat| (chat, parked.sequence)))
                .collect();
            for (chat, sequence) in holds {
                schedule.held_by_park.entry(chat).or_insert(sequence);
                schedule.refresh_chat(chat);
            }
        }
        schedule
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Changes the rules for what happens next (deadlines of events out stay as handed out).
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    /// The next sequence to read from the log for [`Schedule::admit`].
    pub fn admit_from(&self) -> u64 {
        self.admit_from
    }

    /// Events admitted and not finished.
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Events out, and their bytes.
    pub fn outstanding(&self) -> (usize, u64) {
        (self.out_events, self.out_bytes)
    }

    /// The oldest unfinished sequence (every one before it is finished), if any is admitted.
    pub fn oldest_unfinished(&self) -> Option<u64> {
        self.entries.keys().next().copied()
    }

    pub fn parked(&self) -> impl Iterator<Item = &Parked> {
        self.parked.values()
    }

    /// Chats whose next event waits for an earlier one (out, waiting, or parked and held).
    pub fn held_chats(&self) -> usize {
        self.chats
            .iter()
            .filter(|(chat, queue)| {
                self.held_by_park.contains_key(chat)
                    || queue.front().is_some_and(|sequence| {
                        self.entries
                            .get(sequence)
                            .is_some_and(|entry| entry.stage != Stage::Ready)
                    })
            })
            .count()
    }

    /// Takes `event` (in sequence order, from [`Schedule::admit_from`] on; a filtered-out
    /// sequence is skipped by admitting the next one). Earlier sequences are refused.
    pub fn admit(&mut self, event: Admitted) -> Result<(), String> {
        if event.sequence < self.admit_from {
            return Err(format!(
                "sequence {} admitted after {}",
                event.sequence, self.admit_from
            ));
        }
        self.admit_from = event.sequence + 1;
        self.insert(event.sequence, event.chat, event.bytes, None);
        Ok(())
    }

    /// Moves the admission cursor past sequences that hold nothing for this consumer.
    pub fn skip_to(&mut self, sequence: u64) {
        self.admit_from = self.admit_from.max(sequence);
    }

    fn insert(&mut self, sequence: u64, chat: Option<i64>, bytes: u64, base: Option<u32>) {
        self.entries.insert(
            sequence,
            Entry {
                chat,
                bytes,
                attempts: base.unwrap_or(0),
                base: base.unwrap_or(0),
                stage: Stage::Ready,
                first_attempt: 0,
                last_attempt: 0,
                note: None,
                replay: base.is_some(),
            },
        );
        match chat.filter(|_| self.settings.per_chat) {
            Some(chat) => {
                let busy = self
                    .chats
                    .get(&chat)
                    .and_then(|queue| queue.front())
                    .is_some_and(|front| {
                        self.entries
                            .get(front)
                            .is_some_and(|entry| entry.stage != Stage::Ready)
                    });
                let queue = self.chats.entry(chat).or_default();
                // In sequence order (a replay goes before what came after it), but never before
                // the event of the chat that is out or waiting: only the first may be.
                let at = queue
                    .partition_point(|&s| s < sequence)
                    .max(usize::from(busy));
                queue.insert(at, sequence);
                self.refresh_chat(chat);
            }
            None => {
                self.ready.insert(sequence);
            }
        }
    }

    /// Puts a chat's first event in `ready` if it may go.
    fn refresh_chat(&mut self, chat: i64) {
        let Some(queue) = self.chats.get(&chat) else {
            return;
        };
        for &sequence in queue.iter().skip(1) {
            self.ready.remove(&sequence);
        }
        let Some(&head) = queue.front() else {
            self.chats.remove(&chat);
            return;
        };
        let may_go = !self.held_by_park.contains_key(&chat)
            && self
                .entries
                .get(&head)
                .is_some_and(|entry| entry.stage == Stage::Ready);
        if may_go {
            self.ready.insert(head);
        } else {
            self.ready.remove(&head);
        }
    }

    /// Hands up to `max` events to `instance`, oldest first, within the limits; expires what is
    /// due at `now` first.
    pub fn pull(&mut self, instance: u64, max: usize, now: Ms) -> Vec<Delivery> {
        self.tick(now);
        let mut handed = Vec::new();
        while handed.len() < max {
            let (mine, mine_bytes) = self.out.get(&instance).copied().unwrap_or((0, 0));
            if self.out_events >= self.settings.max_outstanding
                || mine >= self.settings.max_outstanding_per_instance
            {
                break;
            }
            let Some(&sequence) = self.ready.iter().next() else {
                break;
            };
            let Some(entry) = self.entries.get_mut(&sequence) else {
                self.ready.remove(&sequence);
                continue;
            };
            if self.out_events > 0
                && self.out_bytes.saturating_add(entry.bytes) > self.settings.max_outstanding_bytes
            {
                break;
            }
            self.ready.remove(&sequence);
            entry.attempts += 1;
            if entry.attempts == entry.base + 1 {
                entry.first_attempt = now;
            }
            entry.last_attempt = now;
            let deadline = now.saturating_add(self.settings.ack_deadline);
            entry.stage = Stage::Out { instance, deadline };
            self.timers.insert((deadline, sequence));
            self.out_events += 1;
            self.out_bytes += entry.bytes;
            self.out
                .insert(instance, (mine + 1, mine_bytes + entry.bytes));
            let chat = entry.chat;
            let attempt = entry.attempts;
            let parked_before = chat
                .map(|chat| {
                    self.parked
                        .values()
                        .filter(|parked| parked.chat == Some(chat) && parked.sequence < sequence)
                        .take(PARKED_NAMED)
                        .count()
                })
                .unwrap_or(0);
            handed.push(Delivery {
                ack_id: AckId {
                    epoch: self.epoch,
                    sequence,
                    attempt,
                },
                sequence,
                attempt,
                parked_before,
            });
        }
        handed
    }

    /// The next time something is due (a deadline or a backoff), for a waiting pull.
    pub fn next_due(&self) -> Option<Ms> {
        self.timers.iter().next().map(|(at, _)| *at)
    }

    /// Whether an event may be handed out now.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Expires the deadlines due at `now` (a failed attempt each) and ends the backoffs due.
    pub fn tick(&mut self, now: Ms) {
        while let Some(&(at, sequence)) = self.timers.iter().next() {
            if at > now {
                break;
            }
            self.timers.remove(&(at, sequence));
            let Some(entry) = self.entries.get_mut(&sequence) else {
                continue;
            };
            match entry.stage {
                // The backoff counts from the deadline, however late this tick comes.
                Stage::Out { deadline, .. } if deadline == at => {
                    self.fail(sequence, at, Some("the ack deadline passed".into()));
                }
                Stage::Waiting { until } if until == at => {
                    entry.stage = Stage::Ready;
                    self.make_ready(sequence);
                }
                _ => {}
            }
        }
    }

    fn make_ready(&mut self, sequence: u64) {
        let chat = self.entries.get(&sequence).and_then(|entry| entry.chat);
        match chat.filter(|_| self.settings.per_chat) {
            Some(chat) => self.refresh_chat(chat),
            None => {
                self.ready.insert(sequence);
            }
        }
    }

    /// Takes an event back from its instance (out -> not out).
    fn take_back(&mut self, sequence: u64) {
        let Some(entry) = self.entries.get(&sequence) else {
            return;
        };
        if let Stage::Out { instance, deadline } = entry.stage {
            self.timers.remove(&(deadline, sequence));
            self.out_events -= 1;
            self.out_bytes -= entry.bytes;
            if let Some((events, bytes)) = self.out.get_mut(&instance) {
                *events -= 1;
                *bytes -= entry.bytes;
                if *events == 0 {
                    self.out.remove(&instance);
                }
            }
        }
    }

    /// A failed attempt: the event waits for its backoff, or is parked after its last attempt.
    fn fail(&mut self, sequence: u64, now: Ms, note: Option<String>) {
        self.take_back(sequence);
        let Some(entry) = self.entries.get_mut(&sequence) else {
            return;
        };
        if note.is_some() {
            entry.note = note;
        }
        if entry.attempts - entry.base >= self.settings.max_deliveries.max(1) {
            self.park(sequence);
            return;
        }
        let wait = match self.settings.backoff.as_slice() {
            [] => 0,
            backoff => backoff[(entry.attempts as usize - 1).min(backoff.len() - 1)],
        };
        let until = now.saturating_add(wait.max(0));
        entry.stage = Stage::Waiting { until };
        self.timers.insert((until, sequence));
    }

    fn park(&mut self, sequence: u64) {
        let Some(entry) = self.entries.remove(&sequence) else {
            return;
        };
        self.ready.remove(&sequence);
        self.parked.insert(
            sequence,
            Parked {
                sequence,
                chat: entry.chat,
                attempts: entry.attempts,
                first_attempt: entry.first_attempt,
                last_attempt: entry.last_attempt,
                note: entry.note,
                replaying: false,
            },
        );
        if let Some(chat) = entry.chat.filter(|_| self.settings.per_chat) {
            self.leave_chat(chat, sequence);
            if self.settings.hold_on_park {
                self.held_by_park.entry(chat).or_insert(sequence);
            }
            self.refresh_chat(chat);
        }
    }

    fn leave_chat(&mut self, chat: i64, sequence: u64) {
        if let Some(queue) = self.chats.get_mut(&chat) {
            if let Some(at) = queue.iter().position(|&s| s == sequence) {
                queue.remove(at);
            }
        }
    }

    /// Finishes an event: acknowledged.
    fn finish(&mut self, sequence: u64) {
        self.take_back(sequence);
        let Some(entry) = self.entries.remove(&sequence) else {
            return;
        };
        self.ready.remove(&sequence);
        if entry.replay {
            self.parked.remove(&sequence);
        }
        if let Some(chat) = entry.chat.filter(|_| self.settings.per_chat) {
            self.leave_chat(chat, sequence);
            if self.held_by_park.get(&chat) == Some(&sequence) {
                self.held_by_park.remove(&chat);
            }
            self.refresh_chat(chat);
        }
    }

    /// Whether `id` names the current attempt of an unfinished event.
    fn check(&self, id: AckId) -> Result<(), AckOutcome> {
        if id.epoch != self.epoch {
            return Err(AckOutcome::Stale);
        }
        match self.entries.get(&id.sequence) {
            Some(entry) if entry.attempts == id.attempt && id.attempt > 0 => Ok(()),
            Some(entry) if id.attempt < entry.attempts && id.attempt > 0 => Err(AckOutcome::Stale),
            Some(_) => Err(AckOutcome::Unknown),
            None if self.parked.contains_key(&id.sequence) => Err(AckOutcome::AlreadyDone),
            None if id.sequence < self.admit_from && id.attempt > 0 => Err(AckOutcome::AlreadyDone),
            None => Err(AckOutcome::Unknown),
        }
    }

    /// An acknowledgement: taken while no newer attempt was handed out, also after its deadline
    /// (the pending retry is cancelled).
    pub fn ack(&mut self, id: AckId) -> AckOutcome {
        match self.check(id) {
            Ok(()) => {
                self.finish(id.sequence);
                AckOutcome::Done
            }
            Err(outcome) => outcome,
        }
    }

    /// Changes the deadline of an event out: `extend_ms` from `now`; 0 is a nack (a failed
    /// attempt, `note` kept), after which the event waits for its backoff.
    pub fn modify_deadline(
        &mut self,
        id: AckId,
        extend_ms: Ms,
        now: Ms,
        note: Option<String>,
    ) -> AckOutcome {
        if let Err(outcome) = self.check(id) {
            return outcome;
        }
        let sequence = id.sequence;
        let Some(entry) = self.entries.get_mut(&sequence) else {
            return AckOutcome::Unknown;
        };
        let Stage::Out { instance, deadline } = entry.stage else {
            // Already taken back (expired): a nack or an extension changes nothing more.
            return AckOutcome::Stale;
        };
        if extend_ms <= 0 {
            self.fail(sequence, now, note);
        } else {
            let new_deadline = now.saturating_add(extend_ms);
            self.timers.remove(&(deadline, sequence));
            self.timers.insert((new_deadline, sequence));
            entry.stage = Stage::Out {
                instance,
                deadline: new_deadline,
            };
        }
        AckOutcome::Done
    }

    /// An instance is gone: everything it holds is taken back at once, each a failed attempt
    /// (so that an event that crashes every instance still ends parked).
    pub fn release(&mut self, instance: u64, now: Ms) {
        let held: Vec<u64> = self
            .entries
            .iter()
            .filter(
                |(_, entry)| matches!(entry.stage, Stage::Out { instance: i, .. } if i == instance),
            )
            .map(|(&sequence, _)| sequence)
            .collect();
        for sequence in held {
            self.fail(sequence, now, Some("the instance went away".into()));
        }
    }

    /// Moves the consumer to admit from `from`: every lease is fenced (a new epoch), everything
    /// admitted and not finished is dropped; parked events stay parked.
    pub fn seek(&mut self, from: u64) {
        self.epoch = self.epoch.wrapping_add(1);
        self.entries.clear();
        self.chats.clear();
        self.ready.clear();
        self.timers.clear();
        self.out.clear();
        self.out_events = 0;
        self.out_bytes = 0;
        for parked in self.parked.values_mut() {
            parked.replaying = false;
        }
        self.admit_from = from;
    }

    /// Puts the parked events that `which` selects back at the head of their chats, in their
    /// original order (they leave the park once acknowledged). Returns how many.
    pub fn replay(&mut self, which: impl Fn(&Parked) -> bool, bytes: impl Fn(u64) -> u64) -> usize {
        let chosen: Vec<(u64, Option<i64>, u32)> = self
            .parked
            .values()
            .filter(|parked| !parked.replaying && which(parked))
            .map(|parked| (parked.sequence, parked.chat, parked.attempts))
            .collect();
        for &(sequence, chat, attempts) in &chosen {
            if let Some(parked) = self.parked.get_mut(&sequence) {
                parked.replaying = true;
            }
            if let Some(chat) = chat {
                if self.held_by_park.get(&chat) == Some(&sequence) {
                    // The replay goes first; the hold ends with it.
                    self.held_by_park.remove(&chat);
                }
            }
            self.insert(sequence, chat, bytes(sequence), Some(attempts));
        }
        chosen.len()
    }
}

#[cfg(test)]
mod tests;
