//! Unit tests of filters and of a subscription's cursor over a [`MemoryLog`] and a [`Hub`].

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;
use tokio::sync::watch;

use super::*;
use crate::log::memory::MemoryLog;
use crate::log::{EventLog, NewRecord};
use crate::wire::StoredEvent;

fn keys(event_id: i64, event_type: &str) -> Keys {
    Keys {
        event_id,
        event_type: event_type.to_owned(),
        actor: "user".to_owned(),
        chat_id: Some(10),
        client_id: Some(20),
        user_id: None,
        project_id: Some(1),
        channel_id: Some(2),
    }
}

#[test]
fn an_empty_filter_matches_everything() {
    assert!(Filter::default().matches(&keys(1, "chat_closed")));
    assert!(Filter::default().matches(&Keys::default()));
}

#[test]
fn values_within_a_field_combine_with_or() {
    let filter = Filter {
        event_types: vec!["message_created".into(), "chat_closed".into()],
        ..Filter::default()
    };
    assert!(filter.matches(&keys(1, "chat_closed")));
    assert!(filter.matches(&keys(1, "message_created")));
    assert!(!filter.matches(&keys(1, "typing")));
    let filter = Filter {
        chat_ids: vec![9, 10],
        ..Filter::default()
    };
    assert!(filter.matches(&keys(1, "typing")));
    let filter = Filter {
        chat_ids: vec![9, 11],
        ..Filter::default()
    };
    assert!(!filter.matches(&keys(1, "typing")));
}

#[test]
fn fields_combine_with_and() {
    let filter = Filter {
        event_types: vec!["chat_closed".into()],
        project_ids: vec![1],
        actors: vec!["user".into(), "client".into()],
        ..Filter::default()
    };
    assert!(filter.matches(&keys(1, "chat_closed")));
    assert!(!filter.matches(&keys(1, "typing")), "type fails");
    let mut other_project = keys(1, "chat_closed");
    other_project.project_id = Some(2);
    assert!(!filter.matches(&other_project), "project fails");
    let mut system = keys(1, "chat_closed");
    system.actor = "system".into();
    assert!(!filter.matches(&system), "actor fails");
}

#[test]
fn an_id_filter_never_matches_an_event_without_that_id() {
    // user_id is None in `keys`: asking for users excludes events with no user.
    let filter = Filter {
        user_ids: vec![0],
        ..Filter::default()
    };
    assert!(!filter.matches(&keys(1, "chat_closed")));
    for filter in [
        Filter {
            channel_ids: vec![2],
            ..Filter::default()
        },
        Filter {
            client_ids: vec![20],
            ..Filter::default()
        },
    ] {
        assert!(filter.matches(&keys(1, "chat_closed")), "{filter:?}");
        assert!(!filter.matches(&Keys::default()), "{filter:?}");
    }
}

#[test]
fn the_anonymous_actor_is_the_empty_string() {
    let filter = Filter {
        actors: vec![String::new()],
        ..Filter::default()
    };
    let mut anonymous = keys(1, "typing");
    anonymous.actor = String::new();
    assert!(filter.matches(&anonymous));
    assert!(!filter.matches(&keys(1, "typing")));
}

/// A log, a hub over it and the shutdown switch, as the gateway wires them.
struct Fixture {
    log: Arc<MemoryLog>,
    hub: Hub,
    shutdown: watch::Sender<bool>,
    registry: Registry,
}

impl Fixture {
    fn new(max_records: Option<usize>, hub_capacity: usize) -> Self {
        let log = Arc::new(MemoryLog::new(max_records));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let hub = Hub::start(log.clone(), hub_capacity, shutdown_rx);
        Self {
            log,
            hub,
            shutdown,
            registry: Registry::new(100),
        }
    }

    async fn subscribe(
        &self,
        filter: Filter,
        start: Start,
    ) -> Result<Subscription, SubscribeError> {
        Subscription::new(
            self.log.clone(),
            &self.hub,
            &self.registry,
            self.shutdown.subscribe(),
            filter,
            start,
            None,
        )
        .await
    }

    /// Appends events `ids` (type "t{id % 3}", received at `id * 1000` ms); returns sequences.
    async fn append(&self, ids: impl IntoIterator<Item = i64>) -> Vec<u64> {
        let records = ids
            .into_iter()
            .map(|id| {
                let stored = StoredEvent {
                    envelope: Bytes::new(),
                    raw_json: Bytes::from(format!("{{\"id\":{id}}}")),
                    keys: Some(Keys {
                        event_type: format!("t{}", id % 3),
                        ..keys(id, "")
                    }),
                    deviations: Bytes::new(),
                    references: Bytes::new(),
                };
                NewRecord {
                    event_id: Some(id),
                    received_at_ms: id * 1000,
                    payload: stored.encode_to_vec().into(),
                }
            })
            .collect();
        self.log
            .append_all(records)
            .await
            .expect("memory log appends")
            .into_iter()
            .map(|appended| appended.sequence)
            .collect()
    }
}

