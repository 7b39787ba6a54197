//! A nats-server of a test's own (JetStream, on a port and store directory the test chooses),
//! for tests that restart it or start it with settings of their own (authentication).

#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A nats-server process, killed on drop.
pub struct PrivateNats {
    child: Child,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    dir: tempfile::TempDir,
}

impl PrivateNats {
    /// Starts `nats-server -js` on `port` with its store in `dir`; `None` if it does not accept
    /// connections within 5 s.
    pub fn start(port: u16, dir: tempfile::TempDir) -> Option<Self> {
        Self::start_with(port, dir, &[])
    }

    /// Sends `signal` (SIGSTOP, SIGCONT...) to the server.
    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: kill(2) on a child this test spawned and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, signal);
        }
    }

    /// Like [`PrivateNats::start`], with more arguments (`--auth TOKEN`, `--user`, `--pass`).
    pub fn start_with(port: u16, dir: tempfile::TempDir, extra: &[&str]) -> Option<Self> {
        let child = Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let addr = format!("127.0.0.1:{port}");
        for _ in 0..100 {
            if reachable(&addr) {
                return Some(Self { child, port, dir });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Stops it, keeping its port and store for a restart.
    pub fn stop(mut self) -> (u16, tempfile::TempDir) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let port = self.port;
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
        (port, dir)
    }

    /// Its URL for `--store`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the `nats-server` binary can be run.
pub fn installed() -> bool {
    Command::new("nats-server")
        .arg("--version")
        .output()
        .is_ok()
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn reachable(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().expect("address"), Duration::from_secs(1))
        .is_ok()
}
