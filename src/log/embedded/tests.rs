use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::*;

fn record(event_id: i64, at: i64) -> NewRecord {
    NewRecord {
        event_id: Some(event_id),
        received_at_ms: at,
        payload: Bytes::from(format!("payload {event_id}")),
    }
}

#[tokio::test]
async fn records_ids_and_sequences_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
        let appended = log
            .append_all(vec![record(10, 1), record(11, 2)])
            .await
            .unwrap();
        assert_eq!(
            appended[1],
            Appended {
                sequence: 2,
                duplicate: false
            }
        );
        assert_eq!(*log.committed().borrow(), 2);
        log.close().await;
    }
    let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
    assert_eq!(log.bounds(), Bounds { first: 1, next: 3 });
    assert_eq!(
        log.append_all(vec![record(11, 3), record(12, 4)])
            .await
            .unwrap(),
        vec![
            Appended {
                sequence: 2,
                duplicate: true
            },
            Appended {
                sequence: 3,
                duplicate: false
            }
        ]
    );
    let records = log.read(1, 10).await.unwrap();
    assert_eq!(
        records.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert_eq!(records[0].payload, Bytes::from("payload 10"));
    assert_eq!(records[0].received_at_ms, 1);
    assert_eq!(log.find_event(12).await.unwrap(), Some(3));
    assert_eq!(log.find_event(99).await.unwrap(), None);
}

#[tokio::test]
async fn concurrent_duplicates_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path(), Retention::default()).unwrap());
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move { log.append_all(vec![record(i % 8, i)]).await })
        })
        .collect();
    let mut stored = 0;
    for task in tasks {
        let appended = task.await.unwrap().unwrap();
        stored += appended.iter().filter(|a| !a.duplicate).count();
    }
    assert_eq!(stored, 8);
    assert_eq!(log.bounds(), Bounds { first: 1, next: 9 });
    let syncs = log.stats().syncs.load(Ordering::Relaxed);
    assert!(syncs <= 64, "one sync per request at most, got {syncs}");
}

#[tokio::test]
async fn retention_by_count_truncates_explicitly_and_sequences_never_go_back() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        max_events: Some(3),
        ..Retention::default()
    };
    {
        let log = EmbeddedLog::open(dir.path(), retention.clone()).unwrap();
        log.append_all((1..=5).map(|i| record(i, i)).collect())
            .await
            .unwrap();
        assert_eq!(log.bounds(), Bounds { first: 3, next: 6 });
        assert!(matches!(
            log.read(1, 10).await,
            Err(LogError::Truncated {
                requested: 1,
                oldest: 3
            })
        ));
        assert_eq!(log.read(3, 10).await.unwrap().len(), 3);
        // Retention also forgets the dedup entry of what it removed.
        assert_eq!(log.find_event(1).await.unwrap(), None);
        log.close().await;
    }
    let log = EmbeddedLog::open(dir.path(), retention).unwrap();
    assert_eq!(log.bounds(), Bounds { first: 3, next: 6 });
    assert_eq!(
        log.append_all(vec![record(6, 6)]).await.unwrap()[0].sequence,
        6
    );
}

#[tokio::test]
async fn retention_by_bytes_and_age() {
    let dir = tempfile::tempdir().unwrap();
    let by_bytes = Retention {
        max_bytes: Some(100),
        ..Retention::default()
    };
    let log = EmbeddedLog::open(&dir.path().join("bytes"), by_bytes).unwrap();
    // Each value: 16 header bytes + "payload N" (9 bytes) = 25 bytes; 4 fit in 100.
    log.append_all((1..=6).map(|i| record(i, i)).collect())
        .await
        .unwrap();
    assert_eq!(log.bounds(), Bounds { first: 3, next: 7 });

    let by_age = Retention {
        max_age: Some(Duration::from_secs(60)),
        ..Retention::default()
    };
    let log = EmbeddedLog::open(&dir.path().join("age"), by_age).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    log.append_all(vec![record(1, now - 120_000), record(2, now)])
        .await
        .unwrap();
    assert_eq!(log.bounds(), Bounds { first: 2, next: 3 });
}

