//! Walks README.md as a newcomer would: every command of its ```sh / ```bash blocks, top to
//! bottom, in one scratch directory, against the gateway binary cargo built (as
//! `iqchannels-gateway` on PATH) with the real clients (curl, grpcurl, openssl), so an example
//! that stops working fails CI.
//!
//! How a command is run:
//! - `... serve ...` starts a gateway in the background (the README starts it with `&` or in a
//!   terminal of its own). It listens where the command says, or on `IQGW_LISTEN`; either way the
//!   walk makes it listen on a free port and rewrites that address (as `127.0.0.1:PORT` and
//!   `localhost:PORT`) in every later command, and `IQGW_SERVER` follows the latest plain-HTTP
//!   gateway. `verify` and `export` first stop the running gateways (README: "stop the gateway").
//! - A stream (`subscribe` without `--exit-after`, gRPC `Subscribe`, `curl -N`, the example
//!   consumer) runs for [`STREAM_SECS`]: it passes if it is still running then, or exited 0;
//!   started from the beginning, it must have printed something (it gets up to
//!   [`STREAM_PATIENCE_SECS`] for that, and for the output README shows).
//! - Anything else must exit 0 within [`COMMAND_SECS`].
//! - Comment lines right after a command that start with `# {`, `# id: ` or `# data: ` show its
//!   output: each must match a line it printed (`...` stands for any text).
//! - `cargo run --release --` and `cargo run --example consumer --` run the binaries cargo built.
//! - A block right after `<!-- illustrative: REASON -->` is not run; the walk lists it as
//!   skipped with its reason. A command that needs a tool this machine lacks is skipped with the
//!   tool named, and is a failure under `CI=true`.

mod binary;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a stream runs before it is stopped.
const STREAM_SECS: u64 = 3;
/// How long a stream may take to print what it must (from the beginning; the output README
/// shows) before it is stopped and fails.
const STREAM_PATIENCE_SECS: u64 = 20;
/// How long any other command may take.
const COMMAND_SECS: u64 = 60;

/// One shell command of README, with where it is and the output README shows for it.
#[derive(Debug, Clone)]
struct Example {
    /// Line number in README (1-based) of the command's first line.
    line: usize,
    /// The command (continuation lines joined).
    command: String,
    /// Output lines README shows right after it (checked ones only).
    shown: Vec<String>,
}

/// A block of README: its commands, or why it is not run.
#[derive(Debug)]
enum Block {
    Run(Vec<Example>),
    Illustrative { line: usize, reason: String },
}

/// The ```sh and ```bash blocks of `markdown`.
fn blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let lines: Vec<&str> = markdown.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let fence = lines[i].trim_start();
        if !(fence.starts_with("```sh") || fence.starts_with("```bash"))
            || !fence[3..]
                .trim_end()
                .chars()
                .all(|c| c.is_ascii_alphabetic())
        {
            i += 1;
            continue;
        }
        let start = i + 1;
        let mut end = start;
        while end < lines.len() && !lines[end].trim_start().starts_with("```") {
            end += 1;
        }
        let previous = lines[..i].iter().rev().find(|l| !l.trim().is_empty());
        let illustrative = previous.and_then(|l| {
            l.trim()
                .strip_prefix("<!-- illustrative:")
                .and_then(|rest| rest.strip_suffix("-->"))
                .map(|reason| reason.trim().to_owned())
        });
        blocks.push(match illustrative {
            Some(reason) => Block::Illustrative {
                line: start + 1,
                reason,
            },
            None => Block::Run(commands(&lines[start..end], start + 1)),
        });
        i = end + 1;
    }
    blocks
}

/// The commands of a block's lines (`first` = README line number of the first).
fn commands(lines: &[&str], first: usize) -> Vec<Example> {
    let mut examples: Vec<Example> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line.is_empty() {
            i += 1;
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim();
            let output = comment.starts_with('{')
                || comment.starts_with("id: ")
                || comment.starts_with("data: ");
            if let (true, Some(last)) = (output, examples.last_mut()) {
                last.shown.push(comment.to_owned());
            }
            i += 1;
            continue;
        }
        let line_number = first + i;
        let mut command = String::new();
        loop {
            let part = lines[i].trim_end();
            match part.strip_suffix('\\') {
                Some(head) if i + 1 < lines.len() => {
                    command.push_str(head);
                    command.push(' ');
                    i += 1;
                }
                _ => {
                    command.push_str(part);
                    i += 1;
                    break;
                }
            }
        }
        examples.push(Example {
            line: line_number,
            command: command.trim().to_owned(),
            shown: Vec::new(),
        });
    }
    examples
}

