//! A store has an identity, and a reset stream is noticed (issue 19, point 6), on the real
//! binary: a subscription says which store it reads (`iqgw-store`), the same after a restart; a
//! resume that names another store (a restored backup, a recreated stream) is refused
//! (FAILED_PRECONDITION, SSE 412, the CLI stops) instead of starting at a sequence that names
//! other events. A JetStream stream deleted and created again under a running gateway: the
//! gateway stops serving it (its subscribers' streams end, it exits with an error naming the
//! reason) instead of answering `ready` with its old bounds and caches. Before, it went on as if
//! nothing had happened: its live subscriber received nothing more, and `GetEvent(2)` answered
//! the deleted event.

mod binary;
mod nats;

use std::process::Command;
use std::time::Duration;

use binary::{gateway_binary, Process};
use iqchannels_gateway::pb::client::{
    get_event_request, subscribe_request::Start, GetEventRequest, SubscribeRequest,
};
use nats::{reachable, require, TestStream, SHARED_NATS};

/// Subscribes from the beginning; the store identity the gateway answered with.
async fn store_of(gateway: &Process) -> String {
    let response = gateway
        .grpc()
        .await
        .subscribe(SubscribeRequest {
            start: Some(Start::Beginning(())),
            ..Default::default()
        })
        .await
        .expect("subscribed");
    response
        .metadata()
        .get("iqgw-store")
        .expect("the store is named")
        .to_str()
        .expect("ASCII")
        .to_owned()
}