#[tokio::test]
async fn expired_events_are_removed_on_a_timer_without_new_appends() {
    let dir = tempfile::tempdir().unwrap();
    let by_age = Retention {
        max_age: Some(Duration::from_millis(500)),
        ..Retention::default()
    };
    let log = EmbeddedLog::open(dir.path(), by_age).unwrap();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    log.append_all(vec![record(1, now), record(2, now)])
        .await
        .unwrap();
    assert_eq!(log.bounds(), Bounds { first: 1, next: 3 });
    for _ in 0..50 {
        if log.bounds().first == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        log.bounds(),
        Bounds { first: 3, next: 3 },
        "removed with no append"
    );
    assert!(matches!(
        log.read(1, 10).await,
        Err(LogError::Truncated {
            requested: 1,
            oldest: 3
        })
    ));
    assert_eq!(log.find_event(1).await.unwrap(), None);
    log.close().await;
    // The removal was committed: the file says so after a reopen.
    let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
    assert_eq!(log.bounds(), Bounds { first: 3, next: 3 });
}

#[tokio::test]
async fn seek_time_finds_the_first_event_at_or_after() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
    log.append_all(vec![record(1, 100), record(2, 200), record(3, 300)])
        .await
        .unwrap();
    assert_eq!(log.seek_time(0).await.unwrap(), 1);
    assert_eq!(log.seek_time(200).await.unwrap(), 2);
    assert_eq!(log.seek_time(201).await.unwrap(), 3);
    assert_eq!(log.seek_time(1000).await.unwrap(), 4);
    // Received times are kept non-decreasing even if a clock steps back.
    log.append_all(vec![record(4, 50)]).await.unwrap();
    assert_eq!(log.read(4, 1).await.unwrap()[0].received_at_ms, 300);
}

#[tokio::test]
async fn a_damaged_file_is_refused_with_a_clear_error_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
        log.append_all(vec![record(1, 1), record(2, 2)])
            .await
            .unwrap();
        log.close().await;
    }
    // Damage that is not a crash-torn commit (those are rolled back by redb's recovery, see the
    // SIGKILL tests): bytes past the file's layout.
    let path = dir.path().join("events.redb");
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap();
    std::io::Write::write_all(&mut file, &[0xA5; 70_000]).unwrap();
    drop(file);
    match EmbeddedLog::open(dir.path(), Retention::default()) {
        Err(LogError::Unavailable(message)) => assert!(message.contains("damaged"), "{message}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("a damaged store must not be opened"),
    }
}

#[tokio::test]
async fn a_commit_that_reached_the_disk_but_failed_is_neither_overwritten_nor_lost() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
    log.append_all(vec![record(10, 1)]).await.unwrap();
    // Event 11's commit reaches the disk, then reports an error: the sender is told 503.
    log.fail_next_sync_after_writing();
    let failed = log.append_all(vec![record(11, 2)]).await;
    assert!(
        matches!(failed, Err(LogError::Unavailable(_))),
        "{failed:?}"
    );
    // The writer reopens the file (and probes) until a write succeeds again.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    let retried = loop {
        match log.append_all(vec![record(11, 3)]).await {
            Ok(appended) => break appended,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await
            }
            Err(error) => panic!("the store did not recover: {error}"),
        }
    };
    assert_eq!(
        retried,
        vec![Appended {
            sequence: 2,
            duplicate: true
        }],
        "the retry finds the event the failed commit stored"
    );
    let next = log.append_all(vec![record(12, 4)]).await.unwrap();
    assert_eq!(next[0].sequence, 3, "sequence 2 is not reused");
    let records = log.read(1, 10).await.unwrap();
    let payloads: Vec<_> = records.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(
        payloads,
        vec![
            Bytes::from("payload 10"),
            Bytes::from("payload 11"),
            Bytes::from("payload 12")
        ]
    );
    assert_eq!(log.find_event(11).await.unwrap(), Some(2));
    assert_eq!(*log.committed().borrow(), 3);
}

#[tokio::test]
async fn received_times_never_go_back_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
        log.append_all(vec![record(1, 5_000)]).await.unwrap();
        log.close().await;
    }
    // The clock stepped back while the gateway was down.
    let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
    log.append_all(vec![record(2, 1_000)]).await.unwrap();
    let records = log.read(1, 10).await.unwrap();
    assert_eq!(records[1].received_at_ms, 5_000);
    assert_eq!(log.seek_time(5_000).await.unwrap(), 1);
    assert_eq!(log.seek_time(5_001).await.unwrap(), 3);
}