/// Whether `text` matches `pattern`, where `...` in the pattern stands for any text.
fn matches(pattern: &str, text: &str) -> bool {
    let pieces: Vec<&str> = pattern.split("...").collect();
    let (first, rest) = pieces.split_first().expect("split yields one piece");
    let Some(mut remaining) = text.strip_prefix(first) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty();
    };
    for piece in middle {
        match remaining.find(piece) {
            Some(at) => remaining = &remaining[at + piece.len()..],
            None => return false,
        }
    }
    remaining.ends_with(last)
}

/// What kind of command an example is.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// Starts a gateway.
    Serve,
    /// Runs until stopped.
    Stream,
    /// Runs to its end.
    Once,
}

fn kind(command: &str) -> Kind {
    if command.contains("iqchannels-gateway serve") || command.contains("-- serve") {
        Kind::Serve
    } else if (command.contains("iqchannels-gateway subscribe")
        && !command.contains("--exit-after"))
        || command.contains("EventGateway/Subscribe")
        || command.contains("Health/Watch")
        || command.contains("curl -N")
        || command.contains("--example consumer")
    {
        Kind::Stream
    } else {
        Kind::Once
    }
}

/// The tools a command runs that may be missing.
fn tools(command: &str) -> Vec<&'static str> {
    ["curl", "grpcurl", "openssl"]
        .into_iter()
        .filter(|tool| {
            command
                .split(|c: char| c.is_whitespace() || c == '|' || c == ';' || c == '(')
                .any(|word| word == *tool)
        })
        .collect()
}

