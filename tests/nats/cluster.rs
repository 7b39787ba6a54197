//! Three nats-servers clustered on loopback ports, each with JetStream and
//! `sync_interval: always` (as README tells operators to run them), that a test can SIGKILL,
//! SIGSTOP, resume and restart one node at a time.
//!
//! `sync_interval` needs nats-server 2.10 or newer; Debian's package is 2.9. The binary is, in
//! order: `$IQGW_NATS_SERVER`, the one `.ci/run` installs under `target/tools/nats-server`, or
//! `nats-server` on PATH. An older one is a loud skip (a failure under CI).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;

use super::require;

/// Where `.ci/run` installs a nats-server recent enough for the cluster tests.
fn installed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tools/nats-server/bin/nats-server")
}

/// The nats-server binary to cluster with, and its version, if one that has `sync_interval`.
fn binary() -> Option<PathBuf> {
    let candidates = std::env::var_os("IQGW_NATS_SERVER")
        .map(PathBuf::from)
        .into_iter()
        .chain([installed(), PathBuf::from("nats-server")]);
    for candidate in candidates {
        let Ok(output) = Command::new(&candidate).arg("--version").output() else {
            continue;
        };
        let version = String::from_utf8_lossy(&output.stdout).to_string();
        if has_sync_interval(&version) {
            return Some(candidate);
        }
        eprintln!(
            "{} is {}: too old for `sync_interval: always` (2.10+)",
            candidate.display(),
            version.trim()
        );
    }
    None
}

/// Whether `nats-server --version` output names 2.10 or newer.
fn has_sync_interval(version: &str) -> bool {
    let numbers: Vec<u64> = version
        .trim()
        .trim_start_matches("nats-server: v")
        .split(['.', '-'])
        .take(2)
        .map_while(|part| part.parse().ok())
        .collect();
    matches!(numbers[..], [major, minor] if (major, minor) >= (2, 10))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("a free port")
        .local_addr()
        .expect("its address")
        .port()
}

/// A three-node cluster; every node is killed on drop.
pub struct Cluster {
    binary: PathBuf,
    dir: tempfile::TempDir,
    clients: Vec<u16>,
    nodes: Vec<Option<Child>>,
    stopped: Vec<bool>,
}

