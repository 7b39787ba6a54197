//! The client commands (`publish`, `subscribe`, `get`), driving the real binary against a real
//! gateway process.

mod binary;
mod nats;
mod private_nats;

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
    run_command(cli(process, args), stdin)
}

fn run_command(mut command: Command, stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut child = command
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

/// The `text="..."` a readable line ends with, if any.
fn line_text(line: &str) -> Option<&str> {
    line.split_once(" text=\"")
        .and_then(|(_, rest)| rest.strip_suffix('"'))
}

#[test]
fn references_print_in_json_and_lines_show_the_message_text_shortened() {
    let process = Process::start(&["--store", "memory"]);
    let text = format!("Добрый день!\n\n{}", "Подскажите, пожалуйста, ".repeat(5));
    let message = serde_json::json!({
        "ChatEvent": {"Id": 700, "Type": "message_created", "ChatId": 21, "MessageId": 301,
                      "Actor": "client", "ClientId": 21},
        "Rels": {
            "Chats": [{"Id": 21, "ProjectId": 1, "ChannelId": 1, "ClientId": 21}],
            "ChatMessages": [{"Id": 301, "ChatId": 21, "Author": "client", "ClientId": 21,
                              "Payload": "text", "Text": text}],
            "Clients": [{"Id": 21, "Name": "Клиент"}]
        }
    });
    let (code, out, _) = run(
        &process,
        &["publish", FIXTURES[0], FIXTURES[1], "-"],
        Some(message.to_string().as_bytes()),
    );
    assert_eq!(
        (code, out.lines().next()),
        (0, Some("stored 3, duplicates 0, rejected 0"))
    );

    let (code, out, err) = run(
        &process,
        &[
            "subscribe",
            "--from-beginning",
            "--exit-after",
            "3",
            "--output",
            "json",
            "--references",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let mut lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{out}");
    let references: Vec<serde_json::Value> = lines
        .iter_mut()
        .map(|line| line.as_object_mut().unwrap().remove("references").unwrap())
        .collect();
    assert_eq!(
        lines[..2],
        [fixture(0), fixture(1)],
        "the webhook body as sent, plus `references`"
    );
    assert_eq!(references[0]["client"]["Name"], "Альфред Хичкок");
    assert!(references[0].get("message").is_none(), "{}", references[0]);
    assert_eq!(references[1]["chat"]["Id"], 21);
    assert_eq!(references[1]["message"]["Id"], 300);
    assert_eq!(references[1]["file"]["Name"], "example-request.json");
    assert_eq!(references[1]["user"]["Id"], 1);
    assert_eq!(references[2]["message"]["Text"], text.as_str());
    assert_eq!(references[2]["client"]["Name"], "Клиент");

    // The readable line: the message text on one line, shortened; from Rels without the flag,
    // from the resolved message with it.
    for flag in [None, Some("--references")] {
        let mut args = vec!["subscribe", "--from-beginning", "--exit-after", "3"];
        args.extend(flag);
        let (code, out, err) = run(&process, &args, None);
        assert_eq!(code, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert_eq!(line_text(lines[0]), None, "chat_closed has no message");
        assert_eq!(
            line_text(lines[1]),
            None,
            "message 300 is a file without text"
        );
        let shown = line_text(lines[2]).expect("the message text");
        assert!(
            shown.starts_with("Добрый день! Подскажите, пожалуйста,"),
            "{shown}"
        );
        assert!(shown.ends_with('…'), "{shown}");
        assert!((50..=60).contains(&shown.chars().count()), "{shown}");
    }

    // `get` takes the flag too, here from its environment variable.
    let mut get = cli(&process, &["get", "--event-id", "608"]);
    get.env("IQGW_REFERENCES", "true");
    let (code, out, err) = run_command(get, None);
    assert_eq!(code, 0, "{err}");
    let event: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(event["references"]["file"]["Name"], "example-request.json");
    assert_eq!(event["ChatEvent"], fixture(1)["ChatEvent"]);
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

    // Record 3's payload is damaged: the gateway says so (DATA_LOSS) and the CLI stops with its
    // cursor instead of reconnecting to it forever.
    drop(process);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let log = EmbeddedLog::open(dir.path(), Retention::default()).unwrap();
        log.append_all(vec![NewRecord {
            event_id: Some(3),
            received_at_ms: 1,
            payload: bytes::Bytes::from_static(b"\xff\xff\xff"),
        }])
        .await
        .unwrap();
        log.close().await;
    });
    drop(runtime);
    let process = Process::start(&["--store", "embedded", "--data-dir", data_dir]);
    let (code, out, err) = run(&process, &["subscribe", "--after", "1"], None);
    assert_ne!(code, 0, "{err}");
    assert!(out.starts_with("#2 "), "{out}");
    assert!(err.contains("DataLoss") || err.contains("corrupt"), "{err}");
    assert!(err.contains("cursor: 2"), "{err}");
    assert!(!err.contains("reconnecting"), "{err}");
}

/// Sends `signal` to a child process.
fn send_signal(child: &std::process::Child, signal: libc::c_int) {
    // SAFETY: kill(2) on our own child with a valid signal number.
    unsafe {
        libc::kill(child.id() as libc::pid_t, signal);
    }
}

/// Waits (at most 20 s) for a child to exit; its exit code (`-signal` when a signal ended it)
/// and stderr.
fn exit_of(mut child: std::process::Child) -> (i32, String) {
    use std::os::unix::process::ExitStatusExt;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the subscriber did not exit");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut stderr) = child.stderr.take() {
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    }
    let code = status
        .code()
        .unwrap_or_else(|| -status.signal().unwrap_or(0));
    (code, err)
}

/// `GET /v1/stats` of the gateway.
fn stats(process: &Process) -> serde_json::Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        ::reqwest::get(process.url("/v1/stats"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

/// Waits until the gateway has exactly `count` subscribers.
fn wait_for_subscribers(process: &Process, count: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stats(process)["subscribers"].as_array().map(Vec::len) != Some(count) {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway never had {count} subscribers: {}",
            stats(process)
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn subscribe_prints_its_cursor_and_exits_0_on_sigterm_and_sigint_never_before_where_it_started() {
    let process = Process::start(&["--store", "memory"]);
    let ndjson: Vec<u8> = (1..=41)
        .flat_map(|id| {
            let mut line = event(id);
            line.push(b'\n');
            line
        })
        .collect();
    let (code, out, _) = run(&process, &["publish", "-"], Some(&ndjson));
    assert_eq!(
        (code, out.lines().next()),
        (0, Some("stored 41, duplicates 0, rejected 0"))
    );
    // The store the cursor belongs to is printed beside it.
    let (_, _, first) = run(
        &process,
        &["subscribe", "--from-beginning", "--exit-after", "1"],
        None,
    );
    let store = first
        .lines()
        .find_map(|line| line.strip_prefix("store: "))
        .expect("the store is named")
        .to_owned();
    assert!(store.starts_with("memory:"), "{first}");
    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGINT, "SIGINT")] {
        // Nothing arrives after 41: the cursor is still 41, not `none`.
        let subscriber = cli(&process, &["subscribe", "--after", "41"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_subscribers(&process, 1);
        send_signal(&subscriber, signal);
        let (code, err) = exit_of(subscriber);
        assert_eq!(code, 0, "{name}: {err}");
        assert_eq!(err, format!("cursor: 41\nstore: {store}\n"), "{name}");

        // One event arrives: the cursor is its sequence.
        let mut subscriber = cli(&process, &["subscribe", "--after", "40"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(subscriber.stdout.take().unwrap()).lines();
        assert!(lines.next().unwrap().unwrap().starts_with("#41 "));
        send_signal(&subscriber, signal);
        let (code, err) = exit_of(subscriber);
        assert_eq!(code, 0, "{name}: {err}");
        assert_eq!(err, format!("cursor: 41\nstore: {store}\n"), "{name}");
        wait_for_subscribers(&process, 0);
    }

    // Interrupted while reconnecting to a gateway that is gone: the same.
    let listen = process.addr.to_string();
    let subscriber = cli(&process, &["subscribe", "--after", "41"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_subscribers(&process, 1);
    drop(process);
    // Long enough for it to notice and report the lost stream, even on a loaded machine.
    std::thread::sleep(std::time::Duration::from_secs(2));
    send_signal(&subscriber, libc::SIGTERM);
    let (code, err) = exit_of(subscriber);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("reconnecting"), "{err}");
    assert!(
        err.ends_with(&format!("cursor: 41\nstore: {store}\n")),
        "{listen}: {err}"
    );
}

/// An event of `bytes` bytes or more (a long message text in `Rels`).
fn large_event(id: i64, bytes: usize) -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(&event(id)).unwrap();
    value["Rels"]["ChatMessages"] = serde_json::json!([{
        "Id": 1, "ChatId": 21, "Author": "client", "Payload": "text", "Text": "x".repeat(bytes)
    }]);
    serde_json::to_vec(&value).unwrap()
}

#[test]
fn publish_counts_an_oversized_event_as_a_rejection_sends_the_rest_and_prints_the_summary() {
    // The gateway's default limit (--max-body-bytes) is 1 MiB; the gRPC message is refused.
    let process = Process::start(&["--store", "memory"]);
    let dir = tempfile::tempdir().unwrap();
    let ndjson = dir.path().join("events.ndjson");
    let mut lines = event(501);
    lines.push(b'\n');
    lines.extend(large_event(502, 2 << 20));
    lines.push(b'\n');
    lines.extend(event(503));
    std::fs::write(&ndjson, lines).unwrap();
    let ndjson = ndjson.to_str().unwrap();
    let (code, out, err) = run(
        &process,
        &["publish", FIXTURES[0], ndjson, FIXTURES[1]],
        None,
    );
    assert_eq!(code, 1, "a rejected event makes publish fail: {out}{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("stored 4, duplicates 0, rejected 1"),
        "{out}{err}"
    );
    let rejection = lines.next().unwrap_or_default();
    assert!(
        rejection.starts_with(&format!("rejected {ndjson}#2: ")) && rejection.contains("too large"),
        "{out}"
    );
    assert_eq!(lines.next(), None, "{out}");
    for id in ["501", "503", "608"] {
        let (code, _, err) = run(&process, &["get", "--event-id", id], None);
        assert_eq!(
            code, 0,
            "event {id} was sent after the oversized one: {err}"
        );
    }
    assert_eq!(stats(&process)["last_sequence"], 4);

    // An error that is not about one event (here, a token without the publish scope) stops
    // publish, still with the summary and what was not sent.
    let process = Process::start(&["--store", "memory", "--grpc-token", "subscribe:reader"]);
    let (code, out, err) = run(
        &process,
        &["publish", "--token", "reader", FIXTURES[0], FIXTURES[1]],
        None,
    );
    assert_eq!(code, 1, "{out}{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("stored 0, duplicates 0, rejected 0"),
        "{out}"
    );
    let stopped = lines.next().unwrap_or_default();
    assert!(
        stopped.starts_with(&format!("stopped at {}#1: ", FIXTURES[0]))
            && stopped.contains("permission")
            && stopped.ends_with("; 2 not sent"),
        "{out}"
    );
}

/// A self-signed certificate for `names`, marked CA:TRUE as `openssl req -x509` makes it, valid
/// from `from` to `until`; writes `NAME.pem` and `NAME.key` in `dir`, returns the certificate's
/// path.
fn self_signed(
    dir: &std::path::Path,
    name: &str,
    names: &[&str],
    (from, until): (i32, i32),
) -> std::path::PathBuf {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, names[0]);
    params.not_before = rcgen::date_time_ymd(from, 1, 1);
    params.not_after = rcgen::date_time_ymd(until, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let path = dir.join(format!("{name}.pem"));
    std::fs::write(&path, cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    path
}

/// The gateway over TLS with `NAME.pem`/`NAME.key` of `dir`.
fn tls_gateway(dir: &std::path::Path, name: &str) -> Process {
    let path = |ext: &str| {
        dir.join(format!("{name}.{ext}"))
            .to_str()
            .unwrap()
            .to_owned()
    };
    Process::start(&[
        "--store",
        "memory",
        "--tls-cert",
        &path("pem"),
        "--tls-key",
        &path("key"),
    ])
}

/// `publish` of the first fixture to `server` with `--ca-cert ca`.
fn publish_over_tls(server: &str, ca: &std::path::Path) -> (i32, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_iqchannels-gateway"));
    command
        .args(["publish", "--server", server, "--ca-cert"])
        .arg(ca)
        .arg(FIXTURES[0]);
    run_command(command, None)
}

#[test]
fn the_cli_trusts_the_self_signed_ca_true_certificate_given_as_ca_cert_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["localhost", "127.0.0.1"];
    let served = self_signed(dir.path(), "served", &names, (2020, 2200));
    let gateway = tls_gateway(dir.path(), "served");
    let port = gateway.addr.port();

    // The very certificate the server presents: trusted, by DNS name and by IP address.
    for server in [
        format!("https://localhost:{port}"),
        format!("https://127.0.0.1:{port}"),
    ] {
        let (code, out, err) = publish_over_tls(&server, &served);
        assert_eq!(code, 0, "{server}: {out}{err}");
        assert!(
            out.starts_with("stored 1") || out.starts_with("stored 0, duplicates 1"),
            "{out}"
        );
    }
    // IQGW_CA_CERT does the same, for subscribe too.
    let mut command = Command::new(env!("CARGO_BIN_EXE_iqchannels-gateway"));
    command
        .args(["subscribe", "--from-beginning", "--exit-after", "1"])
        .env("IQGW_SERVER", format!("https://localhost:{port}"))
        .env("IQGW_CA_CERT", &served);
    let (code, out, err) = run_command(command, None);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("#1 "), "{out}");

    // Another self-signed certificate for the same names: refused.
    let other = self_signed(dir.path(), "other", &names, (2020, 2200));
    let (code, out, err) = publish_over_tls(&format!("https://localhost:{port}"), &other);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("certificate"), "{err}");

    // The given certificate, but for another name, or expired: refused.
    for (name, names, dates, why) in [
        (
            "elsewhere",
            &["elsewhere.invalid"][..],
            (2020, 2200),
            "name",
        ),
        ("expired", &names[..], (2020, 2021), "expired"),
    ] {
        let pinned = self_signed(dir.path(), name, names, dates);
        let gateway = tls_gateway(dir.path(), name);
        let server = format!("https://localhost:{}", gateway.addr.port());
        let (code, out, err) = publish_over_tls(&server, &pinned);
        assert_ne!(code, 0, "{name}: {out}");
        assert!(err.to_lowercase().contains(why), "{name}: {err}");
    }

    // A certificate issued by the given CA: trusted the usual way.
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&leaf_key, &ca)
        .unwrap();
    std::fs::write(dir.path().join("leaf.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.path().join("leaf.key"), leaf_key.serialize_pem()).unwrap();
    let gateway = tls_gateway(dir.path(), "leaf");
    let server = format!("https://localhost:{}", gateway.addr.port());
    let (code, out, err) = publish_over_tls(&server, &dir.path().join("ca.pem"));
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn publish_reports_an_event_under_a_stored_id_with_other_content_as_a_conflict_and_fails() {
    let process = Process::start(&["--store", "memory"]);
    let (code, out, err) = run(&process, &["publish", FIXTURES[0]], None);
    assert_eq!(code, 0, "{out}{err}");
    // The same id with another chat: a sender reusing ids. Then the same event again, only
    // formatted differently: a plain redelivery.
    let mut other = fixture(0);
    other["ChatEvent"]["ChatId"] = 987_654.into();
    let mut input = serde_json::to_vec(&other).unwrap();
    input.push(b'\n');
    input.extend(serde_json::to_vec(&fixture(0)).unwrap());
    let (code, out, err) = run(&process, &["publish", "-"], Some(&input));
    assert_eq!(
        code, 1,
        "content that was not stored fails publish: {out}{err}"
    );
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("stored 0, duplicates 1, conflicts 1, rejected 0"),
        "{out}"
    );
    assert_eq!(
        lines.next(),
        Some(
            "conflict stdin#1: the gateway has an event with this id and different content; not \
             stored"
        ),
        "{out}"
    );
    assert_eq!(lines.next(), None, "{out}");
    assert_eq!(stats(&process)["last_sequence"], 1);
}

/// An address where nothing listens (yet).
fn free_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn publish_waits_for_a_gateway_that_is_not_up_yet_and_stops_at_once_with_retry_for_0() {
    let address = free_address();
    let publish = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_iqchannels-gateway"));
        command
            .args(["publish", "--server", &format!("http://{address}")])
            .args(extra)
            .args([FIXTURES[0], FIXTURES[1]])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        command
    };

    let (code, out, err) = run_command(publish(&["--retry-for", "0"]), None);
    assert_eq!(code, 1, "{out}{err}");
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some("stored 0, duplicates 0, rejected 0"),
        "{out}{err}"
    );
    let stopped = lines.next().unwrap_or_default();
    assert!(
        stopped.starts_with(&format!("stopped at {}#1: ", FIXTURES[0]))
            && stopped.ends_with("; 2 not sent"),
        "{out}"
    );

    // Started before the gateway, which comes up on that address two seconds later.
    let child = publish(&[]).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(2));
    let process = Process::start_on(&address, &["--store", "memory"]);
    let output = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{out}{err}");
    assert_eq!(
        out.lines().next(),
        Some("stored 2, duplicates 0, rejected 0"),
        "{out}{err}"
    );
    assert_eq!(stats(&process)["last_sequence"], 2);
}

/// With the gateway's NATS server down, Publish answers UNAVAILABLE: `publish` sends the event
/// again until the store is back, and it is stored once.
#[test]
fn publish_resends_while_the_store_is_unavailable_and_it_is_stored_once_when_back() {
    if !nats::require("the nats-server binary", private_nats::installed()) {
        return;
    }
    let server =
        private_nats::PrivateNats::start(private_nats::free_port(), tempfile::tempdir().unwrap())
            .expect("a private nats-server starts");
    let process = Process::start(&["--store", &server.url(), "--nats-ack-timeout", "1s"]);
    let (code, out, err) = run(&process, &["publish", FIXTURES[0]], None);
    assert_eq!(code, 0, "{out}{err}");

    let (port, dir) = server.stop();
    let child = cli(&process, &["publish", FIXTURES[1]])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let _server = private_nats::PrivateNats::start(port, dir).expect("nats-server starts again");
    let output = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{out}{err}");
    // Stored by one of the attempts; a later one may find it already there.
    let first = out.lines().next().unwrap_or_default();
    assert!(
        first == "stored 1, duplicates 0, rejected 0"
            || first == "stored 0, duplicates 1, rejected 0",
        "{out}{err}"
    );
    assert_eq!(stats(&process)["last_sequence"], 2);
}

/// The gateway SIGKILLed and started again while `publish` sends: every event is stored once
/// (redelivery is safe), and `publish` ends with all of them accounted for.
#[test]
fn publish_goes_on_across_a_gateway_restart_and_stores_every_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut process = Process::embedded(dir.path(), &[]);
    let address = process.addr.to_string();
    let inputs = tempfile::tempdir().unwrap();
    let events = inputs.path().join("events.ndjson");
    let mut lines = Vec::new();
    for id in 1..=3000 {
        lines.extend(event(id));
        lines.push(b'\n');
    }
    std::fs::write(&events, lines).unwrap();
    let child = cli(&process, &["publish", events.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Kill it mid-way (once some events are in), then start it again on its address and store.
    let started = std::time::Instant::now();
    while stats(&process)["last_sequence"].as_u64().unwrap_or(0) < 300 {
        assert!(started.elapsed() < std::time::Duration::from_secs(60));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    process.kill();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let process = Process::start_on(
        &address,
        &[
            "--store",
            "embedded",
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
    );
    let output = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&output.stdout);
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{out}{err}");
    let counts: Vec<u64> = out
        .lines()
        .next()
        .unwrap_or_default()
        .split(", ")
        .filter_map(|part| part.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(counts.len(), 3, "{out}");
    assert_eq!(counts[0] + counts[1], 3000, "stored + duplicates: {out}");
    assert_eq!(counts[2], 0, "{out}");
    assert_eq!(stats(&process)["last_sequence"], 3000, "each stored once");
}
