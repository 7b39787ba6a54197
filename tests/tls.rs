//! TLS on the shared port: HTTP/1.1 (curl) and gRPC over h2 (grpcurl) on one address, and a
//! certificate replaced on disk is picked up without a restart.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::TestServer;
use iqchannels_gateway::server::ServerConfig;
use iqchannels_gateway::tls::TlsFiles;

fn tools_present() -> bool {
    let present = |tool: &str| Command::new(tool).arg("--version").output().is_ok();
    let ok = present("curl") && present("grpcurl");
    if !ok {
        let message = "curl and grpcurl are needed: the TLS test did not run";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{message}");
        }
        eprintln!("\n!!!!! SKIPPED: {message} !!!!!\n");
    }
    ok
}

/// Writes a fresh self-signed certificate for 127.0.0.1/localhost; returns its PEM.
fn write_certificate(cert: &Path, key: &Path) -> String {
    let generated =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let pem = generated.cert.pem();
    std::fs::write(key, generated.signing_key.serialize_pem()).unwrap();
    std::fs::write(cert, &pem).unwrap();
    pem
}

fn curl(ca: &Path, args: &[&str]) -> (bool, String) {
    let output = Command::new("curl")
        .args(["-sS", "--fail-with-body", "--cacert"])
        .arg(ca)
        .args(args)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_grpc_share_one_tls_port_and_a_new_certificate_is_picked_up() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let first_ca = dir.path().join("first-ca.pem");
    std::fs::write(&first_ca, write_certificate(&cert, &key)).unwrap();
    let tls = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        poll: Duration::from_millis(100),
    };
    let server = TestServer::with_config(ServerConfig {
        tls: Some(tls),
        ..ServerConfig::default()
    })
    .await;
    let base = format!("https://127.0.0.1:{}", server.addr.port());

    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/fixtures/chat_closed.json"
    );
    let posted = tokio::task::spawn_blocking({
        let (ca, url) = (first_ca.clone(), format!("{base}/v1/events"));
        move || {
            curl(
                &ca,
                &[
                    "-H",
                    "content-type: application/json",
                    "--data-binary",
                    &format!("@{fixture}"),
                    &url,
                ],
            )
        }
    })
    .await
    .unwrap();
    assert!(posted.0, "POST over TLS: {}", posted.1);
    assert!(posted.1.contains("\"sequence\":1"), "{}", posted.1);

    let addr = format!("127.0.0.1:{}", server.addr.port());
    let grpc = tokio::task::spawn_blocking({
        let (ca, addr) = (first_ca.clone(), addr.clone());
        move || {
            Command::new("grpcurl")
                .arg("-cacert")
                .arg(&ca)
                .args([
                    "-d",
                    "{\"sequence\":1}",
                    &addr,
                    "iqchannels.gateway.v1.EventGateway/GetEvent",
                ])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let printed = String::from_utf8_lossy(&grpc.stdout);
    assert!(
        grpc.status.success(),
        "gRPC over TLS: {}",
        String::from_utf8_lossy(&grpc.stderr)
    );
    assert!(printed.contains("\"Type\": \"chat_closed\""), "{printed}");

    // Cleartext to a TLS port gets nowhere.
    let plain = reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // Replace the certificate on disk; the server starts presenting the new one.
    let second_ca = dir.path().join("second-ca.pem");
    std::fs::write(&second_ca, write_certificate(&cert, &key)).unwrap();
    let mut switched = false;
    for _ in 0..50 {
        let (ok, _) = curl(&second_ca, &[&format!("{base}/healthz")]);
        if ok {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        switched,
        "the replaced certificate is served without a restart"
    );
    let (old_ok, _) = curl(&first_ca, &[&format!("{base}/healthz")]);
    assert!(!old_ok, "the old certificate is no longer presented");
}

/// Writes a new key only (the certificate stays): a pair that does not match.
fn write_other_key(key: &Path) {
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(key, other.serialize_pem()).unwrap();
}

/// Whether a gRPC health check over TLS, trusting `ca`, succeeds on a new connection.
async fn grpc_over_tls_works(port: u16, ca: &str) -> bool {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    let Ok(endpoint) = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
    else {
        return false;
    };
    let Ok(Ok(channel)) = tokio::time::timeout(Duration::from_secs(5), endpoint.connect()).await
    else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_that_does_not_match_its_certificate_is_refused_at_start_and_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let tls = TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        poll: Duration::from_millis(100),
    };

    // At start: the server does not start.
    write_certificate(&cert, &key);
    write_other_key(&key);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let started = tokio::time::timeout(
        Duration::from_secs(5),
        iqchannels_gateway::server::serve(
            listener,
            std::sync::Arc::new(iqchannels_gateway::log::memory::MemoryLog::default()),
            ServerConfig {
                tls: Some(tls.clone()),
                ..ServerConfig::default()
            },
            std::future::pending(),
        ),
    )
    .await
    .expect("serve returns at once");
    let error = started
        .expect_err("a mismatched pair is refused")
        .to_string();
    assert!(error.contains("does not match"), "{error}");

    // On reload: the previous pair stays.
    let ca = write_certificate(&cert, &key);
    let server = TestServer::with_config(ServerConfig {
        tls: Some(tls),
        ..ServerConfig::default()
    })
    .await;
    let port = server.addr.port();
    assert!(grpc_over_tls_works(port, &ca).await);
    write_other_key(&key);
    // Several polls of the files: a reload would have happened by now.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        grpc_over_tls_works(port, &ca).await,
        "the server keeps serving the previous, matching pair"
    );
    // A matching pair again is picked up.
    let next = write_certificate(&cert, &key);
    let mut switched = false;
    for _ in 0..50 {
        if grpc_over_tls_works(port, &next).await {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(switched, "a new matching pair is served");
}