fn on_path(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A command started in its own process group, its output collected by threads.
struct Running {
    child: Child,
    stdout: mpsc::Receiver<String>,
    stderr: mpsc::Receiver<String>,
}

impl Running {
    /// Stops the command and everything it started (SIGTERM to its group, then SIGKILL).
    fn stop(&mut self) {
        let group = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on the process group of a child we started with its own group.
        unsafe {
            libc::kill(-group, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // SAFETY: as above.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// Waits for the command to end, at most `timeout`; `None` if it is still running.
    fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The rest of a stopped command's output: until its pipe closes (at most 5 s, should
/// something it started in the background keep the pipe open).
fn drain(receiver: &mpsc::Receiver<String>) -> Vec<String> {
    let end = Instant::now() + Duration::from_secs(5);
    let mut lines = Vec::new();
    while let Ok(line) = receiver.recv_timeout(end.saturating_duration_since(Instant::now())) {
        lines.push(line);
    }
    lines
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// The walk's scratch directory, its environment and its gateways.
struct Walk {
    dir: PathBuf,
    /// README address (`127.0.0.1:8080`) -> the port a gateway started for it really has.
    ports: BTreeMap<u16, u16>,
    /// The gateways started so far, by README address port.
    gateways: Vec<(u16, Running)>,
    /// `IQGW_SERVER` for the CLI: the latest plain-HTTP gateway.
    server: Option<String>,
    /// `(README line, command, why)` of every command not run.
    skipped: Vec<(usize, String, String)>,
    /// Commands run.
    ran: usize,
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_iqchannels-gateway"))
        .parent()
        .expect("the binary is in a directory")
        .to_owned()
}

/// The example consumer cargo built (`cargo test --all-targets` builds examples).
fn example_consumer() -> PathBuf {
    bin_dir().join("examples").join("consumer")
}

impl Walk {
    fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            ports: BTreeMap::new(),
            gateways: Vec::new(),
            server: None,
            skipped: Vec::new(),
            ran: 0,
        }
    }

    /// `command` with README's addresses replaced by the real ones and `cargo run` by the
    /// binaries.
    fn rewrite(&self, command: &str) -> String {
        let mut command = command
            .replace("cargo run --release --", "iqchannels-gateway")
            .replace(
                "cargo run --example consumer --",
                &example_consumer().display().to_string(),
            );
        for (from, to) in &self.ports {
            for host in ["127.0.0.1", "localhost"] {
                command = command.replace(&format!("{host}:{from}"), &format!("{host}:{to}"));
            }
        }
        command
    }

    fn spawn(&self, command: &str) -> Running {
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut shell = Command::new("bash");
        shell
            .args(["-c", &format!("set -o pipefail\n{command}")])
            .current_dir(&self.dir)
            .env("PATH", path)
            .env("IQGW_LISTEN", "127.0.0.1:0")
            .env("IQGW_LOG_FORMAT", "json")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        if let Some(server) = &self.server {
            shell.env("IQGW_SERVER", server);
        }
        let mut child = shell.spawn().expect("bash starts");
        let collect = |pipe: Box<dyn Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
            rx
        };
        let stdout = collect(Box::new(child.stdout.take().expect("piped")));
        let stderr = collect(Box::new(child.stderr.take().expect("piped")));
        Running {
            child,
            stdout,
            stderr,
        }
    }

    /// Runs one example; `Err` says how it failed.
    fn run(&mut self, example: &Example) -> Result<(), String> {
        let missing: Vec<&str> = tools(&example.command)
            .into_iter()
            .filter(|tool| !on_path(tool))
            .collect();
        let consumer = example.command.contains("--example consumer");
        if !missing.is_empty() || (consumer && !example_consumer().exists()) {
            let why = if missing.is_empty() {
                "the example consumer is not built (`cargo build --example consumer`, as .ci/run does)".to_owned()
            } else {
                format!("{} not installed", missing.join(", "))
            };
            self.skipped
                .push((example.line, example.command.clone(), why));
            return Ok(());
        }
        if example.command.contains("iqchannels-gateway verify")
            || example.command.contains("iqchannels-gateway export")
        {
            for (_, mut gateway) in self.gateways.drain(..) {
                gateway.stop();
            }
        }
        let command = self.rewrite(&example.command);
        self.ran += 1;
        match kind(&example.command) {
            Kind::Serve => self.serve(example, &command),
            Kind::Stream => {
                let from_beginning = ["--from-beginning", "\"beginning\"", "from=beginning"]
                    .iter()
                    .any(|start| example.command.contains(start));
                let mut running = self.spawn(&command);
                let started = Instant::now();
                let mut out = Vec::new();
                // It runs STREAM_SECS, longer (up to STREAM_PATIENCE_SECS) while what it must
                // print has not come yet: a loaded machine must not fail the walk.
                let code = loop {
                    if let Some(code) = running.wait(Duration::from_millis(100)) {
                        break Some(code);
                    }
                    out.extend(running.stdout.try_iter());
                    let printed =
                        (!from_beginning || !out.is_empty()) && check_shown(example, &out).is_ok();
                    let elapsed = started.elapsed();
                    if (printed && elapsed >= Duration::from_secs(STREAM_SECS))
                        || elapsed >= Duration::from_secs(STREAM_PATIENCE_SECS)
                    {
                        running.stop();
                        break None;
                    }
                };
                out.extend(drain(&running.stdout));
                let err = drain(&running.stderr);
                match code {
                    Some(code) if code != 0 => {
                        return Err(format!("exited with {code}\n{}", err.join("\n")))
                    }
                    _ => {}
                }
                if from_beginning && out.is_empty() {
                    return Err(format!(
                        "started from the beginning, it printed nothing in \
                         {STREAM_PATIENCE_SECS} s\n{}",
                        err.join("\n")
                    ));
                }
                check_shown(example, &out)
            }
            Kind::Once => {
                let mut running = self.spawn(&command);
                let code = running.wait(Duration::from_secs(COMMAND_SECS));
                if code.is_none() {
                    running.stop();
                }
                let out = drain(&running.stdout);
                let err = drain(&running.stderr);
                match code {
                    Some(0) => check_shown(example, &out),
                    Some(code) => Err(format!(
                        "exited with {code}\nstdout:\n{}\nstderr:\n{}",
                        out.join("\n"),
                        err.join("\n")
                    )),
                    None => Err(format!("still running after {COMMAND_SECS} s")),
                }
            }
        }
    }

    /// Starts a gateway in the background and learns its address.
    fn serve(&mut self, example: &Example, command: &str) -> Result<(), String> {
        // The README address: `--listen HOST:PORT`, else the default.
        let words: Vec<&str> = command.split_whitespace().collect();
        let listen = words
            .windows(2)
            .find(|w| w[0] == "--listen")
            .map(|w| w[1].to_owned());
        let readme_port = listen
            .as_deref()
            .and_then(|l| l.rsplit(':').next())
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or(8080);
        let command = match &listen {
            Some(listen) => command.replace(&format!("--listen {listen}"), "--listen 127.0.0.1:0"),
            None => command.to_owned(),
        };
        // In the background (`&`, and the comment after it) or not: the walk backgrounds it.
        let command = match command.find(" # ") {
            Some(comment) => &command[..comment],
            None => command.as_str(),
        };
        let command = command.trim_end().trim_end_matches('&').to_owned();
        let mut running = self.spawn(&command);
        let deadline = Instant::now() + Duration::from_secs(COMMAND_SECS);
        let mut said = Vec::new();
        let address = loop {
            match running.stderr.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let parsed: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                    if let Some(address) = parsed["fields"]["address"].as_str() {
                        break address.to_owned();
                    }
                    said.push(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) if Instant::now() < deadline => {
                    if let Ok(Some(status)) = running.child.try_wait() {
                        return Err(format!("exited ({status}):\n{}", said.join("\n")));
                    }
                }
                Err(_) => return Err(format!("did not start:\n{}", said.join("\n"))),
            }
        };
        let port = address
            .rsplit(':')
            .next()
            .and_then(|p| p.parse::<u16>().ok())
            .ok_or_else(|| format!("logged an address without a port: {address}"))?;
        self.ports.insert(readme_port, port);
        if !command.contains("--tls-cert") {
            self.server = Some(format!("http://127.0.0.1:{port}"));
        }
        // Its later log lines are drained by nobody: keep the pipe from filling.
        let (tx, stderr) = mpsc::channel();
        let old = std::mem::replace(&mut running.stderr, stderr);
        std::thread::spawn(move || {
            for line in old.iter() {
                if std::env::var_os("GATEWAY_LOG").is_some() {
                    eprintln!("gateway: {line}");
                }
            }
            drop(tx);
        });
        self.gateways.retain(|(p, _)| *p != readme_port);
        self.gateways.push((readme_port, running));
        let _ = example;
        Ok(())
    }
}

/// Each output line README shows for `example` matches a line it printed.
fn check_shown(example: &Example, out: &[String]) -> Result<(), String> {
    for shown in &example.shown {
        if !out.iter().any(|line| matches(shown, line.trim())) {
            return Err(format!(
                "README shows `{shown}`; it printed:\n{}",
                out.join("\n")
            ));
        }
    }
    Ok(())
}

/// Walks `markdown` in a fresh scratch directory; the failures, each with its README line.
fn walk(markdown: &str) -> (Walk, Vec<String>) {
    let scratch = tempfile::tempdir().expect("a temp dir").keep();
    // README's paths: `../shared/fixtures` beside the checkout.
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared");
    std::os::unix::fs::symlink(shared, scratch.join("shared")).expect("symlink");
    let dir = scratch.join("repo");
    std::fs::create_dir(&dir).expect("mkdir");
    let mut walk = Walk::new(dir);
    let mut failures = Vec::new();
    for block in blocks(markdown) {
        match block {
            Block::Illustrative { line, reason } => {
                walk.skipped
                    .push((line, "(block)".into(), format!("illustrative: {reason}")));
            }
            Block::Run(examples) => {
                for example in examples {
                    eprintln!("README:{}: $ {}", example.line, example.command);
                    if let Err(why) = walk.run(&example) {
                        failures.push(format!(
                            "README.md:{}: `{}`: {why}",
                            example.line, example.command
                        ));
                    }
                }
            }
        }
    }
    for (_, mut gateway) in walk.gateways.drain(..) {
        gateway.stop();
    }
    let _ = std::fs::remove_dir_all(&scratch);
    (walk, failures)
}

#[test]
fn every_readme_command_works_against_a_real_gateway() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let (walk, failures) = walk(&readme);
    let ci = std::env::var("CI").as_deref() == Ok("true");
    let mut unmarked = Vec::new();
    for (line, command, why) in &walk.skipped {
        // Straight to stderr: the harness captures `eprintln!` of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "!!!!! SKIPPED README.md:{line}: {command}: {why}"
        );
        if !why.starts_with("illustrative:") {
            unmarked.push(format!("README.md:{line}: `{command}`: {why}"));
        }
    }
    assert!(
        failures.is_empty(),
        "README examples that fail:\n{}",
        failures.join("\n\n")
    );
    assert!(
        !ci || unmarked.is_empty(),
        "under CI=true every unmarked command must run:\n{}",
        unmarked.join("\n")
    );
    assert!(
        walk.ran >= 20,
        "only {} commands ran: is README parsed?",
        walk.ran
    );
}