async fn next(subscription: &mut Subscription) -> Arc<EncodedEvent> {
    tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("an event within 10 s")
        .expect("the subscription goes on")
}

/// The next `n` events as (sequence, event id).
async fn take(subscription: &mut Subscription, n: usize) -> Vec<(u64, i64)> {
    let mut got = Vec::with_capacity(n);
    for _ in 0..n {
        let event = next(subscription).await;
        got.push((event.sequence, event.keys.event_id));
    }
    got
}

/// Nothing arrives within a short while.
async fn assert_quiet(subscription: &mut Subscription) {
    if let Ok(result) = tokio::time::timeout(Duration::from_millis(100), subscription.next()).await
    {
        panic!("expected nothing, got {result:?}");
    }
}

#[tokio::test]
async fn live_start_skips_what_was_stored_before() {
    let fixture = Fixture::new(None, 16);
    fixture.append([1, 2]).await;
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::Live)
        .await
        .unwrap();
    assert_eq!(subscription.position(), 3);
    fixture.append([3, 4]).await;
    assert_eq!(take(&mut subscription, 2).await, vec![(3, 3), (4, 4)]);
    assert_quiet(&mut subscription).await;
}

/// The hub skips the log while nobody listens; a subscriber attaching while events arrive must
/// still get every one of them at once (from the log or the tail), not when a later event comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_attaching_while_nobody_listens_misses_nothing() {
    let fixture = Arc::new(Fixture::new(None, 16));
    let mut id = 0;
    for _ in 0..100 {
        let first = id + 1;
        id += 5;
        let appender = {
            let fixture = fixture.clone();
            tokio::spawn(async move {
                for id in first..=first + 4 {
                    fixture.append([id]).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut subscription = fixture
            .subscribe(Filter::default(), Start::Live)
            .await
            .unwrap();
        let last = u64::try_from(id).unwrap();
        // Read while the events arrive, so the subscription reaches the live tail meanwhile.
        let reader = tokio::spawn(async move {
            while subscription.position() <= last {
                let event = tokio::time::timeout(Duration::from_secs(2), subscription.next())
                    .await
                    .expect("every stored event arrives without waiting for a later one")
                    .unwrap();
                assert!(event.sequence <= last);
            }
        });
        appender.await.unwrap();
        reader.await.unwrap();
    }
}

#[tokio::test]
async fn beginning_start_replays_everything_then_follows_the_tail() {
    let fixture = Fixture::new(None, 16);
    fixture.append(1..=3).await;
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(
        take(&mut subscription, 3).await,
        vec![(1, 1), (2, 2), (3, 3)]
    );
    fixture.append([4]).await;
    assert_eq!(take(&mut subscription, 1).await, vec![(4, 4)]);
}

#[tokio::test]
async fn beginning_start_on_an_empty_log_waits_for_the_first_event() {
    let fixture = Fixture::new(None, 16);
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::Beginning)
        .await
        .unwrap();
    assert_quiet(&mut subscription).await;
    fixture.append([7]).await;
    assert_eq!(take(&mut subscription, 1).await, vec![(1, 7)]);
}

#[tokio::test]
async fn after_start_resumes_after_the_given_sequence() {
    let fixture = Fixture::new(None, 16);
    fixture.append(1..=5).await;
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::After(3))
        .await
        .unwrap();
    assert_eq!(take(&mut subscription, 2).await, vec![(4, 4), (5, 5)]);
    fixture.append([6]).await;
    assert_eq!(take(&mut subscription, 1).await, vec![(6, 6)]);

    let mut at_end = fixture
        .subscribe(Filter::default(), Start::After(6))
        .await
        .unwrap();
    assert_quiet(&mut at_end).await;
    fixture.append([7]).await;
    assert_eq!(take(&mut at_end, 1).await, vec![(7, 7)]);
    // A cursor beyond the end of the log: a_cursor_ahead_of_the_log_is_refused_after_a_grace...
}

#[tokio::test]
async fn since_start_begins_at_the_first_event_received_at_or_after_the_time() {
    let fixture = Fixture::new(None, 16);
    fixture.append(1..=4).await; // received at 1000, 2000, 3000, 4000 ms
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::Since(2500))
        .await
        .unwrap();
    assert_eq!(take(&mut subscription, 2).await, vec![(3, 3), (4, 4)]);
    let mut exact = fixture
        .subscribe(Filter::default(), Start::Since(2000))
        .await
        .unwrap();
    assert_eq!(take(&mut exact, 1).await, vec![(2, 2)]);
    let mut future = fixture
        .subscribe(Filter::default(), Start::Since(1_000_000))
        .await
        .unwrap();
    // Received at 5 s, long before the time asked for: not "at or after" it.
    fixture.append([5]).await;
    assert_quiet(&mut future).await;
}

