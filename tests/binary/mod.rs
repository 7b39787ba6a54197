//! Runs the real `iqchannels-gateway` binary for end-to-end tests: on port 0, its address read
//! from its JSON log, killed with SIGKILL on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use iqchannels_gateway::pb::client::event_gateway_client::EventGatewayClient;
use tonic::transport::Channel;

/// The gateway binary: the one cargo built, or `IQGW_TEST_BINARY` (a long run keeps its own copy
/// while the tree is rebuilt).
pub fn gateway_binary() -> std::path::PathBuf {
    std::env::var_os("IQGW_TEST_BINARY")
        .map(Into::into)
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_iqchannels-gateway").into())
}

/// A running gateway process.
pub struct Process {
    child: Child,
    /// The address it serves HTTP and gRPC on.
    pub addr: SocketAddr,
    /// Its log lines so far (the first [`KEPT_LINES`]).
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

/// Log lines a [`Process`] keeps for [`Process::logged`].
const KEPT_LINES: usize = 10_000;

impl Process {
    /// Starts `serve` with `args` (plus `--listen 127.0.0.1:0 --log-format json`) and waits for
    /// its "listening" log line.
    pub fn start(args: &[&str]) -> Self {
        Self::start_on("127.0.0.1:0", args)
    }

    /// Like [`Process::start`], on a given address (to restart on the same port).
    pub fn start_on(listen: &str, args: &[&str]) -> Self {
        Self::start_with(listen, args, &[])
    }

    /// Like [`Process::start_on`], with environment variables (`IQGW_*`, `IQGW_LOG`) set.
    pub fn start_with(listen: &str, args: &[&str], envs: &[(&str, &str)]) -> Self {
        let mut child = Command::new(gateway_binary())
            .arg("serve")
            .args(["--listen", listen, "--log-format", "json"])
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the gateway binary starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, rx) = mpsc::channel();
        // The lines are kept: a gateway that exits before listening says why, and tests look
        // for what it logged.
        let early = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = early.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                if let Some(address) = parsed["fields"]["address"].as_str() {
                    let _ = tx.send(address.to_owned());
                }
                if let Ok(mut seen) = seen.lock() {
                    if seen.len() < KEPT_LINES {
                        seen.push(line.clone());
                    }
                }
                if std::env::var_os("GATEWAY_LOG").is_some() {
                    eprintln!("gateway: {line}");
                }
            }
        });
        let address = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|error| {
                let lines = early.lock().map(|l| l.join("\n")).unwrap_or_default();
                panic!("the gateway did not log its address ({error}); it said:\n{lines}")
            });
        Self {
            child,
            addr: address.parse().expect("a socket address"),
            log: early,
        }
    }

    /// What it has logged so far (JSON lines).
    pub fn logged(&self) -> Vec<String> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The gateway on a data dir (embedded store).
    pub fn embedded(dir: &Path, extra: &[&str]) -> Self {
        let dir = dir.to_str().expect("utf-8 temp path");
        let mut args = vec!["--store", "embedded", "--data-dir", dir];
        args.extend_from_slice(extra);
        Self::start(&args)
    }

    /// Base URL for HTTP.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// POSTs [`event`]`(id)` to `/v1/events`; the HTTP status.
    pub async fn post_event(&self, id: i64) -> u16 {
        reqwest::Client::new()
            .post(self.url("/v1/events"))
            .header("content-type", "application/json")
            .body(event(id))
            .send()
            .await
            .expect("ingest answers")
            .status()
            .as_u16()
    }

    /// POSTs [`event`]`(id)` to `/v1/events`; the JSON answer.
    pub async fn post_event_answer(&self, id: i64) -> serde_json::Value {
        reqwest::Client::new()
            .post(self.url("/v1/events"))
            .header("content-type", "application/json")
            .body(event(id))
            .send()
            .await
            .expect("ingest answers")
            .json()
            .await
            .expect("a JSON answer")
    }

    /// A gRPC client.
    pub async fn grpc(&self) -> EventGatewayClient<Channel> {
        EventGatewayClient::connect(format!("http://{}", self.addr))
            .await
            .expect("gRPC connects")
    }

    /// SIGKILL, no chance to flush anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: asks for a graceful shutdown.
    pub fn terminate(&self) {
        // SAFETY: kill(2) with a pid we own and a valid signal number.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The value of the metric `name` (a series without labels) from /metrics; 0 when absent.
    #[allow(dead_code)]
    pub async fn metric(&self, name: &str) -> u64 {
        let text = reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text");
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .map_or(0, |value| value as u64)
    }

    /// Resident memory of the process, KiB.
    pub fn rss_kib(&self) -> u64 {
        self.status_kib("VmRSS:")
    }

    /// The largest resident memory the process has had so far, KiB (the kernel's high-water
    /// mark: no peak is missed between samples).
    #[allow(dead_code)]
    pub fn peak_rss_kib(&self) -> u64 {
        self.status_kib("VmHWM:")
    }

    fn status_kib(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The 2021 fixture with its `ChatEvent.Id` replaced.
pub fn event(id: i64) -> Vec<u8> {
    static FIXTURE: &str = include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/chat_closed.json"
    ));
    let mut value: serde_json::Value = serde_json::from_str(FIXTURE).expect("fixture is JSON");
    value["ChatEvent"]["Id"] = id.into();
    serde_json::to_vec(&value).expect("serializes")
}

