//! The web console at `GET /`: served with its assets inlined, and driven end to end in headless
//! Chromium by `tests/console/check.mjs` (Playwright), which POSTs an event and watches it appear.
//! Needs `node`, `playwright-core` in `target/console-test` and `/usr/bin/chromium` (.ci/run
//! installs them); without them the browser test fails under CI=true and is skipped otherwise.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::{event_json, TestServer, MESSAGE_CREATED};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

#[tokio::test]
async fn console_page_is_served_at_root_self_contained() {
    let server = TestServer::start().await;
    let response = reqwest::get(server.url("/")).await.expect("GET / answers");
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "text/html; charset=utf-8");
    let policy = headers["content-security-policy"].to_str().unwrap();
    assert!(policy.contains("default-src 'none'") && policy.contains("connect-src 'self'"));
    let page = response.text().await.unwrap();
    assert!(page.contains("/v1/events:stream") && page.contains("/v1/stats"));
    assert!(
        !page.contains("/*CONSOLE_"),
        "stylesheet and script are inlined"
    );
}

/// Where the browser test's tools are.
struct Tools {
    node: PathBuf,
    playwright_dir: PathBuf,
    chromium: PathBuf,
}

/// The tools, or `None` after failing (CI) or announcing the skip.
fn tools() -> Option<Tools> {
    let node = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("node"))
            .find(|candidate| candidate.is_file())
    });
    let playwright_dir = std::env::var_os("CONSOLE_TEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(MANIFEST_DIR).join("target/console-test"));
    let chromium = std::env::var_os("CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    let mut missing = Vec::new();
    if node.is_none() {
        missing.push("`node` is not on PATH".to_owned());
    }
    if !playwright_dir
        .join("node_modules/playwright-core/package.json")
        .is_file()
    {
        missing.push(format!(
            "playwright-core is not installed in {} \
             (`npm install --prefix {0} playwright-core`)",
            playwright_dir.display()
        ));
    }
    if !chromium.is_file() {
        missing.push(format!(
            "{} is missing (`apt-get install chromium`)",
            chromium.display()
        ));
    }
    if missing.is_empty() {
        return node.map(|node| Tools {
            node,
            playwright_dir,
            chromium,
        });
    }
    let missing = missing.join("; ");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("the console browser test cannot run and CI=true: {missing}. .ci/run installs them");
    }
    // Straight to stderr: the test harness captures `eprintln!` of passing tests.
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!! SKIPPED: the web console was not tested in a browser: {missing}. \
         Run .ci/run to install them. !!!!!!!!\n"
    );
    None
}

#[tokio::test]
async fn console_in_headless_chromium_shows_a_posted_event_live() {
    let Some(tools) = tools() else { return };
    let server = TestServer::start().await;
    // Earlier events, which the page shows on load (tail=50), so the picture has some history.
    server.store(MESSAGE_CREATED).await;
    let earlier = [
        ("chat_created", 13, "client"),
        ("message_created", 13, "client"),
        ("chat_assigned", 13, "system"),
        ("message_created", 13, "user"),
        ("message_read", 13, "client"),
        ("typing", 21, "client"),
        ("message_created", 21, "client"),
    ];
    for (id, (event_type, chat, actor)) in (9000..).zip(earlier) {
        server
            .store(event_json(id, event_type, chat, actor, 1))
            .await;
    }

    let screenshot = Path::new(MANIFEST_DIR).join("target/console.png");
    let _ = std::fs::remove_file(&screenshot);
    let mut command = Command::new(&tools.node);
    command
        .arg(Path::new(MANIFEST_DIR).join("tests/console/check.mjs"))
        .env("GATEWAY_URL", server.url(""))
        .env("PLAYWRIGHT_DIR", &tools.playwright_dir)
        .env("CHROMIUM", &tools.chromium)
        .env(
            "FIXTURE",
            Path::new(MANIFEST_DIR).join("../shared/fixtures/chat_closed.json"),
        )
        .env("SCREENSHOT", &screenshot);
    let output = run(command, Duration::from_secs(120)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "check.mjs failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    assert!(stdout.contains("the row appeared on top"), "{stdout}");
    assert!(stdout.contains("shows only that type"), "{stdout}");
    assert!(
        stdout.contains("a body with deviations is marked"),
        "{stdout}"
    );
    assert!(
        screenshot.is_file(),
        "no screenshot at {}",
        screenshot.display()
    );
    server.stop().await;
}

/// Runs `command` off the runtime's threads (the server under test keeps serving), killing it if
/// it takes longer than `limit`.
async fn run(mut command: Command, limit: Duration) -> Output {
    let child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {command:?}: {error}"));
    let pid = child.id() as libc::pid_t;
    let waited = tokio::task::spawn_blocking(move || child.wait_with_output());
    match tokio::time::timeout(limit, waited).await {
        Ok(output) => output
            .expect("waiter did not panic")
            .expect("the child's output is readable"),
        Err(_) => {
            // SAFETY: kill(2) on the id of a child this test started and has not reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("check.mjs did not finish within {limit:?}");
        }
    }
}
