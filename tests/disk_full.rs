//! A full disk under the embedded store: ingest answers 503, readiness and gRPC health go down,
//! the server stays up, and it recovers by itself when space returns. Needs `mount`: root, or a
//! user with passwordless sudo.

mod binary;

use std::process::Command;
use std::time::Duration;

use binary::{event, Process};

/// `program` run as root: directly when this process is root, else through `sudo -n`.
fn as_root(program: &str) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        Command::new(program)
    } else {
        let mut command = Command::new("sudo");
        command.args(["-n", program]);
        command
    }
}

/// A small tmpfs (mode 1777, so the gateway can write whoever runs it), unmounted on drop.
struct SmallDisk {
    dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(size: &str) -> Option<Self> {
        let dir = tempfile::tempdir().ok()?;
        let path = dir.path().to_str()?.to_owned();
        let ok = as_root("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=1777"),
                "tmpfs",
                &path,
            ])
            .status();
        ok.ok().filter(|s| s.success()).map(|_| Self { dir })
    }

    fn resize(&self, size: &str) {
        let path = self.dir.path().to_str().unwrap();
        let status = as_root("mount")
            .args(["-o", &format!("remount,size={size}"), path])
            .status()
            .unwrap();
        assert!(status.success(), "remount");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = as_root("umount").arg("-l").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_answers_503_reports_not_ready_and_recovers() {
    let Some(disk) = SmallDisk::mount("3m") else {
        let message =
            "cannot mount a tmpfs (needs root or passwordless sudo): the full-disk test did not run";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{message}");
        }
        eprintln!("\n!!!!! SKIPPED: {message} !!!!!\n");
        return;
    };
    let data = disk.dir.path().join("data");
    let process = Process::embedded(&data, &["--store-cache-bytes", "1048576"]);
    let http = reqwest::Client::new();
    let post = |id: i64| {
        http.post(process.url("/v1/events"))
            .header("content-type", "application/json")
            .body(event(id))
            .send()
    };

    let mut acked = Vec::new();
    let mut refused = None;
    for id in 1..5_000 {
        let response = post(id).await.expect("the server answers");
        match response.status().as_u16() {
            200 => acked.push(id),
            503 => {
                assert!(response.headers().contains_key("retry-after"));
                refused = Some(id);
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    let refused = refused.expect("a 3 MiB disk fills up");
    assert!(!acked.is_empty());

    // Still up, and says it is not ready.
    let ready = http.get(process.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        http.get(process.url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", process.addr)).unwrap();
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(channel.connect().await.unwrap());
    let mut status = 0;
    for _ in 0..50 {
        let check = tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        };
        status = health.check(check).await.unwrap().into_inner().status;
        if status == tonic_health::pb::health_check_response::ServingStatus::NotServing as i32 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::NotServing as i32
    );

    // Space comes back: the gateway recovers by itself.
    disk.resize("64m");
    let mut recovered = false;
    for _ in 0..100 {
        if http
            .get(process.url("/readyz"))
            .send()
            .await
            .unwrap()
            .status()
            == 200
        {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        recovered,
        "readiness came back after the disk had space again"
    );
    let retried = post(refused).await.unwrap();
    assert_eq!(
        retried.status(),
        200,
        "the refused event is accepted on retry"
    );

    // Every acknowledged event is there once; nothing half-written is served.
    let mut client = process.grpc().await;
    for id in acked.iter().chain([refused].iter()) {
        let request = iqchannels_gateway::pb::client::GetEventRequest {
            key: Some(iqchannels_gateway::pb::client::get_event_request::Key::EventId(*id)),
            include_raw_json: true,
            include_references: false,
        };
        let found = client
            .get_event(request)
            .await
            .expect("acknowledged event is stored")
            .into_inner();
        assert_eq!(found.raw_json, event(*id));
    }
}

/// A first start on a full disk fails with the reason, and leaves nothing that stops the next
/// start once space is back (issue 19, point 1: it left a 3.6 MB `events.redb` that every later
/// start and `verify` refused with "invalid data").
#[test]
fn a_first_start_on_a_full_disk_leaves_nothing_that_stops_the_next() {
    let Some(disk) = SmallDisk::mount("2m") else {
        let message =
            "cannot mount a tmpfs (needs root or passwordless sudo): the full-disk test did not run";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{message}");
        }
        eprintln!("\n!!!!! SKIPPED: {message} !!!!!\n");
        return;
    };
    // Fill the disk but for a few KiB: redb's first region does not fit.
    let filler = disk.dir.path().join("filler");
    let mut size = 2 * 1024 * 1024 - 64 * 1024;
    while std::fs::write(&filler, vec![0u8; size]).is_err() {
        size -= 64 * 1024;
    }
    let data = disk.dir.path().join("data");
    let data_arg = data.to_str().expect("UTF-8 path");
    let first = Command::new(binary::gateway_binary())
        .args(["serve", "--listen", "127.0.0.1:0", "--store", "embedded"])
        .args(["--data-dir", data_arg])
        .output()
        .expect("the gateway runs");
    let said = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success(), "it cannot start on a full disk");
    assert!(said.contains("No space left"), "it says why: {said}");
    assert!(
        !data.join("events.redb").exists(),
        "no half-made store is left"
    );
    std::fs::remove_file(&filler).expect("space back");
    let gateway = Process::embedded(&data, &[]);
    drop(gateway);
    let verify = Command::new(binary::gateway_binary())
        .args(["verify", "--data-dir", data_arg])
        .output()
        .expect("verify runs");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}
