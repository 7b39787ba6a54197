//! The schedule against a model of its promises, under random admissions, pulls by several
//! instances, acks (current, stale, twice), nacks, extensions, expiries, releases, seeks and
//! replays; then everything is drained, and every event must end acknowledged once or parked.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Op {
    Admit {
        chat: Option<i64>,
        bytes: u64,
    },
    Pull {
        instance: u64,
        max: usize,
    },
    /// Acknowledges the n-th delivery handed out so far (an old one is stale or done).
    Ack(usize),
    Nack(usize),
    Extend(usize),
    Advance(Ms),
    Release(u64),
    Seek,
    ReplayAll,
    /// The schedule kept ([`Schedule::durable`]) and taken up again, as after a restart.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (prop::option::of(0i64..4), 1u64..3_000).prop_map(|(chat, bytes)| Op::Admit { chat, bytes }),
        4 => (0u64..3, 1usize..4).prop_map(|(instance, max)| Op::Pull { instance, max }),
        4 => any::<usize>().prop_map(Op::Ack),
        1 => any::<usize>().prop_map(Op::Nack),
        1 => any::<usize>().prop_map(Op::Extend),
        2 => (0i64..3_000).prop_map(Op::Advance),
        1 => (0u64..3).prop_map(Op::Release),
        1 => Just(Op::Seek),
        1 => Just(Op::ReplayAll),
        1 => Just(Op::Restart),
    ]
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        1u32..4,
        any::<bool>(),
        any::<bool>(),
        1usize..6,
        1usize..4,
        prop::collection::vec(0i64..2_000, 0..3),
    )
        .prop_map(
            |(max_deliveries, per_chat, hold_on_park, max_outstanding, per_instance, backoff)| {
                Settings {
                    ack_deadline: 1_000,
                    max_deliveries,
                    backoff,
                    per_chat,
                    hold_on_park,
                    max_outstanding,
                    max_outstanding_per_instance: per_instance,
                    max_outstanding_bytes: 4_000,
                }
            },
        )
}

/// What the model knows of an event of the current epoch.
#[derive(Debug, Clone, Default)]
struct Known {
    chat: Option<i64>,
    acked: bool,
    /// Attempts handed out, and whether the last is still live (not failed, acked or fenced).
    attempts: u32,
    parked: bool,
    /// Replays of it (each allows `max_deliveries` more attempts).
    replays: u32,
}

struct Model {
    settings: Settings,
    events: BTreeMap<u64, Known>,
    /// Every delivery handed out, in order (with the epoch's events at that time).
    handed: Vec<Delivery>,
    /// Per instance: deliveries it holds (sequence -> attempt), as far as the model knows.
    acks_done: BTreeSet<u64>,
}

impl Model {
    /// Checks a pull's deliveries against the promises.
    fn check_pull(&mut self, schedule: &Schedule, delivered: &[Delivery]) -> Result<(), String> {
        // The schedule parks what expired during the pull: learnt from it.
        for parked in schedule.parked() {
            if let Some(known) = self.events.get_mut(&parked.sequence) {
                if !parked.replaying {
                    known.parked = true;
                }
            }
        }
        for delivery in delivered {
            let Some(known) = self.events.get(&delivery.sequence) else {
                return Err(format!("{delivery:?}: not an event of this epoch"));
            };
            if known.acked {
                return Err(format!("{delivery:?}: handed out after its ack"));
            }
            if delivery.attempt > self.settings.max_deliveries * (1 + known.replays) {
                return Err(format!("{delivery:?}: past max_deliveries"));
            }
            if let (true, Some(chat)) = (self.settings.per_chat, known.chat) {
                // No earlier event of the chat is unfinished, unless it is a replay (a parked
                // event replayed goes right after the chat's current one, which holds the chat
                // until it is finished).
                for (&sequence, other) in self.events.range(..delivery.sequence) {
                    let replayed = other.replays > 0 && known.replays == 0;
                    if other.chat == Some(chat) && !other.acked && !other.parked && !replayed {
                        return Err(format!(
                            "{delivery:?}: handed out while {sequence} of chat {chat} is unfinished"
                        ));
                    }
                }
            }
        }
        let (events, bytes) = schedule.outstanding();
        if events > self.settings.max_outstanding {
            return Err(format!(
                "{events} out, over {}",
                self.settings.max_outstanding
            ));
        }
        if events > 1 && bytes > self.settings.max_outstanding_bytes {
            return Err(format!("{bytes} bytes out"));
        }
        Ok(())
    }
}

