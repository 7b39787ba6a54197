//! Fuzzes the HTTP ingest routes in process (no socket): the fuzz bytes are POSTed to
//! `/v1/events` and to `/v1/events:batch` (as a JSON array and as NDJSON). Every answer must be
//! one of 200/400/413/415, never 5xx; a single event is stored exactly when the decoder accepts it.

#![no_main]

use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::Router;
use http::{Request, StatusCode};
use iqchannels_gateway::auth::GrpcAuth;
use iqchannels_gateway::gateway::{Gateway, GatewayConfig};
use iqchannels_gateway::http::HttpConfig;
use iqchannels_gateway::log::memory::MemoryLog;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

/// Bodies above this get 413; small enough that the fuzzer reaches it (run with
/// `-max_len=16384`), large enough for both fixtures.
const MAX_BODY: usize = 8 * 1024;

struct Harness {
    runtime: tokio::runtime::Runtime,
    router: Router,
    /// Keeps the gateway's shutdown signal open for the life of the process.
    _stop: tokio::sync::watch::Sender<bool>,
}

fn harness() -> &'static Harness {
    static HARNESS: OnceLock<Harness> = OnceLock::new();
    HARNESS.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let _guard = runtime.enter();
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        // Retention keeps memory flat however many events the fuzzer gets stored.
        let log = Arc::new(MemoryLog::new(Some(1024)));
        let config = GatewayConfig {
            live_buffer: 64,
            ..GatewayConfig::default()
        };
        let gateway = Gateway::new(log, &config, stop_rx);
        let grpc = iqchannels_gateway::grpc::routes(gateway.clone(), MAX_BODY, GrpcAuth::default())
            .expect("gRPC routes");
        let router = iqchannels_gateway::http::router(
            gateway,
            HttpConfig {
                max_body_bytes: MAX_BODY,
                ..HttpConfig::default()
            },
            grpc,
        );
        drop(_guard);
        Harness {
            runtime,
            router,
            _stop: stop,
        }
    })
}

fn post(harness: &Harness, path: &str, content_type: &str, data: &[u8]) -> StatusCode {
    let request = Request::post(path)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Body::from(data.to_vec()))
        .expect("valid request");
    let router = harness.router.clone();
    harness
        .runtime
        .block_on(router.oneshot(request))
        .expect("the router is infallible")
        .status()
}

fuzz_target!(|data: &[u8]| {
    let harness = harness();
    let allowed = [200, 400, 413, 415];

    let status = post(harness, "/v1/events", "application/json", data);
    let expected = if data.len() > MAX_BODY {
        413
    } else if iqchannels_gateway::decode::decode(data).is_ok() {
        200
    } else {
        400
    };
    assert_eq!(status.as_u16(), expected, "POST /v1/events");

    for content_type in ["application/json", "application/x-ndjson"] {
        let status = post(harness, "/v1/events:batch", content_type, data);
        assert!(
            allowed.contains(&status.as_u16()),
            "POST /v1/events:batch ({content_type}) answered {status}"
        );
        if data.len() > MAX_BODY {
            assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        }
    }
});
