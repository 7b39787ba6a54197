//! verify and export over damaged stores.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::log::embedded::{EmbeddedLog, Retention};
use crate::log::{EventLog, NewRecord};

const EVENTS: i64 = 300;

/// A store of `EVENTS` events whose raw bodies carry a findable marker, closed cleanly.
async fn store(dir: &Path) {
    let log = EmbeddedLog::open(dir, Retention::default()).unwrap();
    let records: Vec<NewRecord> = (1..=EVENTS)
        .map(|id| {
            let raw = format!(
                "{{\"ChatEvent\": {{\"Id\": {id}, \"Type\": \"t\"}},\n \"Marker\": \"MARK{id:05}\"}}"
            );
            let envelope = crate::decode::decode(raw.as_bytes()).unwrap().envelope;
            NewRecord {
                event_id: Some(id),
                received_at_ms: id,
                payload: StoredEvent {
                    envelope: envelope.encode_to_vec().into(),
                    raw_json: Bytes::from(raw),
                    ..StoredEvent::default()
                }
                .encode_to_vec()
                .into(),
            }
        })
        .collect();
    log.append_all(records).await.unwrap();
    log.close().await;
}

fn file(dir: &Path) -> std::path::PathBuf {
    dir.join("events.redb")
}

#[tokio::test]
async fn a_damaged_record_is_named_by_verify_skipped_by_export_and_data_loss_to_readers() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path()).await;
    // Damage record 150's stored bytes in place.
    let mut bytes = std::fs::read(file(dir.path())).unwrap();
    let at = bytes
        .windows(9)
        .position(|w| w == b"MARK00150")
        .expect("the marker is in the file");
    // Its payload's length prefix sits before the raw body: break the protobuf framing there.
    let start = at.saturating_sub(120);
    for b in &mut bytes[start..at] {
        *b = 0xff;
    }
    std::fs::write(file(dir.path()), &bytes).unwrap();

    let report = verify(dir.path()).unwrap();
    assert_eq!(report.first, 1);
    assert_eq!(report.next, EVENTS as u64 + 1);
    assert!(report.unreadable_count() >= 1, "{report}");
    assert!(
        report
            .unreadable
            .iter()
            .any(|(from, to, _)| (*from..=*to).contains(&150)),
        "{report}"
    );
    assert_eq!(report.readable + report.unreadable_count(), EVENTS as u64);

    let mut out = Vec::new();
    let exported = export(dir.path(), &mut out).unwrap();
    // Export needs the raw body only; verify checks the typed envelope too.
    assert!(exported.readable >= report.readable, "{exported}");
    assert!(exported.readable < EVENTS as u64, "{exported}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len() as u64, exported.readable);
    let ids: Vec<i64> = lines
        .iter()
        .map(|l| l["ChatEvent"]["Id"].as_i64().unwrap())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in order");
    assert!(!ids.contains(&150));
    assert_eq!(
        lines[0]["Marker"], "MARK00001",
        "the raw body, unknown fields included"
    );
}

#[tokio::test]
async fn random_damage_never_panics_a_reader_and_is_never_reported_as_retryable() {
    let dir = tempfile::tempdir().unwrap();
    store(dir.path()).await;
    let pristine = std::fs::read(file(dir.path())).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut found = 0;
    for round in 0..24 {
        let damaged_dir = tempfile::tempdir().unwrap();
        let mut bytes = pristine.clone();
        // Near the start of a page that holds records: its header and first entries.
        let marked: Vec<usize> = bytes
            .windows(4)
            .enumerate()
            .filter(|(_, w)| *w == b"MARK")
            .map(|(i, _)| i / 4096 * 4096)
            .collect();
        let page = marked[(random() as usize) % marked.len()];
        let at = page + (random() as usize) % 256;
        for b in &mut bytes[at..at + 64] {
            *b = random() as u8;
        }
        std::fs::write(file(damaged_dir.path()), &bytes).unwrap();
        // The offline tools answer, whatever the damage.
        if verify(damaged_dir.path()).map_or(true, |report| report.unreadable_count() > 0) {
            found += 1;
        }
        // The gateway's store opens or refuses with an error; reads answer records or Damaged.
        let Ok(log) = EmbeddedLog::open(damaged_dir.path(), Retention::default()) else {
            continue;
        };
        let log: Arc<EmbeddedLog> = Arc::new(log);
        let mut from = log.bounds().first;
        while from < log.bounds().next {
            match log.read(from, 64).await {
                Ok(records) if records.is_empty() => break,
                Ok(records) => from = records.last().unwrap().sequence + 1,
                Err(LogError::Damaged { .. }) | Err(LogError::Truncated { .. }) => {
                    found += 1;
                    break;
                }
                Err(other) => panic!("round {round}, damage at {at}: {other}"),
            }
        }
    }
    assert!(
        found > 0,
        "no round damaged a record: the test would prove nothing"
    );
}
