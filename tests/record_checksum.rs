//! Every record is checked (issue 19, point 2), on the real binary: one stored event's bytes are
//! changed by hand in `events.redb` (its type, which a record keeps outside its compressed part
//! for filters); `verify` names it damaged, `export` leaves it out, and a restarted gateway never
//! serves it as if whole (GetEvent and a subscription whose filter matches the changed type get
//! DATA_LOSS; the damaged-reads gauge counts it). Before, `verify` said "3 readable", and a
//! subscriber filtering on the changed type received the event typed with the original one.

mod binary;

use std::process::Command;
use std::time::Duration;

use binary::{gateway_binary, Process};
use iqchannels_gateway::pb::client::{
    get_event_request, subscribe_request, Filter, GetEventRequest, SubscribeRequest,
};

/// The type of the event that is damaged, and what it is changed to (as long).
const WRITTEN: &[u8] = b"zz_checksum_marker_one";
const CHANGED: &[u8] = b"zz_checksum_marker_two";

fn body(id: i64, event_type: &str) -> String {
    format!(r#"{{"ChatEvent":{{"Id":{id},"Type":"{event_type}","ChatId":5}},"Rels":null}}"#)
}

/// Replaces every occurrence of `from` in `bytes` by `to`; how many.
fn replace_all(bytes: &mut [u8], from: &[u8], to: &[u8]) -> usize {
    let mut count = 0;
    let mut at = 0;
    while let Some(found) = bytes[at..].windows(from.len()).position(|w| w == from) {
        let start = at + found;
        bytes[start..start + from.len()].copy_from_slice(to);
        at = start + from.len();
        count += 1;
    }
    count
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_changed_on_disk_is_reported_and_never_served_as_whole() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().to_str().expect("UTF-8 path").to_owned();
    let mut gateway = Process::embedded(dir.path(), &[]);
    let http = reqwest::Client::new();
    let types = [
        "message_created",
        std::str::from_utf8(WRITTEN).unwrap(),
        "chat_closed",
    ];
    for (i, event_type) in types.iter().enumerate() {
        let response = http
            .post(gateway.url("/v1/events"))
            .header("content-type", "application/json")
            .body(body(83_005_001 + i as i64, event_type))
            .send()
            .await
            .expect("posted");
        assert_eq!(response.status(), 200);
    }
    gateway.terminate();
    assert!(gateway.wait_exit(Duration::from_secs(30)).is_some());

    let path = dir.path().join("events.redb");
    let mut file = std::fs::read(&path).expect("the store");
    let changed = replace_all(&mut file, WRITTEN, CHANGED);
    assert!(changed > 0, "the type is kept in plain bytes for filters");
    std::fs::write(&path, &file).expect("written back");

    let verify = Command::new(gateway_binary())
        .args(["verify", "--data-dir", &data])
        .output()
        .expect("verify runs");
    let said = String::from_utf8_lossy(&verify.stdout).to_string()
        + &String::from_utf8_lossy(&verify.stderr);
    assert!(!verify.status.success(), "verify: {said}");
    assert!(said.contains("2 readable, 1 unreadable"), "verify: {said}");
    assert!(
        said.contains("unreadable: 2 ("),
        "verify names the record: {said}"
    );
    assert!(said.contains("checksum"), "verify says why: {said}");

    let export = Command::new(gateway_binary())
        .args(["export", "--data-dir", &data])
        .output()
        .expect("export runs");
    let exported = String::from_utf8_lossy(&export.stdout);
    let ids: Vec<i64> = exported
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            value["ChatEvent"]["Id"].as_i64().expect("an id")
        })
        .collect();
    assert_eq!(
        ids,
        [83_005_001, 83_005_003],
        "the damaged event is left out"
    );
    assert!(String::from_utf8_lossy(&export.stderr).contains("unreadable: 2"));

    let gateway = Process::embedded(dir.path(), &[]);
    let mut grpc = gateway.grpc().await;
    let status = grpc
        .get_event(GetEventRequest {
            key: Some(get_event_request::Key::Sequence(2)),
            ..Default::default()
        })
        .await
        .expect_err("a damaged record is not served");
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    for id in [83_005_001, 83_005_003] {
        let found = grpc
            .get_event(GetEventRequest {
                key: Some(get_event_request::Key::EventId(id)),
                ..Default::default()
            })
            .await;
        assert!(found.is_ok(), "the others are served: {found:?}");
    }
    // A subscriber whose filter matches only the changed bytes: DATA_LOSS, never the event.
    let mut stream = grpc
        .subscribe(SubscribeRequest {
            filter: Some(Filter {
                event_types: vec![String::from_utf8(CHANGED.to_vec()).unwrap()],
                ..Default::default()
            }),
            start: Some(subscribe_request::Start::Beginning(())),
            ..Default::default()
        })
        .await
        .expect("subscribed")
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(20), stream.message())
        .await
        .expect("an answer");
    match first {
        Err(status) => assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}"),
        Ok(event) => panic!("a damaged record was served: {event:?}"),
    }
    assert!(gateway.metric("iqgw_store_damaged_reads").await > 0);
}