/// The store in `dir` with its `format` key set to `format`, or removed (`None`: what every
/// release before format versions wrote), written with redb directly. With `crashed_copy`, the
/// file is also copied there while still open, as a crash would leave it (redb repairs such a
/// file when it opens it, which writes to it).
fn set_format(dir: &Path, format: Option<u64>, crashed_copy: Option<&Path>) {
    let db = Database::open(dir.join("events.redb")).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(META).unwrap();
        match format {
            Some(format) => meta.insert("format", format).unwrap(),
            None => meta.remove("format").unwrap(),
        };
    }
    txn.commit().unwrap();
    if let Some(copy) = crashed_copy {
        std::fs::create_dir_all(copy).unwrap();
        std::fs::copy(dir.join("events.redb"), copy.join("events.redb")).unwrap();
    }
}

/// The `format` key of the store in `dir`, read with redb directly.
fn stored_format(dir: &Path) -> Option<u64> {
    let db = Database::open(dir.join("events.redb")).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    let format = meta.get("format").unwrap().map(|v| v.value());
    format
}

async fn store_with_two_records(dir: &Path) {
    let log = EmbeddedLog::open(dir, Retention::default()).unwrap();
    log.append_all(vec![record(1, 1), record(2, 2)])
        .await
        .unwrap();
    log.close().await;
}

#[tokio::test]
async fn a_new_store_records_the_current_format() {
    let dir = tempfile::tempdir().unwrap();
    store_with_two_records(dir.path()).await;
    assert_eq!(stored_format(dir.path()), Some(FORMAT));
}

#[tokio::test]
async fn a_format_1_store_opens_with_its_records_and_ids_and_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    store_with_two_records(dir.path()).await;
    set_format(dir.path(), None, None);
    let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
    assert_eq!(log.bounds(), Bounds { first: 1, next: 3 });
    assert_eq!(
        log.read(1, 10).await.unwrap()[1].payload,
        Bytes::from("payload 2")
    );
    assert_eq!(log.find_event(2).await.unwrap(), Some(2));
    log.close().await;
    assert_eq!(stored_format(dir.path()), Some(FORMAT));
}

#[tokio::test]
async fn a_newer_format_is_refused_naming_both_and_the_file_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, crashed) = (dir.path().join("clean"), dir.path().join("crashed"));
    store_with_two_records(&clean).await;
    set_format(&clean, Some(FORMAT + 1), Some(&crashed));
    for dir in [clean, crashed] {
        refused_untouched(&dir);
    }
}

fn refused_untouched(dir: &Path) {
    let path = dir.join("events.redb");
    let before = std::fs::read(&path).unwrap();
    let refused = |error: LogError| {
        assert!(
            matches!(error, LogError::NewerFormat { found, supported, .. }
                if found == FORMAT + 1 && supported == FORMAT),
            "{error:?}"
        );
        let message = error.to_string();
        assert!(
            message.contains(&format!("format {}", FORMAT + 1))
                && message.contains(&format!("up to {FORMAT}"))
                && message.contains("newer release"),
            "{message}"
        );
    };
    match EmbeddedLog::open(dir, Retention::default()) {
        Err(error) => refused(error),
        Ok(_) => panic!("a newer format must not be opened"),
    }
    match scan(dir, |_, _| Ok(())) {
        Err(error) => refused(error),
        Ok(_) => panic!("a newer format must not be scanned"),
    }
    assert!(
        std::fs::read(&path).unwrap() == before,
        "{} changed",
        dir.display()
    );
}

