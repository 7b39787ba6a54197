//! Faults on a real three-node NATS cluster (issue 13.2): an R3 stream, two gateway replicas,
//! a live subscriber on each and concurrent ingest into both (fresh events and redeliveries of
//! acknowledged ones, through the other replica), while the test SIGKILLs the stream leader,
//! SIGSTOPs a follower and resumes it, restarts a node, and finally takes the quorum away and
//! gives it back.
//!
//! Checked at the end, against the stream read directly from NATS:
//! - every acknowledged event is in the stream, once, at the sequence its answer named, and a
//!   redelivery is answered with that same sequence;
//! - the stream's sequences are gapless: one global order;
//! - each replica's subscriber (resuming from its cursor whenever its stream breaks) saw exactly
//!   that order, gapless, with nothing repeated;
//! - with no quorum, nothing sent is answered 200 (only 503), and ingest recovers by itself once
//!   the quorum is back; with a quorum, 503s are confined to a short failover after each fault.

mod binary;
mod nats;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use binary::{event, Process};
use iqchannels_gateway::pb::client::event_gateway_client::EventGatewayClient;
use iqchannels_gateway::pb::client::{subscribe_request::Start, SubscribeRequest};
use nats::cluster::Cluster;

const STREAM: &str = "IQGW_FAULTS";
/// How long ingest may keep failing after a fault while a quorum exists (client failover from a
/// dead or frozen node, stream leader election).
const FAILOVER: Duration = Duration::from_secs(20);
/// How long ingest may take to recover once a lost quorum is back.
const QUORUM_RECOVERY: Duration = Duration::from_secs(60);

/// One answer to a POST: when it was sent and answered, and what it said.
#[derive(Debug, Clone)]
struct Answer {
    id: i64,
    replica: usize,
    sent: Instant,
    answered: Instant,
    outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Stored {
        sequence: u64,
        duplicate: bool,
    },
    /// 503, with what the answer said.
    Unavailable(String),
    /// Anything else: another status, a broken connection, a timeout.
    Other(String),
}

async fn post(http: &reqwest::Client, gateway: &str, id: i64) -> Outcome {
    let response = http
        .post(format!("{gateway}/v1/events"))
        .header("content-type", "application/json")
        .body(event(id))
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(error) => return Outcome::Other(format!("request failed: {error}")),
    };
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    match (status, body["sequence"].as_u64()) {
        (200, Some(sequence)) => Outcome::Stored {
            sequence,
            duplicate: body["duplicate"].as_bool().unwrap_or(false),
        },
        (503, _) => Outcome::Unavailable(body.to_string()),
        _ => Outcome::Other(format!("{status} {body}")),
    }
}

/// A writer: fresh ids `first, first + step, ...` into `replica`, each retried until stored;
/// every fifth acknowledged id is redelivered through the other replica.
fn spawn_writer(
    gateways: Arc<Vec<String>>,
    replica: usize,
    first: i64,
    step: i64,
    answers: Arc<Mutex<Vec<Answer>>>,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("an HTTP client");
        let mut id = first;
        while !stop.load(Ordering::Relaxed) {
            let mut target = replica;
            loop {
                let sent = Instant::now();
                let outcome = post(&http, &gateways[target], id).await;
                let stored = matches!(outcome, Outcome::Stored { .. });
                answers.lock().unwrap().push(Answer {
                    id,
                    replica: target,
                    sent,
                    answered: Instant::now(),
                    outcome,
                });
                if stored && (id % 5 != 0 || target != replica) {
                    break;
                }
                if stored {
                    target = 1 - replica; // redeliver through the other replica
                } else if stop.load(Ordering::Relaxed) {
                    break;
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            id += step;
        }
    })
}

/// What a subscriber saw: `(sequence, event id)` in order, and every break of its stream.
#[derive(Default)]
struct Seen {
    events: Vec<(u64, i64)>,
    breaks: Vec<String>,
    violations: Vec<String>,
}

