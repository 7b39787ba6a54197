//! A real nats-server for tests: the machine's shared one on 127.0.0.1:4222 (each test on a
//! stream of its own, deleted afterwards), and how a test skips or fails without it.

#![allow(dead_code)] // Each test binary uses a different part of this module.

pub mod cluster;

use std::time::Duration;

/// The nats-server with JetStream that CI (and `.ci/run`) starts.
pub const SHARED_NATS: &str = "127.0.0.1:4222";

/// Skips (loudly) outside CI, fails under CI, when a prerequisite is missing.
pub fn require(what: &str, ok: bool) -> bool {
    if !ok {
        let message = format!("{what} is not available: this test did not run");
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{message}");
        }
        eprintln!("\n!!!!! SKIPPED: {message} !!!!!\n");
    }
    ok
}

/// Whether something accepts TCP connections at `addr` (within a second).
pub fn reachable(addr: &str) -> bool {
    std::net::TcpStream::connect_timeout(&addr.parse().expect("address"), Duration::from_secs(1))
        .is_ok()
}

/// A stream name and subject prefix no other test uses; the stream is deleted on drop.
pub struct TestStream {
    name: String,
    prefix: String,
    server: String,
}

impl TestStream {
    pub fn new(server: &str) -> Self {
        let tag = format!("{}_{}", std::process::id(), rand_suffix());
        Self {
            name: format!("IQGW_TEST_{tag}"),
            prefix: format!("iqgw.test.{tag}"),
            server: server.to_owned(),
        }
    }

    /// The stream's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The subject prefix of its events.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn args<'a>(&'a self, store: &'a str) -> Vec<&'a str> {
        vec![
            "--store",
            store,
            "--nats-stream",
            &self.name,
            "--nats-subject-prefix",
            &self.prefix,
        ]
    }
}

impl Drop for TestStream {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // Best effort, on a runtime of its own (drop may run outside one).
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let client = async_nats::connect(server).await.ok()?;
                async_nats::jetstream::new(client)
                    .delete_stream(&name)
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A number unlikely to repeat between concurrent test processes.
fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    hasher.finish() % 1_000_000_000
}