#[test]
fn a_broken_example_fails_the_walk() {
    let readme = "\
```sh
iqchannels-gateway serve --store memory
```
```sh
curl -sS --fail-with-body http://127.0.0.1:8080/healthz
curl -sS --fail-with-body http://127.0.0.1:8080/v1/evnts
iqchannels-gateway get --sequence 1
iqchannels-gateway subscribe --from-beginning
curl -sS http://127.0.0.1:8080/healthz
# {\"nothing\": \"like this\"}
```
<!-- illustrative: needs a cluster -->
```sh
iqchannels-gateway serve --store nats://nowhere:4222
```
";
    let (walk, failures) = walk(readme);
    let lines: Vec<&str> = failures
        .iter()
        .map(|f| f.split(':').nth(1).unwrap_or_default())
        .collect();
    assert_eq!(lines, ["6", "7", "8", "9"], "{failures:#?}");
    assert_eq!(walk.ran, 6);
    assert_eq!(walk.skipped.len(), 1);
}

#[test]
fn shown_output_matches_with_ellipses() {
    assert!(matches(
        "data: {\"sequence\":2,...,\"type\":\"t\"...}",
        "data: {\"sequence\":2,\"x\":1,\"type\":\"t\",\"y\":{}}"
    ));
    assert!(!matches("{\"sequence\":1}", "{\"sequence\":12}"));
    assert!(matches(
        "{\"sequence\":1,\"duplicate\":false}",
        "{\"sequence\":1,\"duplicate\":false}"
    ));
}
