//! A first start that is interrupted leaves a store that opens (issue 19, point 1), on the real
//! binary: the first `serve` on an empty data directory is killed (SIGKILL) at moments spread
//! over its first milliseconds, where it creates `events.redb`; the next start must open the
//! store, store an event, and `verify` must find it whole. Before, a kill in the first ~8 ms left
//! a file that every later start and `verify` refused ("I/O error: invalid data"). And
//! `verify` and `export` say what `events.redb` is when it is no store file.

mod binary;

use std::process::{Command, Stdio};
use std::time::Duration;

use binary::{gateway_binary, Process};

/// Moments to kill at, microseconds after the spawn: dense where the file is created.
fn moments() -> Vec<u64> {
    let mut moments: Vec<u64> = (0..40).map(|i| i * 250).collect();
    moments.extend([12_000, 15_000, 20_000, 30_000, 50_000]);
    moments
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_start_killed_at_any_moment_leaves_a_store_that_opens() {
    let mut left_a_file = 0;
    // On a loaded machine the store may come later than the last moment: later ones are tried
    // until a kill comes after it.
    let later = [100_000, 200_000, 500_000, 1_000_000, 2_000_000, 5_000_000];
    let mut later = later.into_iter();
    let mut moments = moments().into_iter();
    while let Some(at) = moments
        .next()
        .or_else(|| (left_a_file == 0).then(|| later.next()).flatten())
    {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let data = dir.path().to_str().expect("UTF-8 path").to_owned();
        let mut first = Command::new(gateway_binary())
            .args(["serve", "--listen", "127.0.0.1:0", "--store", "embedded"])
            .args(["--data-dir", &data])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the gateway starts");
        std::thread::sleep(Duration::from_micros(at));
        let _ = first.kill();
        let _ = first.wait();
        if dir.path().join("events.redb").exists() {
            left_a_file += 1;
        }

        // The next start opens the store (Process::embedded fails the test if it does not
        // listen), and stores an event.
        let gateway = Process::embedded(dir.path(), &[]);
        let response = reqwest::Client::new()
            .post(gateway.url("/v1/events"))
            .header("content-type", "application/json")
            .body(r#"{"ChatEvent":{"Id":7,"Type":"chat_closed","ChatId":1}}"#)
            .send()
            .await
            .expect("posted");
        assert_eq!(response.status(), 200, "killed at {at} µs");
        drop(gateway);

        let verify = Command::new(gateway_binary())
            .args(["verify", "--data-dir", &data])
            .output()
            .expect("verify runs");
        assert!(
            verify.status.success(),
            "killed at {at} µs: verify: {}{}",
            String::from_utf8_lossy(&verify.stdout),
            String::from_utf8_lossy(&verify.stderr)
        );
        assert!(
            !dir.path().join("events.redb.creating").exists(),
            "killed at {at} µs: the unfinished creation is removed"
        );
    }
    // Some kills came after the store was made: the moments cover both sides.
    assert!(left_a_file > 0, "no kill came after the store was created");
}

/// `verify` and `export` name what `events.redb` is when it is no store file (issue 19, point
/// 8): they said "does not exist" for a directory, a FIFO and a link to `/dev/zero`.
#[test]
fn verify_and_export_name_what_is_there_instead_of_a_store() {
    /// What is put in place of the store, and what the commands must say.
    type Case = (&'static str, fn(&std::path::Path), &'static str);
    let cases: [Case; 5] = [
        ("nothing", |_| {}, "does not exist"),
        // A first start never leaves one (it builds the store aside): a store lost.
        (
            "an empty file",
            |path| drop(std::fs::File::create(path).expect("a file")),
            "is empty: it holds no store",
        ),
        (
            "a directory",
            |path| std::fs::create_dir(path).expect("a directory"),
            "is a directory",
        ),
        (
            "a FIFO",
            |path| {
                let status = Command::new("mkfifo").arg(path).status().expect("mkfifo");
                assert!(status.success());
            },
            "is a named pipe (FIFO)",
        ),
        (
            "a link to /dev/zero",
            |path| std::os::unix::fs::symlink("/dev/zero", path).expect("a link"),
            "is a link to /dev/zero, which is a character device",
        ),
    ];
    for (name, make, said) in cases {
        let dir = tempfile::tempdir().expect("a temporary directory");
        make(&dir.path().join("events.redb"));
        for command in ["verify", "export"] {
            let output = Command::new(gateway_binary())
                .args([command, "--data-dir"])
                .arg(dir.path())
                .output()
                .expect("runs");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(!output.status.success(), "{name}: {command}");
            assert!(stderr.contains(said), "{name}: {command}: {stderr}");
        }
    }
}

/// `export` of a store a running gateway holds is refused, as `verify`'s is: never a salvage of
/// a file being written (found from outside).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_refuses_a_store_in_use() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let gateway = Process::embedded(dir.path(), &[]);
    for command in ["verify", "export", "export --salvage"] {
        let output = Command::new(gateway_binary())
            .args(command.split(' '))
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{command}: {stderr}");
        assert!(
            stderr.contains("in use by another process"),
            "{command}: {stderr}"
        );
        assert!(!stderr.contains("salvaged"), "{command}: {stderr}");
        assert!(output.stdout.is_empty(), "{command}");
    }
    drop(gateway);
    // And a gateway does not start on an empty file.
    let empty = tempfile::tempdir().expect("a temporary directory");
    std::fs::File::create(empty.path().join("events.redb")).expect("a file");
    let serve = Command::new(gateway_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(empty.path())
        .output()
        .expect("runs");
    assert!(!serve.status.success());
    assert!(String::from_utf8_lossy(&serve.stderr).contains("is empty"));
}