/// Per chat, the events out or waiting (never more than one with per-chat order).
fn busy_per_chat(schedule: &Schedule) -> HashMap<i64, usize> {
    let mut busy = HashMap::new();
    for entry in schedule.entries.values() {
        if let (Some(chat), false) = (entry.chat, entry.stage == Stage::Ready) {
            *busy.entry(chat).or_insert(0) += 1;
        }
    }
    busy
}

fn run(settings: Settings, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut schedule = Schedule::new(settings.clone(), 1);
    let mut model = Model {
        settings: settings.clone(),
        events: BTreeMap::new(),
        handed: Vec::new(),
        acks_done: BTreeSet::new(),
    };
    let mut now: Ms = 0;
    let pick =
        |handed: &[Delivery], n: usize| (!handed.is_empty()).then(|| handed[n % handed.len()]);
    for op in ops {
        match op {
            Op::Admit { chat, bytes } => {
                let sequence = schedule.admit_from() + u64::from(bytes % 3 == 0);
                schedule
                    .admit(Admitted {
                        sequence,
                        chat,
                        bytes,
                    })
                    .map_err(TestCaseError::fail)?;
                model.events.insert(
                    sequence,
                    Known {
                        chat,
                        ..Known::default()
                    },
                );
            }
            Op::Pull { instance, max } => {
                let delivered = schedule.pull(instance, max, now);
                prop_assert!(delivered.len() <= max);
                model
                    .check_pull(&schedule, &delivered)
                    .map_err(TestCaseError::fail)?;
                for delivery in &delivered {
                    let known = model.events.get_mut(&delivery.sequence).unwrap();
                    known.attempts += 1;
                    prop_assert_eq!(delivery.attempt, known.attempts, "{:?}", delivery);
                    known.parked = false;
                }
                model.handed.extend(delivered);
            }
            Op::Ack(n) => {
                let Some(delivery) = pick(&model.handed, n) else {
                    continue;
                };
                let before = schedule.pending();
                let outcome = schedule.ack(delivery.ack_id);
                let known = model.events.get(&delivery.sequence).cloned();
                let current = delivery.ack_id.epoch == schedule.epoch
                    && known
                        .as_ref()
                        .is_some_and(|k| k.attempts == delivery.attempt);
                match outcome {
                    AckOutcome::Done => {
                        prop_assert!(current, "an ack of {:?} was taken: not current", delivery);
                        prop_assert!(model.acks_done.insert(delivery.sequence), "acked twice");
                        let known = model.events.get_mut(&delivery.sequence).unwrap();
                        prop_assert!(!known.acked);
                        known.acked = true;
                        known.parked = false;
                        prop_assert_eq!(schedule.pending(), before - 1);
                    }
                    AckOutcome::Stale => {
                        prop_assert!(
                            !current || known.as_ref().is_some_and(|k| k.parked),
                            "a current ack of {:?} was stale",
                            delivery
                        );
                        prop_assert_eq!(schedule.pending(), before, "a stale ack changed nothing");
                    }
                    AckOutcome::AlreadyDone | AckOutcome::Unknown => {
                        prop_assert_eq!(schedule.pending(), before);
                        if current {
                            let k = known.unwrap();
                            prop_assert!(
                                k.acked || k.parked,
                                "{:?}: {:?} for a live event",
                                delivery,
                                outcome
                            );
                        }
                    }
                }
            }
            Op::Nack(n) | Op::Extend(n) => {
                let Some(delivery) = pick(&model.handed, n) else {
                    continue;
                };
                let extend = if matches!(op, Op::Nack(_)) { 0 } else { 500 };
                schedule.modify_deadline(delivery.ack_id, extend, now, Some("no".into()));
            }
            Op::Advance(ms) => {
                now += ms;
                schedule.tick(now);
            }
            Op::Release(instance) => schedule.release(instance, now),
            Op::Seek => {
                let from = schedule.admit_from();
                schedule.seek(from);
                // Unfinished events of the old epoch are no longer owed; parked stay parked
                // (a replay under way too: it is parked again).
                let parked: BTreeSet<u64> = schedule.parked().map(|p| p.sequence).collect();
                model.events.retain(|sequence, _| parked.contains(sequence));
                model.handed.clear();
            }
            Op::Restart => {
                let durable = schedule.durable();
                // What is kept reads back as it was written.
                let text = serde_json::to_string(&durable).unwrap();
                let read: Durable = serde_json::from_str(&text).unwrap();
                prop_assert_eq!(&read, &durable);
                let epoch = schedule.epoch;
                schedule = Schedule::restore(settings.clone(), read);
                prop_assert_ne!(schedule.epoch, epoch, "every lease before is stale");
            }
            Op::ReplayAll => {
                let chosen: Vec<Parked> = schedule
                    .parked()
                    .filter(|p| !p.replaying)
                    .cloned()
                    .collect();
                prop_assert_eq!(schedule.replay(|_| true, |_| 100), chosen.len());
                for parked in &chosen {
                    let known = model.events.entry(parked.sequence).or_insert(Known {
                        chat: parked.chat,
                        ..Known::default()
                    });
                    known.parked = false;
                    known.acked = false;
                    known.replays += 1;
                    known.attempts = parked.attempts;
                    model.acks_done.remove(&parked.sequence);
                }
            }
        }
        // Parked events, as the schedule says.
        for parked in schedule.parked() {
            if let Some(known) = model.events.get_mut(&parked.sequence) {
                if !parked.replaying {
                    known.parked = true;
                }
            }
        }
        if settings.per_chat {
            for (chat, busy) in busy_per_chat(&schedule) {
                prop_assert!(
                    busy <= 1,
                    "chat {} has {} events out or waiting",
                    chat,
                    busy
                );
            }
        }
        let (events, _) = schedule.outstanding();
        prop_assert!(events <= settings.max_outstanding);
    }
    // Drain: one instance acknowledges whatever it gets, time goes on; everything ends
    // acknowledged or parked, and nothing is handed out again after its ack.
    for _ in 0..10_000 {
        now += 5_000;
        let delivered = schedule.pull(7, 10, now);
        model
            .check_pull(&schedule, &delivered)
            .map_err(TestCaseError::fail)?;
        if delivered.is_empty() && schedule.pending() > 0 && schedule.next_due().is_none() {
            // Chats held by a parked event (`on_park: hold`) wait for an operator: replay.
            let chosen: Vec<Parked> = schedule
                .parked()
                .filter(|p| !p.replaying)
                .cloned()
                .collect();
            prop_assert!(!chosen.is_empty(), "stuck with nothing parked to replay");
            schedule.replay(|_| true, |_| 100);
            for parked in &chosen {
                let known = model.events.get_mut(&parked.sequence).unwrap();
                known.parked = false;
                known.replays += 1;
                known.attempts = parked.attempts;
            }
            continue;
        }
        for delivery in delivered {
            prop_assert_eq!(schedule.ack(delivery.ack_id), AckOutcome::Done);
            prop_assert!(model.acks_done.insert(delivery.sequence), "acked twice");
            model.events.get_mut(&delivery.sequence).unwrap().acked = true;
        }
        if schedule.pending() == 0 {
            break;
        }
    }
    prop_assert_eq!(schedule.pending(), 0, "everything is finished");
    let parked: BTreeSet<u64> = schedule.parked().map(|p| p.sequence).collect();
    for (sequence, known) in &model.events {
        prop_assert!(
            known.acked || parked.contains(sequence),
            "{} ended neither acknowledged nor parked",
            sequence
        );
        prop_assert!(
            !(known.acked && parked.contains(sequence)),
            "{} acked and parked",
            sequence
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_event_ends_acknowledged_once_or_parked_in_chat_order(
        settings in settings(),
        ops in prop::collection::vec(op(), 0..120),
    ) {
        run(settings, ops)?;
    }
}

#[test]
fn a_nacked_event_holds_its_chat_through_its_backoff_while_other_chats_flow() {
    let mut schedule = Schedule::new(
        Settings {
            backoff: vec![1_000],
            ..Settings::default()
        },
        1,
    );
    for (sequence, chat) in [(1, 10), (2, 10), (3, 20)] {
        schedule
            .admit(Admitted {
                sequence,
                chat: Some(chat),
                bytes: 10,
            })
            .unwrap();
    }
    let first = schedule.pull(1, 10, 0);
    assert_eq!(
        first.iter().map(|d| d.sequence).collect::<Vec<_>>(),
        [1, 3],
        "one per chat"
    );
    assert_eq!(
        schedule.modify_deadline(first[0].ack_id, 0, 0, None),
        AckOutcome::Done
    );
    assert!(
        schedule.pull(1, 10, 999).is_empty(),
        "chat 10 waits for the backoff"
    );
    assert_eq!(schedule.held_chats(), 2);
    let again = schedule.pull(2, 10, 1_000);
    assert_eq!(again.len(), 1);
    assert_eq!((again[0].sequence, again[0].attempt), (1, 2));
    // The first attempt's ack is stale now; the second's is taken, and the chat goes on.
    assert_eq!(schedule.ack(first[0].ack_id), AckOutcome::Stale);
    assert_eq!(schedule.ack(again[0].ack_id), AckOutcome::Done);
    assert_eq!(schedule.ack(again[0].ack_id), AckOutcome::AlreadyDone);
    let next = schedule.pull(2, 10, 1_000);
    assert_eq!(next.iter().map(|d| d.sequence).collect::<Vec<_>>(), [2]);
}

#[test]
fn an_ack_after_the_deadline_is_taken_until_a_newer_attempt_is_handed_out() {
    let mut schedule = Schedule::new(
        Settings {
            ack_deadline: 100,
            backoff: vec![1_000],
            ..Settings::default()
        },
        1,
    );
    schedule
        .admit(Admitted {
            sequence: 1,
            chat: None,
            bytes: 1,
        })
        .unwrap();
    let late = schedule.pull(1, 1, 0)[0];
    schedule.tick(500);
    assert_eq!(
        schedule.ack(late.ack_id),
        AckOutcome::Done,
        "no newer attempt yet"
    );
    assert!(
        schedule.pull(1, 1, 5_000).is_empty(),
        "the retry was cancelled"
    );

    schedule
        .admit(Admitted {
            sequence: 2,
            chat: None,
            bytes: 1,
        })
        .unwrap();
    let first = schedule.pull(1, 1, 5_000)[0];
    let second = schedule.pull(2, 1, 10_000)[0];
    assert_eq!(second.attempt, 2);
    assert_eq!(schedule.ack(first.ack_id), AckOutcome::Stale);
    assert_eq!(schedule.pending(), 1, "the stale ack changed nothing");
}

#[test]
fn a_poison_event_is_parked_after_its_attempts_and_replayed_at_the_head_of_its_chat() {
    for hold in [false, true] {
        let mut schedule = Schedule::new(
            Settings {
                max_deliveries: 2,
                backoff: vec![],
                hold_on_park: hold,
                ..Settings::default()
            },
            1,
        );
        for sequence in 1..=3 {
            schedule
                .admit(Admitted {
                    sequence,
                    chat: Some(5),
                    bytes: 1,
                })
                .unwrap();
        }
        // An instance that crashes on event 1, twice: released each time.
        for attempt in 1..=2 {
            let got = schedule.pull(attempt, 1, 0);
            assert_eq!((got[0].sequence, got[0].attempt), (1, attempt as u32));
            schedule.release(attempt, 0);
        }
        assert_eq!(schedule.parked().count(), 1);
        let next = schedule.pull(9, 1, 0);
        if hold {
            assert!(next.is_empty(), "on_park hold keeps the chat held");
        } else {
            assert_eq!(next[0].sequence, 2);
            assert_eq!(next[0].parked_before, 1, "names the parked event before it");
            assert_eq!(schedule.ack(next[0].ack_id), AckOutcome::Done);
        }
        assert_eq!(schedule.replay(|p| p.sequence == 1, |_| 1), 1);
        let replayed = schedule.pull(9, 1, 0);
        assert_eq!(replayed[0].sequence, 1, "the replay goes first");
        assert_eq!(
            schedule.parked().count(),
            1,
            "parked until the replay is acknowledged"
        );
        assert_eq!(schedule.ack(replayed[0].ack_id), AckOutcome::Done);
        assert_eq!(schedule.parked().count(), 0);
        let rest: Vec<u64> = schedule.pull(9, 10, 0).iter().map(|d| d.sequence).collect();
        assert_eq!(rest, if hold { vec![2] } else { vec![3] });
    }
}

#[test]
fn ack_ids_read_back_and_refuse_other_text() {
    let id = AckId {
        epoch: 3,
        sequence: 1 << 40,
        attempt: 2,
    };
    assert_eq!(id.to_string().parse::<AckId>(), Ok(id));
    for bad in ["", "1.2", "1.2.3.4", "a.b.c", "1.-2.3", "99999999999.1.1"] {
        assert!(bad.parse::<AckId>().is_err(), "{bad}");
    }
}