#[tokio::test]
async fn a_filtered_subscription_skips_non_matching_events_in_catch_up_and_live() {
    let fixture = Fixture::new(None, 16);
    fixture.append(1..=9).await;
    let filter = Filter {
        event_types: vec!["t0".into()],
        ..Filter::default()
    };
    let mut subscription = fixture.subscribe(filter, Start::Beginning).await.unwrap();
    assert_eq!(
        take(&mut subscription, 3).await,
        vec![(3, 3), (6, 6), (9, 9)]
    );
    fixture.append(10..=12).await;
    assert_eq!(take(&mut subscription, 1).await, vec![(12, 12)]);
    assert_quiet(&mut subscription).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_lagging_behind_a_tiny_hub_gets_every_event_in_order() {
    const EVENTS: i64 = 1000;
    let fixture = Arc::new(Fixture::new(None, 4));
    let mut live = fixture
        .subscribe(Filter::default(), Start::Live)
        .await
        .unwrap();
    let mut from_start = fixture
        .subscribe(Filter::default(), Start::Beginning)
        .await
        .unwrap();
    let writer = {
        let fixture = fixture.clone();
        tokio::spawn(async move {
            for chunk in (1..=EVENTS).collect::<Vec<_>>().chunks(7) {
                fixture.append(chunk.iter().copied()).await;
                tokio::task::yield_now().await;
            }
        })
    };
    let mut got = Vec::new();
    for i in 0..EVENTS {
        // Read slowly now and then so the tail overruns the subscriber.
        if i % 100 == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let event = next(&mut live).await;
        got.push((event.sequence, event.keys.event_id));
    }
    writer.await.expect("writer finished");
    let want: Vec<(u64, i64)> = (1..=EVENTS).map(|id| (id as u64, id)).collect();
    assert_eq!(got, want, "live subscriber: gaps, repeats or reordering");
    assert_eq!(
        take(&mut from_start, EVENTS as usize).await,
        want,
        "subscriber that read nothing until the end"
    );
    assert_quiet(&mut live).await;
    assert_quiet(&mut from_start).await;
}

#[tokio::test]
async fn a_stalled_live_subscriber_falls_back_to_the_log_and_rejoins_the_tail() {
    const EVENTS: i64 = 1000;
    let fixture = Fixture::new(None, 4);
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::Live)
        .await
        .unwrap();
    // Attach to the tail: the (empty) catch-up is done, the cursor now waits on the hub.
    assert_quiet(&mut subscription).await;
    for id in 1..=EVENTS {
        fixture.append([id]).await;
        // Let the hub broadcast each one: 1,000 events through a buffer of 4.
        tokio::task::yield_now().await;
    }
    let want: Vec<(u64, i64)> = (1..=EVENTS).map(|id| (id as u64, id)).collect();
    assert_eq!(take(&mut subscription, EVENTS as usize).await, want);
    fixture.append([EVENTS + 1]).await;
    assert_eq!(
        take(&mut subscription, 1).await,
        vec![(EVENTS as u64 + 1, EVENTS + 1)]
    );
    assert_eq!(fixture.hub.receivers(), 1);
}

#[tokio::test]
async fn after_a_sequence_older_than_retention_is_an_explicit_truncation() {
    let fixture = Fixture::new(Some(2), 16);
    fixture.append(1..=5).await; // sequences 4 and 5 retained
    for start in [Start::After(0), Start::After(2)] {
        match fixture.subscribe(Filter::default(), start).await {
            Err(SubscribeError::Log(LogError::Truncated { oldest, .. })) => assert_eq!(oldest, 4),
            Err(other) => panic!("{start:?}: expected Truncated, got {other}"),
            Ok(_) => panic!("{start:?}: expected Truncated, got a subscription"),
        }
    }
    // Resuming right before the oldest retained event is not a gap.
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::After(3))
        .await
        .unwrap();
    assert_eq!(take(&mut subscription, 2).await, vec![(4, 4), (5, 5)]);
    let mut beginning = fixture
        .subscribe(Filter::default(), Start::Beginning)
        .await
        .unwrap();
    assert_eq!(take(&mut beginning, 1).await, vec![(4, 4)]);
}