impl Cluster {
    /// Starts three nodes and waits until an R3 stream can be created. `None` (after a loud
    /// message, or a panic under CI) when no suitable nats-server is installed.
    pub async fn start() -> Option<Self> {
        let binary = binary();
        if !require(
            "nats-server 2.10+ (`.ci/run` installs one under target/tools)",
            binary.is_some(),
        ) {
            return None;
        }
        let dir = tempfile::tempdir().expect("a temporary directory");
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        for i in 0..3 {
            let others: Vec<String> = (0..3)
                .filter(|&j| j != i)
                .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
                .collect();
            let config = format!(
                "server_name: n{i}\nlisten: 127.0.0.1:{}\n\
                 jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
                 cluster {{ name: iqgw, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                clients[i],
                dir.path().join(format!("n{i}")).display(),
                routes[i],
                others.join(", ")
            );
            std::fs::write(dir.path().join(format!("n{i}.conf")), config).expect("config written");
        }
        let mut cluster = Self {
            binary: binary?,
            dir,
            clients,
            nodes: vec![None, None, None],
            stopped: vec![false; 3],
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        cluster.wait_for_quorum().await;
        Some(cluster)
    }

    /// Starts node `i` (again) on its ports and data.
    pub fn spawn(&mut self, i: usize) {
        let log =
            std::fs::File::create(self.dir.path().join(format!("n{i}.log"))).expect("a log file");
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(self.dir.path().join(format!("n{i}.conf")))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        self.nodes[i] = Some(child);
        self.stopped[i] = false;
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            if self.stopped[i] {
                self.signal(&child, libc::SIGCONT);
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stopped[i] = false;
    }

    /// SIGTERM node `i`, wait for it to exit, start it again.
    pub fn restart(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].take() {
            self.signal(&child, libc::SIGTERM);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.spawn(i);
    }

    /// SIGSTOP node `i`: its connections stay open and nothing answers.
    pub fn pause(&mut self, i: usize) {
        if let Some(child) = &self.nodes[i] {
            self.signal(child, libc::SIGSTOP);
            self.stopped[i] = true;
        }
    }

    /// SIGCONT node `i`.
    pub fn resume(&mut self, i: usize) {
        if let Some(child) = &self.nodes[i] {
            self.signal(child, libc::SIGCONT);
            self.stopped[i] = false;
        }
    }

    fn signal(&self, child: &Child, signal: libc::c_int) {
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as libc::pid_t, signal);
        }
    }

    /// `nats://a,nats://b, nats://c`: the form README documents for `--store`.
    pub fn store_url(&self) -> String {
        let urls: Vec<String> = self
            .clients
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect();
        urls.join(",").replacen(",", ", ", 1)
    }

    /// An admin connection that may use any node.
    pub async fn admin(&self) -> jetstream::Context {
        let servers: Vec<String> = self
            .clients
            .iter()
            .map(|port| format!("nats://127.0.0.1:{port}"))
            .collect();
        let client = tokio::time::timeout(
            Duration::from_secs(20),
            async_nats::ConnectOptions::new()
                .retry_on_initial_connect()
                .ping_interval(Duration::from_secs(1))
                .connect(servers),
        )
        .await
        .expect("the cluster accepts a connection in time")
        .expect("connected to the cluster");
        let mut context = jetstream::new(client);
        context.set_timeout(Duration::from_secs(2));
        context
    }

    /// Waits until the cluster has a JetStream meta leader: an R3 stream can be created.
    pub async fn wait_for_quorum(&self) {
        let admin = self.admin().await;
        let ready = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                let created = admin
                    .get_or_create_stream(jetstream::stream::Config {
                        name: "IQGW_PROBE".into(),
                        subjects: vec!["iqgw.probe".into()],
                        num_replicas: 3,
                        ..Default::default()
                    })
                    .await;
                if created.is_ok() && admin.delete_stream("IQGW_PROBE").await.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
        .await;
        assert!(ready.is_ok(), "{}", self.failure("no JetStream quorum"));
    }

    /// The node leading `stream` (its `server_name` is `n<i>`), asked until one is elected.
    pub async fn stream_leader(&self, admin: &jetstream::Context, stream: &str) -> usize {
        for _ in 0..100 {
            if let Ok(mut handle) = admin.get_stream(stream).await {
                if let Ok(info) = handle.info().await {
                    let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
                    if let Some(i) = leader
                        .as_deref()
                        .and_then(|name| name.strip_prefix('n'))
                        .and_then(|i| i.parse().ok())
                    {
                        return i;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!(
            "{}",
            self.failure(&format!("stream {stream} has no leader"))
        );
    }

    /// A panic message with the tail of every node's log.
    pub fn failure(&self, what: &str) -> String {
        let mut message = format!("{what}\n");
        for i in 0..3 {
            let log = std::fs::read_to_string(self.dir.path().join(format!("n{i}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            message.push_str(&format!("--- n{i} (last lines) ---\n"));
            for line in tail.into_iter().rev() {
                message.push_str(line);
                message.push('\n');
            }
        }
        message
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..3 {
            self.kill(i);
        }
    }
}

#[test]
fn versions_with_sync_interval() {
    assert!(has_sync_interval("nats-server: v2.10.0"));
    assert!(has_sync_interval("nats-server: v2.15.1\n"));
    assert!(has_sync_interval("nats-server: v3.0.0-beta"));
    assert!(!has_sync_interval("nats-server: v2.9.10"));
    assert!(!has_sync_interval("garbage"));
}
