//! The client commands (`publish`, `subscribe`, `get`), driving the real binary against a real
//! gateway process.

mod binary;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

use binary::{event, Process};

const FIXTURES: [&str; 2] = [
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/chat_closed.json"
    ),
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/message_created_file.json"
    ),
];

fn cli(process: &Process, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_iqchannels-gateway"));
    command
        .args(&args[..1])
        .args(["--server", &format!("http://{}", process.addr)])
        .args(&args[1..]);
    command
}

fn run(process: &Process, args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = cli(process, args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (
        output.status.code().unwrap_or(-1),
        text(&output.stdout),
        text(&output.stderr),
    )
}

fn fixture(i: usize) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(FIXTURES[i]).unwrap()).unwrap()
}

#[test]
fn publish_reports_stored_duplicates_and_rejections_with_reasons() {
    let process = Process::start(&["--store", "memory"]);
    let (code, out, _) = run(
        &process,
        &["publish", FIXTURES[0], FIXTURES[1], FIXTURES[0]],
        None,
    );
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().next(),
        Some("stored 2, duplicates 1, rejected 0")
    );

    // NDJSON on stdin, one bad line.
    let mut ndjson = event(77);
    ndjson.extend_from_slice(b"\n{\"ChatEvent\": {\"Id\": \"x\", \"Type\": \"t\"}}\n");
    let (code, out, _) = run(&process, &["publish", "-"], Some(&ndjson));
    assert_eq!(code, 1, "a rejected event makes publish fail");
    assert!(
        out.starts_with("stored 1, duplicates 0, rejected 1\n"),
        "{out}"
    );
    assert!(
        out.contains("rejected stdin#2: ChatEvent.Id: expected a positive integer"),
        "{out}"
    );
}

#[test]
fn subscribe_prints_json_in_the_webhook_shape_lines_and_its_cursor() {
    let process = Process::start(&["--store", "memory"]);
    run(&process, &["publish", FIXTURES[0], FIXTURES[1]], None);

    let (code, out, err) = run(
        &process,
        &[
            "subscribe",
            "--from-beginning",
            "--exit-after",
            "2",
            "--output",
            "json",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines,
        vec![fixture(0), fixture(1)],
        "each line is the webhook body as sent"
    );
    assert!(err.contains("cursor: 2"), "{err}");

    let (code, out, _) = run(
        &process,
        &[
            "subscribe",
            "--after",
            "0",
            "--type",
            "message_created",
            "--exit-after",
            "1",
        ],
        None,
    );
    assert_eq!(code, 0);
    assert!(out.starts_with("#2 "), "{out}");
    assert!(
        out.contains("message_created id=608 chat=21 user=1 actor=user"),
        "{out}"
    );
    assert!(
        !out.contains('\u{1b}'),
        "no colours when stdout is not a terminal"
    );

    let (code, out, _) = run(&process, &["get", "--event-id", "608"], None);
    assert_eq!(code, 0);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        fixture(1)
    );
    let (code, _, err) = run(&process, &["get", "--sequence", "99"], None);
    assert_ne!(code, 0);
    assert!(
        err.contains("NotFound") || err.contains("not found"),
        "{err}"
    );
}

#[test]
fn subscribe_reconnects_after_a_gateway_restart_and_resumes_without_repeats() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap().to_owned();
    let mut gateway = Process::embedded(dir.path(), &[]);
    let listen = gateway.addr.to_string();
    let http = reqwest::blocking_post;
    http(&gateway.url("/v1/events"), event(1));

    let mut subscriber = cli(&gateway, &["subscribe", "--from-beginning"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(subscriber.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("#1 "));

    gateway.kill();
    let gateway = Process::start_on(&listen, &["--store", "embedded", "--data-dir", &data]);
    http(&gateway.url("/v1/events"), event(2));
    let next = lines.next().unwrap().unwrap();
    assert!(
        next.starts_with("#2 "),
        "resumed after the restart at the next sequence: {next}"
    );

    // SIGINT: the subscriber exits cleanly and prints its cursor.
    // SAFETY: kill(2) on our own child with a valid signal.
    unsafe {
        libc::kill(subscriber.id() as libc::pid_t, libc::SIGINT);
    }
    let status = subscriber.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(&mut subscriber.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("cursor: 2"), "{err}");
    assert!(lines.next().is_none(), "nothing repeated");
}

/// Tiny blocking POST for tests that are not async.
mod reqwest {
    pub fn blocking_post(url: &str, body: Vec<u8>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let response = ::reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        });
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn subscribe_reports_an_event_it_cannot_decode_and_goes_on() {
    use iqchannels_gateway::log::embedded::{EmbeddedLog, Retention};
    use iqchannels_gateway::log::{EventLog, NewRecord};
    use iqchannels_gateway::wire::StoredEvent;
    use prost::Message;

    // A store whose first record holds an envelope no decoder reads (a field that claims more
    // bytes than there are), as an older or damaged store might; the second is a real event.
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
        let records = [
            (1, bytes::Bytes::from_static(&[0x0a, 0x7f, 0x01])),
            (
                2,
                iqchannels_gateway::decode::decode(&event(2))
                    .unwrap()
                    .envelope
                    .encode_to_vec()
                    .into(),
            ),
        ]
        .map(|(id, envelope)| NewRecord {
            event_id: Some(id),
            received_at_ms: 1,
            payload: StoredEvent {
                envelope,
                ..StoredEvent::default()
            }
            .encode_to_vec()
            .into(),
        });
        log.append_all(records.to_vec()).await.unwrap();
    });
    drop(runtime);
    let data_dir = dir.path().to_str().unwrap();
    let process = Process::start(&["--store", "embedded", "--data-dir", data_dir]);
    let (code, out, err) = run(
        &process,
        &["subscribe", "--from-beginning", "--exit-after", "1"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("event 1 cannot be decoded"), "{err}");
    assert!(out.starts_with("#2 "), "{out}");
    assert!(err.contains("cursor: 2"), "{err}");
    assert!(!err.contains("reconnecting"), "{err}");
}
