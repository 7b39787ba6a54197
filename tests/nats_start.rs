//! A NATS misconfiguration stops the real binary at start with a message saying what to fix,
//! instead of a cleartext connection or an error logged forever: TLS files that do not exist,
//! TLS required from a plaintext server, credentials the server refuses. Only a server that
//! cannot be reached is retried, and logged as that. Each against a nats-server of its own.

mod binary;
mod nats;
mod private_nats;

use std::time::Duration;

use binary::{serve_to_exit, Process};
use nats::require;
use private_nats::{free_port, PrivateNats};

/// Long enough for a start that fails, far shorter than "forever".
const EXIT_WITHIN: Duration = Duration::from_secs(20);

fn nats(extra: &[&str]) -> Option<PrivateNats> {
    if !require("the nats-server binary", private_nats::installed()) {
        return None;
    }
    Some(
        PrivateNats::start_with(free_port(), tempfile::tempdir().unwrap(), extra)
            .expect("private nats-server starts"),
    )
}

/// Asserts the start failed and said each of `named`.
fn refused(outcome: (std::process::ExitStatus, String), named: &[&str]) {
    let (status, said) = outcome;
    assert!(!status.success(), "the gateway exited 0; it said:\n{said}");
    assert!(
        !said.contains("listening"),
        "the gateway listened before exiting:\n{said}"
    );
    for what in named {
        assert!(said.contains(what), "{what:?} not in what it said:\n{said}");
    }
}

#[test]
fn nats_tls_files_that_do_not_exist_stop_the_start_naming_the_file() {
    let Some(server) = nats(&[]) else { return };
    let store = server.url();
    let missing = tempfile::tempdir().unwrap();
    let ca = missing.path().join("ca.pem");
    let cert = missing.path().join("client.pem");
    let key = missing.path().join("client-key.pem");
    let (ca, cert, key) = (
        ca.to_str().unwrap(),
        cert.to_str().unwrap(),
        key.to_str().unwrap(),
    );
    refused(
        serve_to_exit(&["--store", &store, "--nats-tls-ca", ca], &[], EXIT_WITHIN),
        &["--nats-tls-ca", ca, "No such file"],
    );
    refused(
        serve_to_exit(
            &[
                "--store",
                &store,
                "--nats-tls-cert",
                cert,
                "--nats-tls-key",
                key,
            ],
            &[],
            EXIT_WITHIN,
        ),
        &["--nats-tls-cert", cert, "No such file"],
    );
}

#[test]
fn requiring_tls_from_a_plaintext_nats_exits_with_a_clear_message() {
    let Some(server) = nats(&[]) else { return };
    refused(
        serve_to_exit(
            &["--store", &server.url(), "--nats-require-tls"],
            &[],
            EXIT_WITHIN,
        ),
        &["TLS is required", "does the server offer TLS?"],
    );
    let tls_url = format!("tls://127.0.0.1:{}", server.port);
    refused(
        serve_to_exit(&["--store", &tls_url], &[], EXIT_WITHIN),
        &["TLS is required", "does the server offer TLS?"],
    );
}

#[test]
fn a_nats_token_the_server_refuses_exits_with_a_clear_message() {
    let Some(server) = nats(&["--auth", "s3cret"]) else {
        return;
    };
    refused(
        serve_to_exit(
            &["--store", &server.url()],
            &[("IQGW_NATS_TOKEN", "wrong")],
            EXIT_WITHIN,
        ),
        &["the server refused the credentials", "--nats-token"],
    );
}

#[test]
fn a_nats_password_the_server_refuses_exits_with_a_clear_message() {
    let Some(server) = nats(&["--user", "gateway", "--pass", "right"]) else {
        return;
    };
    refused(
        serve_to_exit(
            &["--store", &server.url(), "--nats-user", "gateway"],
            &[("IQGW_NATS_PASSWORD", "wrong")],
            EXIT_WITHIN,
        ),
        &["the server refused the credentials", "--nats-password"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_nats_token_connects_and_stores() {
    let Some(server) = nats(&["--auth", "s3cret"]) else {
        return;
    };
    let process = Process::start(&["--store", &server.url(), "--nats-token", "s3cret"]);
    assert_eq!(process.post_event(1).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_unreachable_at_start_is_retried_and_logged_as_unreachable() {
    if !require("the nats-server binary", private_nats::installed()) {
        return;
    }
    let port = free_port();
    // The server comes up 2 s after the gateway starts.
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        PrivateNats::start(port, tempfile::tempdir().unwrap()).expect("nats-server starts")
    });
    let store = format!("nats://127.0.0.1:{port}");
    let process = Process::start(&["--store", &store]);
    let _server = starter.join().unwrap();
    let logged = process.logged().join("\n");
    assert!(
        logged.contains("NATS is unreachable at start; retrying"),
        "{logged}"
    );
    assert_eq!(process.post_event(1).await, 200);
}