#[tokio::test]
async fn a_scan_reads_a_format_1_store_without_changing_it_even_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (clean, crashed) = (dir.path().join("clean"), dir.path().join("crashed"));
    store_with_two_records(&clean).await;
    set_format(&clean, None, Some(&crashed));
    for dir in [clean, crashed] {
        let path = dir.join("events.redb");
        let before = std::fs::read(&path).unwrap();
        let mut seen = Vec::new();
        let bounds = scan(&dir, |sequence, scanned| {
            if let Scanned::Record(record) = scanned {
                seen.push((sequence, record.payload));
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(bounds, Bounds { first: 1, next: 3 });
        assert_eq!(
            seen,
            vec![(1, Bytes::from("payload 1")), (2, Bytes::from("payload 2"))]
        );
        assert!(
            std::fs::read(&path).unwrap() == before,
            "the scan changed {}",
            dir.display()
        );
        assert_eq!(stored_format(&dir), None);
    }
}

/// The length read from redb's header is the file's, as redb keeps it, however the file grew:
/// what a scan pads a file cut short to.
#[tokio::test]
async fn the_layout_read_from_the_header_is_the_files_length() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
    let path = dir.path().join("events.redb");
    let mut id = 0;
    for batch in [1usize, 10, 100, 1000, 3000] {
        let records = (0..batch)
            .map(|_| {
                id += 1;
                NewRecord {
                    event_id: Some(id),
                    received_at_ms: id,
                    payload: Bytes::from(vec![b'x'; 500 + (id as usize % 3000)]),
                }
            })
            .collect();
        log.append_all(records).await.unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let len = file.metadata().unwrap().len();
        assert_eq!(open::layout_len(&file), Some(len), "after {id} records");
    }
    log.close().await;
    let file = std::fs::File::open(&path).unwrap();
    assert_eq!(
        open::layout_len(&file),
        Some(file.metadata().unwrap().len())
    );
}

/// A record under a key past the next sequence the store recorded (a damaged key in a page that
/// parses) is a damaged index: the store is not opened, `scan` says so at once instead of
/// walking every sequence up to it (found from outside: 2^40 took hours), and a redelivery never
/// resolves to it.
#[tokio::test]
async fn a_key_past_the_recorded_next_sequence_is_a_damaged_index() {
    let dir = tempfile::tempdir().unwrap();
    store_with_two_records(dir.path()).await;
    {
        let db = Database::open(dir.path().join("events.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut events = txn.open_table(EVENTS).unwrap();
            let value = events.remove(2).unwrap().unwrap().value().to_vec();
            events.insert(1u64 << 40, value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let started = std::time::Instant::now();
    match scan(dir.path(), |_, _| Ok(())) {
        Err(LogError::Damaged { detail, .. }) => {
            assert!(detail.contains("index is damaged"), "{detail}")
        }
        other => panic!("a damaged index must be reported: {other:?}"),
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    match EmbeddedLog::open(dir.path(), Retention::default()) {
        Err(LogError::Damaged { detail, .. }) => {
            assert!(detail.contains("index is damaged"), "{detail}")
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a damaged index must not be served"),
    }
}

/// A dedup entry whose event is no longer stored under it (its record's id damaged, so
/// retention could not remove the entry) does not swallow a redelivery: it is stored again.
#[tokio::test]
async fn a_stale_dedup_entry_does_not_take_a_redelivery_for_a_duplicate() {
    let dir = tempfile::tempdir().unwrap();
    store_with_two_records(dir.path()).await;
    {
        let db = Database::open(dir.path().join("events.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            // Event 1's entry points at sequence 2, which holds event 2.
            let mut ids = txn.open_table(IDS).unwrap();
            ids.insert(1, 2).unwrap();
        }
        txn.commit().unwrap();
    }
    let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
    let appended = log.append_all(vec![record(1, 3)]).await.unwrap();
    assert_eq!(
        appended,
        [Appended {
            sequence: 3,
            duplicate: false
        }]
    );
    assert_eq!(log.find_event(1).await.unwrap(), Some(3));
    let appended = log.append_all(vec![record(2, 4)]).await.unwrap();
    assert!(appended[0].duplicate, "a true duplicate is still one");
}

/// Retention removes a record's dedup entry only when it points at that record: a record whose
/// id was damaged into another event's never takes that event's dedup with it (found from
/// outside: the other event was then stored twice).
#[tokio::test]
async fn retention_never_removes_another_events_dedup_entry() {
    let dir = tempfile::tempdir().unwrap();
    store_with_two_records(dir.path()).await;
    {
        let db = Database::open(dir.path().join("events.redb")).unwrap();
        let txn = db.begin_write().unwrap();
        {
            // Record 1's id damaged into event 2's.
            let mut events = txn.open_table(EVENTS).unwrap();
            let mut value = events.get(1).unwrap().unwrap().value().to_vec();
            value[8..16].copy_from_slice(&2i64.to_be_bytes());
            events.insert(1, value.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }
    let retention = Retention {
        max_events: Some(2),
        ..Retention::default()
    };
    let log = EmbeddedLog::open(dir.path(), retention).unwrap();
    // A third event: retention removes sequence 1.
    log.append_all(vec![record(3, 3)]).await.unwrap();
    assert_eq!(log.bounds().first, 2);
    let again = log.append_all(vec![record(2, 4)]).await.unwrap();
    assert_eq!(
        again,
        [Appended {
            sequence: 2,
            duplicate: true
        }],
        "event 2 is still stored once"
    );
}
