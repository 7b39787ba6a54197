//! `export` salvages what is there (issue 19, point 3), on the real binary: a store of 2,000
//! events whose file lost its end (a byte, 64 KiB, 1 MiB, half of it, all but its first MiB).
//! A short cut reads through the index, every event, in order (the missing bytes read as zeros:
//! redb refused the file whole, and every event was lost to `export`); past what the index
//! survives, the file is read record by record for checksummed records, and each event found is
//! exported once, with a summary of what was done. Before, every cut
//! gave "damaged beyond crash recovery" and nothing.

mod binary;

use std::process::Command;
use std::time::Duration;

use binary::{event, gateway_binary, Process};

const EVENTS: i64 = 2000;

/// Exports the store in `dir`: the exit status, the exported ids in order, and stderr.
fn export(dir: &std::path::Path) -> (Option<i32>, Vec<i64>, String) {
    let output = Command::new(gateway_binary())
        .args(["export", "--data-dir"])
        .arg(dir)
        .output()
        .expect("export runs");
    let ids = String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).expect("a JSON line");
            value["ChatEvent"]["Id"].as_i64().expect("an id")
        })
        .collect();
    (
        output.status.code(),
        ids,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_reads_what_a_store_cut_short_still_holds() {
    let dir = tempfile::tempdir().expect("a directory");
    let mut gateway = Process::embedded(dir.path(), &[]);
    let http = reqwest::Client::new();
    for chunk in (1..=EVENTS).collect::<Vec<_>>().chunks(250) {
        let items: Vec<serde_json::Value> = chunk
            .iter()
            .map(|&id| serde_json::from_slice(&event(id)).expect("JSON"))
            .collect();
        let response = http
            .post(gateway.url("/v1/events:batch"))
            .json(&items)
            .send()
            .await
            .expect("posted");
        assert_eq!(response.status(), 200);
    }
    gateway.terminate();
    assert!(gateway.wait_exit(Duration::from_secs(30)).is_some());
    let whole = std::fs::read(dir.path().join("events.redb")).expect("the store");
    let every: Vec<i64> = (1..=EVENTS).collect();
    assert_eq!(export(dir.path()).1, every, "the whole store");

    let len = whole.len();
    let mut salvaged_any = false;
    for cut in [1, 64 << 10, 1 << 20, len / 2, len - (1 << 20)] {
        let damaged = tempfile::tempdir().expect("a directory");
        std::fs::write(damaged.path().join("events.redb"), &whole[..len - cut]).unwrap();
        let (code, ids, said) = export(damaged.path());
        // Each event at most once, none made up.
        let distinct: std::collections::HashSet<i64> = ids.iter().copied().collect();
        assert_eq!(
            distinct.len(),
            ids.len(),
            "cut {cut}: an event twice: {said}"
        );
        assert!(ids.iter().all(|id| (1..=EVENTS).contains(id)), "cut {cut}");
        // Through the index, in sequence order; salvaged, in the order received (a batch's
        // events share a millisecond: their order within it is not known).
        if !said.contains("salvaged") {
            assert!(
                ids.windows(2).all(|pair| pair[0] < pair[1]),
                "cut {cut}: out of order: {said}"
            );
        }
        if cut <= 64 << 10 {
            assert_eq!(ids, every, "cut {cut}: {said}");
            assert_eq!(code, Some(0), "cut {cut}: {said}");
            assert!(
                said.contains("2000 readable, 0 unreadable"),
                "cut {cut}: {said}"
            );
        } else {
            // What is left is read, whichever way; an incomplete export says so (exit 1).
            assert!(!ids.is_empty(), "cut {cut}: nothing read: {said}");
            if said.contains("salvaged") {
                salvaged_any = true;
                assert_eq!(code, Some(1), "cut {cut}: {said}");
                assert!(
                    said.contains(&format!("salvaged {} events", ids.len())),
                    "{said}"
                );
            }
        }
    }
    assert!(
        salvaged_any,
        "no cut reached the index: the salvage was not tried"
    );
}