async fn resume(gateway: &Process, after: u64, store: &str) -> Result<(), tonic::Status> {
    gateway
        .grpc()
        .await
        .subscribe(SubscribeRequest {
            start: Some(Start::AfterSequence(after)),
            store: store.to_owned(),
            ..Default::default()
        })
        .await
        .map(drop)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_another_embedded_store_is_refused_everywhere() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut first = Process::embedded(one.path(), &[]);
    for id in 1..=3 {
        assert_eq!(first.post_event(id).await, 200);
    }
    let identity = store_of(&first).await;
    assert!(identity.starts_with("embedded:"), "{identity}");
    first.terminate();
    assert!(first.wait_exit(Duration::from_secs(30)).is_some());
    // A backup of the file as it is now (the gateway stopped).
    let backup = tempfile::tempdir().unwrap();
    std::fs::copy(
        one.path().join("events.redb"),
        backup.path().join("events.redb"),
    )
    .unwrap();
    // The same file: the same store (another run of it), and a cursor of the earlier run resumes.
    let mut again = Process::embedded(one.path(), &[]);
    let later = store_of(&again).await;
    assert_ne!(later, identity, "each run has its own epoch");
    assert_eq!(
        later.split('.').next(),
        identity.split('.').next(),
        "kept in the file"
    );
    resume(&again, 2, &identity).await.expect("the same store");
    for id in 4..=6 {
        assert_eq!(again.post_event(id).await, 200);
    }
    // A copy taken while it runs (a snapshot): it holds this run's events up to 6.
    let live = tempfile::tempdir().unwrap();
    std::fs::copy(
        one.path().join("events.redb"),
        live.path().join("events.redb"),
    )
    .unwrap();
    for id in 7..=8 {
        assert_eq!(again.post_event(id).await, 200);
    }
    again.terminate();
    assert!(again.wait_exit(Duration::from_secs(30)).is_some());
    // The backup restored, and new events stored under the sequences the others had: a cursor
    // learnt after the backup names other events here, and is refused; one from before is not.
    std::fs::copy(
        backup.path().join("events.redb"),
        one.path().join("events.redb"),
    )
    .unwrap();
    let restored = Process::embedded(one.path(), &[]);
    for id in 104..=106 {
        assert_eq!(restored.post_event(id).await, 200);
    }
    let status = resume(&restored, 5, &later)
        .await
        .expect_err("a cursor of the lost run");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    resume(&restored, 2, &identity)
        .await
        .expect("a cursor from before the backup");
    drop(restored);
    // The copy taken while the second run went on: its cursors up to what the copy holds
    // resume, later ones (learnt after the copy) are refused once new events fill the gap.
    std::fs::copy(
        live.path().join("events.redb"),
        one.path().join("events.redb"),
    )
    .unwrap();
    let from_snapshot = Process::embedded(one.path(), &[]);
    for id in 207..=209 {
        assert_eq!(from_snapshot.post_event(id).await, 200);
    }
    let status = resume(&from_snapshot, 8, &later)
        .await
        .expect_err("a cursor past the snapshot");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    resume(&from_snapshot, 6, &later)
        .await
        .expect("a cursor the snapshot holds");
    drop(from_snapshot);

    // Another store (a backup restored, a new file): refused, whatever the sequence.
    let other = Process::embedded(two.path(), &[]);
    for id in 1..=3 {
        assert_eq!(other.post_event(id).await, 200);
    }
    let theirs = store_of(&other).await;
    assert_ne!(theirs, identity, "each store its own");
    let status = resume(&other, 2, &identity)
        .await
        .expect_err("another store");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains(&identity), "{status:?}");
    resume(&other, 2, "")
        .await
        .expect("no store named: as before");

    // SSE: the header names it, `store=` is checked.
    let http = reqwest::Client::new();
    let refused = http
        .get(other.url(&format!("/v1/events:stream?after=2&store={identity}")))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 412);
    let served = http
        .get(other.url(&format!("/v1/events:stream?after=2&store={theirs}")))
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    assert_eq!(
        served
            .headers()
            .get("iqgw-store")
            .and_then(|v| v.to_str().ok()),
        Some(theirs.as_str())
    );

    // The CLI prints the store beside the cursor, and refuses to resume in another.
    let cli = |args: &[&str]| {
        Command::new(gateway_binary())
            .args(["subscribe", "--server", &format!("http://{}", other.addr)])
            .args(args)
            .output()
            .expect("the CLI runs")
    };
    let printed = cli(&["--from-beginning", "--exit-after", "3"]);
    let stderr = String::from_utf8_lossy(&printed.stderr);
    assert!(printed.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("store: {theirs}")), "{stderr}");
    let refused = cli(&["--after", "2", "--store-id", &identity, "--exit-after", "1"]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(stderr.contains("the cursor is from the store"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_deleted_and_created_again_is_noticed_and_never_served_as_the_old_one() {
    if !require(
        &format!("nats-server with JetStream on {SHARED_NATS}"),
        reachable(SHARED_NATS),
    ) {
        return;
    }
    let stream = TestStream::new(SHARED_NATS);
    let store = format!("nats://{SHARED_NATS}");
    let mut a = Process::start(&stream.args(&store));
    for id in 1..=5 {
        assert_eq!(a.post_event(id).await, 200);
    }
    let old = store_of(&a).await;
    assert!(old.starts_with("jetstream:"), "{old}");
    let mut live = a
        .grpc()
        .await
        .subscribe(SubscribeRequest::default())
        .await
        .expect("subscribed")
        .into_inner();

    let client = async_nats::connect(SHARED_NATS).await.expect("NATS");
    async_nats::jetstream::new(client)
        .delete_stream(stream.name())
        .await
        .expect("the stream is deleted");
    // B creates it afresh and stores other events under the same sequences.
    let b = Process::start(&stream.args(&store));
    for id in 101..=103 {
        assert_eq!(b.post_event(id).await, 200);
    }
    let new = store_of(&b).await;
    assert_ne!(new, old, "a stream created again is another store");

    // A notices: its subscriber's stream ends with an error, and it exits naming why.
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        match live.message().await {
            Ok(Some(event)) => panic!("A served an event of the new stream: {event:?}"),
            Ok(None) => None,
            Err(status) => Some(status),
        }
    })
    .await
    .expect("A's subscriber is told within 20 s");
    if let Some(status) = ended {
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }
    let exit = a
        .wait_exit(Duration::from_secs(30))
        .expect("A stops serving the old stream");
    assert!(!exit.success(), "A exits with an error");
    let said = a.logged().join("\n");
    assert!(
        said.contains("created again") || said.contains("was deleted"),
        "{said}"
    );

    // B serves the new events; A's cursor is refused there.
    let mut grpc = b.grpc().await;
    let second = grpc
        .get_event(GetEventRequest {
            key: Some(get_event_request::Key::Sequence(2)),
            include_raw_json: true,
            ..Default::default()
        })
        .await
        .expect("the new stream's second event")
        .into_inner();
    let raw: serde_json::Value = serde_json::from_slice(&second.raw_json).unwrap();
    assert_eq!(raw["ChatEvent"]["Id"], 102);
    let status = resume(&b, 3, &old)
        .await
        .expect_err("a cursor of the deleted stream");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
}