#[tokio::test]
async fn from_the_beginning_starts_at_the_oldest_left_when_retention_runs_before_the_first_read() {
    let fixture = Fixture::new(Some(4), 16);
    fixture.append(1..=3).await;
    // Positioned at 1; retention then removes 1 and 2, which were stored before it began.
    let mut beginning = fixture
        .subscribe(Filter::default(), Start::Beginning)
        .await
        .unwrap();
    fixture.append(4..=6).await;
    assert_eq!(
        take(&mut beginning, 4).await,
        vec![(3, 3), (4, 4), (5, 5), (6, 6)]
    );
}

#[tokio::test]
async fn from_the_beginning_is_told_when_retention_removed_events_stored_after_it_began() {
    let fixture = Fixture::new(Some(2), 16);
    let mut beginning = fixture
        .subscribe(Filter::default(), Start::Beginning)
        .await
        .unwrap();
    fixture.append(1..=5).await; // 1..=3 removed, all stored after it began
    match tokio::time::timeout(Duration::from_secs(10), beginning.next()).await {
        Ok(Err(SubscribeError::Log(LogError::Truncated { requested, oldest }))) => {
            assert_eq!((requested, oldest), (1, 4));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[tokio::test]
async fn a_subscriber_overtaken_by_retention_is_told_instead_of_skipping() {
    let fixture = Fixture::new(Some(8), 4);
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::Beginning)
        .await
        .unwrap();
    fixture.append([1]).await;
    assert_eq!(take(&mut subscription, 1).await, vec![(1, 1)]);
    // 100 more while it reads nothing: the hub (4) overflows and retention (8) drops 2..=93.
    for id in 2..=101 {
        fixture.append([id]).await;
    }
    let result = tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .expect("an answer within 10 s");
    match result {
        Err(SubscribeError::Log(LogError::Truncated {
            requested, oldest, ..
        })) => {
            assert_eq!(requested, 2);
            assert_eq!(oldest, 94);
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

#[tokio::test]
async fn shutdown_ends_a_waiting_subscription() {
    let fixture = Fixture::new(None, 4);
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::Live)
        .await
        .unwrap();
    let waiting = tokio::spawn(async move { subscription.next().await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    fixture.shutdown.send_replace(true);
    let result = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("ends within 5 s")
        .expect("task ran");
    assert!(
        matches!(result, Err(SubscribeError::ShuttingDown)),
        "{result:?}"
    );
}

#[tokio::test]
async fn since_a_time_in_the_future_skips_events_received_before_it() {
    let fixture = Fixture::new(None, 16);
    fixture.append([1, 2]).await;
    // Received at 1 s and 2 s; ask for events from 4 s on.
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::Since(4_000))
        .await
        .unwrap();
    fixture.append([3]).await;
    assert_quiet(&mut subscription).await;
    fixture.append([4, 5]).await;
    assert_eq!(take(&mut subscription, 2).await, vec![(4, 4), (5, 5)]);
}

#[tokio::test(start_paused = true)]
async fn a_cursor_ahead_of_the_log_is_refused_after_a_grace_and_served_if_the_log_reaches_it() {
    let fixture = Fixture::new(None, 16);
    fixture.append([1, 2]).await;
    match fixture.subscribe(Filter::default(), Start::After(5)).await {
        Err(SubscribeError::Ahead { requested, newest }) => {
            assert_eq!((requested, newest), (5, 2));
        }
        other => panic!("expected Ahead, got {:?}", other.map(|s| s.position())),
    }
    // A cursor one event ahead (another replica served it a moment earlier) waits for it.
    let fixture = Arc::new(fixture);
    let appender = {
        let fixture = fixture.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            fixture.append([3, 4]).await;
        })
    };
    let mut subscription = fixture
        .subscribe(Filter::default(), Start::After(3))
        .await
        .expect("the log reaches the cursor within the grace");
    appender.await.unwrap();
    assert_eq!(take(&mut subscription, 1).await, vec![(4, 4)]);
    // At the end exactly: accepted at once.
    let at_end = fixture
        .subscribe(Filter::default(), Start::After(4))
        .await
        .unwrap();
    assert_eq!(at_end.position(), 5);
}

/// A filtered stream's position counts the events its filter skips: when retention removes
/// events it has not looked at yet, it is told, even if none of them would have passed its
/// filter (a removed event's type is unknown). The model test's memory-store case (tests/model.rs
/// `found`) ended this way under load, where the gateway's side of a stream ran late.
#[tokio::test]
async fn a_filtered_subscriber_is_told_when_retention_removed_events_its_filter_would_skip() {
    let fixture = Fixture::new(Some(4), 2);
    let wanted = Filter {
        event_types: vec!["t0".into()],
        ..Filter::default()
    };
    let mut subscription = fixture.subscribe(wanted, Start::After(0)).await.unwrap();
    fixture.append([3]).await; // t0, sequence 1
    assert_eq!(take(&mut subscription, 1).await, vec![(1, 3)]);
    // Eight events of other types while it reads nothing: the hub (2) overflows and retention
    // (4) removes sequences 2..=5.
    for id in [1, 2, 4, 5, 7, 8, 10, 11] {
        fixture.append([id]).await;
    }
    match tokio::time::timeout(Duration::from_secs(10), subscription.next()).await {
        Ok(Err(SubscribeError::Log(LogError::Truncated { requested, oldest }))) => {
            assert_eq!((requested, oldest), (2, 6));
        }
        other => panic!("expected Truncated, got {other:?}"),
    }
}

/// A log that counts the reads running at once (each takes a moment).
struct Counting {
    inner: Arc<MemoryLog>,
    running: std::sync::atomic::AtomicUsize,
    most: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl EventLog for Counting {
    async fn append(&self, records: Vec<NewRecord>) -> Vec<Result<crate::log::Appended, LogError>> {
        self.inner.append(records).await
    }
    async fn read(&self, from: u64, limit: usize) -> Result<Vec<crate::log::Record>, LogError> {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(2)).await;
        let records = self.inner.read(from, limit).await;
        self.running.fetch_sub(1, Ordering::SeqCst);
        records
    }
    async fn find_event(&self, event_id: i64) -> Result<Option<u64>, LogError> {
        self.inner.find_event(event_id).await
    }
    async fn seek_time(&self, at_ms: i64) -> Result<u64, LogError> {
        self.inner.seek_time(at_ms).await
    }
    fn identity(&self) -> String {
        "test".into()
    }

    fn bounds(&self) -> crate::log::Bounds {
        self.inner.bounds()
    }
    fn committed(&self) -> watch::Receiver<u64> {
        self.inner.committed()
    }
}

/// Many subscribers catching up with a filter that matches nothing run at most
/// `--catch-up-reads` reads at once, whatever their number: catch-up cannot take the CPU ingest
/// needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catch_up_reads_run_at_most_the_configured_number_at_once() {
    let fixture = Fixture::new(None, 16);
    fixture.append(1..=3000).await;
    let counting = Arc::new(Counting {
        inner: fixture.log.clone(),
        running: Default::default(),
        most: Default::default(),
    });
    let registry = Registry::with_limits(1000, 64 << 20, 2);
    let nothing = Filter {
        event_types: vec!["never".into()],
        ..Filter::default()
    };
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut subscription = Subscription::new(
            counting.clone(),
            &fixture.hub,
            &registry,
            fixture.shutdown.subscribe(),
            nothing.clone(),
            Start::Beginning,
            None,
        )
        .await
        .unwrap();
        tasks.push(tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(8), subscription.next()).await;
            subscription.position()
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), 3001, "every scan reached the end");
    }
    let most = counting.most.load(Ordering::SeqCst);
    assert!(most <= 2, "{most} catch-up reads ran at once");
}

