//! What README and `--help` say of the server's settings is what the real binary does: group
//! commits at debug, boolean environment variables as operators write them, a host name for
//! `--listen`, colours only on a terminal, and `/metrics` open unless `--metrics-token` is set.

mod binary;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use binary::{event, serve_to_exit, Process};

async fn post(process: &Process, body: Vec<u8>) -> u16 {
    reqwest::Client::new()
        .post(process.url("/v1/events"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("ingest answers")
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commits_are_logged_at_debug_as_readme_says() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let process = Process::start_with(
        "127.0.0.1:0",
        &["--store", "embedded", "--data-dir", data_dir],
        &[("IQGW_LOG", "iqchannels_gateway=debug")],
    );
    assert_eq!(post(&process, event(1)).await, 200);
    let mut commit = None;
    for _ in 0..50 {
        commit = process
            .logged()
            .into_iter()
            .find(|line| line.contains("group commit synced"));
        if commit.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let commit = commit.expect("IQGW_LOG=iqchannels_gateway=debug logs each group commit");
    let line: serde_json::Value = serde_json::from_str(&commit).unwrap();
    assert_eq!(line["level"], "DEBUG", "{line}");
    assert_eq!(line["fields"]["records"], 1, "{line}");
}

/// An event with a field the proto cannot hold (a word where an id goes): stored with a
/// deviation, or refused under --strict-decode.
fn deviating_event() -> Vec<u8> {
    let mut value: serde_json::Value = serde_json::from_slice(&event(7)).unwrap();
    value["ChatEvent"]["ChatId"] = "twenty-one".into();
    serde_json::to_vec(&value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boolean_env_vars_take_1_0_yes_no_true_false() {
    for (value, strict) in [
        ("1", true),
        ("yes", true),
        ("true", true),
        ("0", false),
        ("no", false),
        ("false", false),
    ] {
        let process = Process::start_with(
            "127.0.0.1:0",
            &["--store", "memory"],
            &[("IQGW_STRICT_DECODE", value)],
        );
        let expected = if strict { 400 } else { 200 };
        assert_eq!(
            post(&process, deviating_event()).await,
            expected,
            "IQGW_STRICT_DECODE={value}"
        );
    }

    let open = Process::start_with(
        "0.0.0.0:0",
        &["--store", "memory"],
        &[("IQGW_ALLOW_UNAUTHENTICATED", "yes")],
    );
    drop(open);
    let (status, said) = serve_to_exit(
        &["--listen", "0.0.0.0:0", "--store", "memory"],
        &[("IQGW_ALLOW_UNAUTHENTICATED", "0")],
        Duration::from_secs(20),
    );
    assert!(!status.success(), "0 means no: {said}");
    assert!(said.contains("refusing to listen"), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_resolves_a_host_name() {
    let process = Process::start_on("localhost:0", &["--store", "memory"]);
    assert!(process.addr.ip().is_loopback(), "{}", process.addr);
    let response = reqwest::get(process.url("/healthz")).await.unwrap();
    assert_eq!(response.status(), 200);
}

#[test]
fn text_logs_have_no_colour_codes_when_stderr_is_not_a_terminal() {
    let mut child = Command::new(binary::gateway_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--store", "memory"])
        .args(["--log-format", "text"])
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the gateway binary starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let listening = line.contains("listening");
            lines.push(line);
            if listening {
                break;
            }
        }
        let _ = tx.send(lines);
    });
    let lines = rx.recv_timeout(Duration::from_secs(30));
    let _ = child.kill();
    let _ = child.wait();
    let lines = lines.expect("the gateway logs that it listens");
    assert!(
        lines.last().is_some_and(|line| line.contains("listening")),
        "{lines:?}"
    );
    for line in &lines {
        assert!(
            !line.contains('\u{1b}'),
            "an ANSI escape in a piped log: {line:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_metrics_token_when_one_is_set_and_are_open_otherwise() {
    let http = reqwest::Client::new();
    let guarded = Process::start(&["--store", "memory", "--metrics-token", "m3trics"]);
    let get = |token: Option<&str>| {
        let mut request = http.get(guarded.url("/metrics"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let missing = get(None).await.unwrap();
    assert_eq!(missing.status(), 401);
    assert!(missing.headers().contains_key("www-authenticate"));
    assert_eq!(get(Some("wrong")).await.unwrap().status(), 401);
    let allowed = get(Some("m3trics")).await.unwrap();
    assert_eq!(allowed.status(), 200);
    assert!(allowed.text().await.unwrap().contains("iqgw_"));

    let open = Process::start(&["--store", "memory"]);
    let response = http.get(open.url("/metrics")).send().await.unwrap();
    assert_eq!(response.status(), 200, "open by default, as README says");
}