/// Subscribes to `gateway` from the beginning and, whenever the stream ends or fails, resumes
/// after the last sequence received, as a client should.
fn spawn_subscriber(gateway: String, seen: Arc<Mutex<Seen>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let last = seen.lock().unwrap().events.last().map(|e| e.0);
            let start = match last {
                Some(sequence) => Start::AfterSequence(sequence),
                None => Start::Beginning(()),
            };
            let Ok(mut client) = EventGatewayClient::connect(gateway.clone()).await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            let request = SubscribeRequest {
                start: Some(start),
                ..SubscribeRequest::default()
            };
            let mut stream = match client.subscribe(request).await {
                Ok(response) => response.into_inner(),
                Err(status) => {
                    seen.lock()
                        .unwrap()
                        .breaks
                        .push(format!("refused: {status}"));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(event)) => {
                        let id = event
                            .envelope
                            .and_then(|e| e.chat_event)
                            .map_or(-1, |c| c.id);
                        let mut seen = seen.lock().unwrap();
                        let expected = seen.events.last().map_or(1, |e| e.0 + 1);
                        if event.sequence != expected {
                            let message =
                                format!("sequence {} where {expected} was due", event.sequence);
                            seen.violations.push(message);
                        }
                        seen.events.push((event.sequence, id));
                    }
                    Ok(None) => {
                        seen.lock().unwrap().breaks.push("ended".into());
                        break;
                    }
                    Err(status) => {
                        seen.lock().unwrap().breaks.push(format!("{status}"));
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Every message of the stream, read from NATS: sequence -> event id (from its subject).
async fn stream_contents(admin: &async_nats::jetstream::Context) -> BTreeMap<u64, i64> {
    let mut stream = admin.get_stream(STREAM).await.expect("the stream exists");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let mut contents = BTreeMap::new();
    for sequence in 1..=last {
        // A node that has just come back may answer "temporarily unavailable": ask again.
        let mut attempts = 0;
        let message = loop {
            match stream.get_raw_message(sequence).await {
                Ok(message) => break message,
                Err(error) if attempts < 50 && error.to_string().contains("temporarily") => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(error) => panic!("sequence {sequence} of {last} is missing: {error}"),
            }
        };
        // The event's id is its message id (its subject names only its id's bucket).
        let id = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .and_then(|id| id.as_str().parse().ok())
            .unwrap_or(-1);
        contents.insert(sequence, id);
    }
    contents
}

/// Waits (up to `within`) until a write through each replica is stored; the time it took, or
/// the last answer.
async fn until_ingest_works(
    gateways: &[String],
    probe_id: &mut i64,
    within: Duration,
    answers: &Mutex<Vec<Answer>>,
) -> Result<Duration, String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("an HTTP client");
    let started = Instant::now();
    for (replica, gateway) in gateways.iter().enumerate() {
        loop {
            *probe_id += 1;
            let sent = Instant::now();
            let outcome = post(&http, gateway, *probe_id).await;
            let stored = matches!(outcome, Outcome::Stored { .. });
            if !stored && started.elapsed() >= within {
                return Err(format!(
                    "ingest through {gateway} did not recover within {within:?}: {outcome:?}"
                ));
            }
            answers.lock().unwrap().push(Answer {
                id: *probe_id,
                replica,
                sent,
                answered: Instant::now(),
                outcome,
            });
            if stored {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    Ok(started.elapsed())
}

/// The stream's leader and replicas, as NATS reports them.
async fn stream_state(admin: &async_nats::jetstream::Context) -> String {
    let info = tokio::time::timeout(Duration::from_secs(3), async {
        admin
            .get_stream(STREAM)
            .await
            .ok()?
            .info()
            .await
            .ok()
            .map(|i| i.cluster.clone())
    })
    .await;
    format!("stream cluster: {info:?}")
}

/// Waits until the stream has a leader and every replica is current: each fault starts from a
/// healthy cluster.
async fn healthy(cluster: &Cluster, admin: &async_nats::jetstream::Context) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let cluster_info = tokio::time::timeout(Duration::from_secs(3), async {
            admin
                .get_stream(STREAM)
                .await
                .ok()?
                .info()
                .await
                .ok()?
                .cluster
                .clone()
        })
        .await
        .ok()
        .flatten();
        if let Some(info) = &cluster_info {
            if info.leader.is_some()
                && info.replicas.len() == 2
                && info.replicas.iter().all(|r| r.current && !r.offline)
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{}",
            cluster.failure(&format!("the stream did not recover: {cluster_info:?}"))
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Adds to the timeline, and prints it at once (a failure shows how far the test got).
fn note(timeline: &mut Vec<String>, line: String) {
    eprintln!("[cluster faults] {line}");
    timeline.push(line);
}

/// Probes ingest after each fault, and keeps the timeline.
struct Probe {
    gateways: Arc<Vec<String>>,
    answers: Arc<Mutex<Vec<Answer>>>,
    /// The next probe's id, far from the writers'.
    next_id: i64,
    timeline: Vec<String>,
}

impl Probe {
    /// Waits (up to `limit`) until ingest works again, then notes the stream's state and `what`
    /// of how long it took; a failure panics with the stream's state and the nodes' logs.
    async fn back(
        &mut self,
        cluster: &Cluster,
        admin: &async_nats::jetstream::Context,
        limit: Duration,
        what: impl FnOnce(Duration) -> String,
    ) {
        let took = match until_ingest_works(&self.gateways, &mut self.next_id, limit, &self.answers)
            .await
        {
            Ok(took) => took,
            Err(error) => {
                let state = stream_state(admin).await;
                panic!("{}", cluster.failure(&format!("{error}\n{state}")))
            }
        };
        note(&mut self.timeline, stream_state(admin).await);
        note(&mut self.timeline, what(took));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_events_survive_leader_kills_frozen_followers_restarts_and_lost_quorum() {
    let Some(mut cluster) = Cluster::start().await else {
        return;
    };
    let admin = cluster.admin().await;
    let store = cluster.store_url();
    let args = [
        "--store",
        &store,
        "--nats-replicas",
        "3",
        "--nats-stream",
        STREAM,
        "--nats-subject-prefix",
        "iqgw.faults",
        "--nats-ack-timeout",
        "2s",
    ];
    let replicas = [Process::start(&args), Process::start(&args)];
    let gateways: Arc<Vec<String>> = Arc::new(
        replicas
            .iter()
            .map(|p| format!("http://{}", p.addr))
            .collect(),
    );

    // Before the clock starts: each replica takes an event (a new stream's leader and its
    // subjects' interest take a moment to reach every node; a post meanwhile is a 503 with no
    // fault to explain it).
    let http = reqwest::Client::new();
    for (r, gateway) in gateways.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let posted = http
                .post(format!("{gateway}/v1/events"))
                .header("content-type", "application/json")
                .body(event(3_000_000_000 + r as i64))
                .send()
                .await;
            if posted.is_ok_and(|response| response.status() == 200) {
                break;
            }
            assert!(Instant::now() < deadline, "replica {r} never took an event");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    let seen: Vec<Arc<Mutex<Seen>>> = (0..2).map(|_| Arc::default()).collect();
    let subscribers: Vec<_> = (0..2)
        .map(|r| spawn_subscriber(gateways[r].clone(), seen[r].clone()))
        .collect();
    let answers: Arc<Mutex<Vec<Answer>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // Four writers, two per replica; ids by residue so that no two writers share one.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            spawn_writer(
                gateways.clone(),
                w % 2,
                1 + w as i64,
                4,
                answers.clone(),
                stop.clone(),
            )
        })
        .collect();
    let mut probe = Probe {
        gateways: gateways.clone(),
        answers: answers.clone(),
        next_id: 1_000_000_000,
        timeline: Vec::new(),
    };
    // Every change to the cluster: a 503 with a quorum must follow one closely.
    let mut faults: Vec<Instant> = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. SIGKILL the stream leader; start it again later.
    let killed = cluster.stream_leader(&admin, STREAM).await;
    cluster.kill(killed);
    faults.push(Instant::now());
    probe
        .back(&cluster, &admin, FAILOVER, |took| {
            format!("killed leader n{killed}: ingest back after {took:?}")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.spawn(killed);
    faults.push(Instant::now());
    healthy(&cluster, &admin).await;

    // 2. SIGSTOP a follower, resume it: the one that was not restarted, so that the quorum
    // left is the leader and the node that has just come back.
    let leader = cluster.stream_leader(&admin, STREAM).await;
    let follower = (0..3)
        .find(|&n| n != leader && n != killed)
        .unwrap_or((leader + 1) % 3);
    note(
        &mut probe.timeline,
        format!("freezing n{follower}; n{leader} leads"),
    );
    note(&mut probe.timeline, stream_state(&admin).await);
    cluster.pause(follower);
    faults.push(Instant::now());
    probe
        .back(&cluster, &admin, FAILOVER, |took| {
            format!("froze follower n{follower}: ingest works after {took:?}")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    cluster.resume(follower);
    faults.push(Instant::now());
    healthy(&cluster, &admin).await;

    // 3. Restart a node (SIGTERM, start again).
    let node = (cluster.stream_leader(&admin, STREAM).await + 2) % 3;
    cluster.restart(node);
    faults.push(Instant::now());
    probe
        .back(&cluster, &admin, FAILOVER, |took| {
            format!("restarted n{node}: ingest works after {took:?}")
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 4. No quorum: two nodes down. Nothing sent now may be answered 200.
    let leader = cluster.stream_leader(&admin, STREAM).await;
    let other = (leader + 1) % 3;
    cluster.kill(leader);
    cluster.kill(other);
    let quorum_lost = Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let quorum_back = Instant::now();
    cluster.spawn(leader);
    cluster.spawn(other);
    faults.push(quorum_back);
    probe
        .back(&cluster, &admin, QUORUM_RECOVERY, |took| {
            format!(
                "killed n{leader} and n{other} for 8 s: ingest back {took:?} after their restart"
            )
        })
        .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        tokio::time::timeout(Duration::from_secs(30), writer)
            .await
            .expect("writers finish")
            .expect("no writer panicked");
    }
    let answers = answers.lock().unwrap().clone();

    // The stream as NATS holds it.
    let contents = stream_contents(&admin).await;
    let last = *contents.keys().last().expect("events were stored");
    assert_eq!(
        contents.keys().copied().collect::<Vec<_>>(),
        (1..=last).collect::<Vec<_>>(),
        "the stream's sequences are gapless"
    );
    let mut at: HashMap<i64, u64> = HashMap::new();
    for (&sequence, &id) in &contents {
        if let Some(earlier) = at.insert(id, sequence) {
            panic!("event {id} is stored twice: at {earlier} and {sequence}");
        }
    }

    // Every answer: stored where it said, once; 503 only when it may be.
    let mut stored = 0;
    let mut unavailable_with_quorum = Vec::new();
    for answer in &answers {
        match &answer.outcome {
            Outcome::Stored { sequence, .. } => {
                stored += 1;
                assert_eq!(
                    at.get(&answer.id),
                    Some(sequence),
                    "event {} was acknowledged at {sequence} (replica {})",
                    answer.id,
                    answer.replica
                );
                assert!(
                    !(answer.sent > quorum_lost && answer.answered < quorum_back),
                    "event {} was answered 200 while the cluster had no quorum",
                    answer.id
                );
            }
            Outcome::Unavailable(body) => {
                if answer.answered < quorum_lost || answer.sent > quorum_back {
                    unavailable_with_quorum.push((answer.answered, body.clone()));
                }
            }
            Outcome::Other(what) => panic!(
                "event {} through replica {}: {what} (only 200 or 503 are answers)",
                answer.id, answer.replica
            ),
        }
    }
    for (answered, body) in &unavailable_with_quorum {
        // Before any fault, on a loaded machine, a node may not yet route the new stream's
        // subjects: NATS answers "no responders", which is certainly not stored (seen twice
        // under `.ci/run`, never alone; see the issue note).
        if *answered < faults[0] && body.contains("no stream found") {
            continue;
        }
        assert!(
            faults.iter().any(|&fault| {
                let window = if fault == quorum_back {
                    QUORUM_RECOVERY
                } else {
                    FAILOVER
                };
                fault <= *answered && *answered <= fault + window
            }),
            "a 503 {:?} after the first fault (0: before it) came with a quorum and long after \
             any fault: {body}",
            answered.duration_since(faults[0])
        );
    }
    assert!(stored > 100, "only {stored} events were acknowledged");
    let refused_without_quorum = answers
        .iter()
        .filter(|a| a.sent > quorum_lost && a.answered < quorum_back)
        .count();
    assert!(
        refused_without_quorum > 0,
        "no write was attempted while the quorum was lost"
    );

    // Both subscribers reach the end and saw exactly the stream's order.
    for (r, seen) in seen.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(60);
        while seen.lock().unwrap().events.last().map(|e| e.0) < Some(last) {
            assert!(
                Instant::now() < deadline,
                "replica {r}'s subscriber stopped at {:?} of {last}",
                seen.lock().unwrap().events.last()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let seen = seen.lock().unwrap();
        assert!(
            seen.violations.is_empty(),
            "replica {r}'s subscriber: {:?}",
            seen.violations
        );
        let expected: Vec<(u64, i64)> = contents.iter().map(|(&s, &i)| (s, i)).collect();
        assert_eq!(
            &seen.events[..expected.len()],
            &expected[..],
            "replica {r}'s subscriber saw the stream's order"
        );
        note(
            &mut probe.timeline,
            format!(
                "replica {r}'s subscriber: {} events, {} resumes",
                seen.events.len(),
                seen.breaks.len()
            ),
        );
    }
    for subscriber in subscribers {
        subscriber.abort();
    }
    eprintln!(
        "{} answers, {stored} stored, {} 503s without quorum, {} 503s with a quorum\n{}",
        answers.len(),
        refused_without_quorum,
        unavailable_with_quorum.len(),
        probe.timeline.join("\n")
    );
    drop(cluster);
}