/// What subscriptions hold is counted in the budget until the stream lets go of each event's
/// permit, and a subscription whose budget is spent waits instead of reading more.
#[tokio::test]
async fn what_subscriptions_hold_stays_within_the_budget() {
    let fixture = Fixture::new(None, 16);
    fixture.append(1..=200).await;
    let registry = Registry::with_limits(100, 8 * 1024, 2);
    let mut subscription = Subscription::new(
        fixture.log.clone(),
        &fixture.hub,
        &registry,
        fixture.shutdown.subscribe(),
        Filter::default(),
        Start::Beginning,
        None,
    )
    .await
    .unwrap();
    let mut kept = Vec::new();
    let mut got = 0;
    // Keep every permit: the stream never lets go, like a client that stopped reading.
    while let Ok(Ok(_)) =
        tokio::time::timeout(Duration::from_millis(200), subscription.next()).await
    {
        kept.extend(subscription.take_permit());
        got += 1;
        assert!(
            registry.held_bytes() <= 8 * 1024,
            "{}",
            registry.held_bytes()
        );
    }
    assert!(
        got > 0 && got < 200,
        "stopped at the budget after {got} events"
    );
    drop(kept);
    assert_eq!(
        take(&mut subscription, 1).await.len(),
        1,
        "goes on once given back"
    );
}