/// Acknowledged events: `ChatEvent.Id` -> sequence.
pub type Acked = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, u64>>>;

/// `count` concurrent writers posting events with unique ids (`first_id + writer * stride + k`)
/// to `url` until a request fails or is refused; every 200 is recorded in `acked`.
pub fn spawn_writers(
    url: String,
    count: i64,
    first_id: i64,
    stride: i64,
    acked: Acked,
) -> Vec<tokio::task::JoinHandle<()>> {
    let http = reqwest::Client::new();
    (0..count)
        .map(|writer| {
            let (http, url, acked) = (http.clone(), url.clone(), acked.clone());
            tokio::spawn(async move {
                for k in 0.. {
                    let id = first_id + writer * stride + k;
                    let sent = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .body(event(id))
                        .send()
                        .await;
                    let Ok(response) = sent else { return };
                    if response.status() != 200 {
                        return;
                    }
                    let Ok(body) = response.json::<serde_json::Value>().await else {
                        return;
                    };
                    let sequence = body["sequence"].as_u64().expect("a 200 carries a sequence");
                    acked
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(id, sequence);
                }
            })
        })
        .collect()
}

/// Runs `serve` with `args` and `envs` (JSON logs; port 0 unless `args` has a `--listen`) to its
/// exit, for a start that must fail: panics if it has not exited within `timeout` (what it said
/// so far in the message).
pub fn serve_to_exit(
    args: &[&str],
    envs: &[(&str, &str)],
    timeout: Duration,
) -> (std::process::ExitStatus, String) {
    let listen: &[&str] = if args.contains(&"--listen") {
        &[]
    } else {
        &["--listen", "127.0.0.1:0"]
    };
    let mut child = Command::new(gateway_binary())
        .arg("serve")
        .args(listen)
        .args(["--log-format", "json"])
        .args(args)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the gateway binary starts");
    let stderr = child.stderr.take().expect("stderr is piped");
    let said = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let reader = {
        let said = said.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut said) = said.lock() {
                    if said.len() < 1 << 20 {
                        said.push_str(&line);
                        said.push('\n');
                    }
                }
            }
        })
    };
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let said = said.lock().map(|s| s.clone()).unwrap_or_default();
            let tail: String = said.lines().rev().take(5).collect::<Vec<_>>().join("\n");
            panic!(
                "`serve {}` did not exit within {timeout:?}; last lines:\n{tail}",
                args.join(" ")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = reader.join();
    let said = said.lock().map(|s| s.clone()).unwrap_or_default();
    (status, said)
}
