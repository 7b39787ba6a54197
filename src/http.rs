//! The HTTP/1.1 edge: JSON ingest and health. The only module that knows axum; the one place
//! errors become HTTP responses. gRPC requests on the same port are handed to tonic's routes.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::json;
use tower::ServiceExt;

mod console;
mod stream;

use crate::auth::{AuthError, GrpcAuth, IngestAuth};
use crate::decode::{self, DecodeError, Decoded};
use crate::gateway::{Gateway, IngestError, Ingested};
use crate::log::LogError;

/// Settings of the HTTP edge.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send its body; slower ones get 408.
    pub body_timeout: std::time::Duration,
    /// What webhook senders must present.
    pub auth: IngestAuth,
    /// Tokens for the read side (`/v1/events:stream`, `/v1/stats`): the gRPC subscribe scope.
    pub subscribe_auth: GrpcAuth,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            body_timeout: std::time::Duration::from_secs(30),
            auth: IngestAuth::default(),
            subscribe_auth: GrpcAuth::default(),
        }
    }
}

/// What the handlers share. axum clones the state for every request, so it is one `Arc` (a
/// `Gateway` clone is a dozen reference counts, and the auth settings own heap buffers).
#[derive(Clone)]
struct AppState(std::sync::Arc<Shared>);

struct Shared {
    gateway: Gateway,
    config: HttpConfig,
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The whole service on the shared port: HTTP routes, and `grpc` for requests whose content type
/// is `application/grpc*`.
pub fn router(gateway: Gateway, config: HttpConfig, grpc: tonic::service::Routes) -> Router {
    let grpc = grpc.prepare();
    Router::new()
        .route(
            "/v1/events",
            post(post_event).layer(from_fn_with_state(observed("events", &gateway), observe)),
        )
        .route(
            "/v1/events:batch",
            post(post_batch).layer(from_fn_with_state(
                observed("events_batch", &gateway),
                observe,
            )),
        )
        .route("/", get(console::page))
        .route("/metrics", get(metrics))
        .route("/v1/events:stream", get(stream::stream))
        .route("/v1/stats", get(stream::stats))
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(|| async { HttpError::MethodNotAllowed })
        .fallback(move |request: Request| {
            let grpc = grpc.clone();
            async move {
                if is_grpc(request.headers()) {
                    match grpc.oneshot(request).await {
                        Ok(response) => response.map(Body::new),
                        Err(never) => match never {},
                    }
                } else {
                    HttpError::NotFound.into_response()
                }
            }
        })
        .with_state(AppState(std::sync::Arc::new(Shared { gateway, config })))
}

/// What the metrics layer of one ingest route needs; one `Arc`, cloned per request.
struct Observed {
    gateway: Gateway,
    route: &'static str,
}

fn observed(route: &'static str, gateway: &Gateway) -> std::sync::Arc<Observed> {
    std::sync::Arc::new(Observed {
        gateway: gateway.clone(),
        route,
    })
}

/// Counts each request to an ingest route and its latency, by outcome.
async fn observe(
    State(observed): State<std::sync::Arc<Observed>>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    let result = match response.status().as_u16() {
        200 => "ok",
        400 => "invalid",
        401 => "unauthorized",
        413 => "too_large",
        415 => "unsupported_media_type",
        429 => "overloaded",
        503 => "unavailable",
        _ => "error",
    };
    observed
        .gateway
        .metrics()
        .observe_request(observed.route, result, started.elapsed());
    response
}

async fn metrics(State(state): State<AppState>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    (
        [(header::CONTENT_TYPE, content_type)],
        state.gateway.render_metrics(),
    )
        .into_response()
}

fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

async fn readyz(State(state): State<AppState>) -> Response {
    if state.gateway.ready() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready"})),
        )
            .into_response()
    }
}

async fn post_event(
    State(state): State<AppState>,
    request: Request,
) -> Result<Json<Ingested>, HttpError> {
    let (_permit, _, body) = accept(&state, request, &["application/json"]).await?;
    Ok(Json(state.gateway.ingest_json(body).await?))
}

/// Everything an ingest request goes through before its body is decoded: admission (429 when
/// too many are in flight), content type (415), body size (413) and time (408), credentials
/// (401, checked on the raw body). Returns the admission permit (hold it until answered), the
/// media type and the body.
async fn accept(
    state: &AppState,
    request: Request,
    allowed: &[&'static str],
) -> Result<(tokio::sync::OwnedSemaphorePermit, &'static str, Bytes), HttpError> {
    let permit = state.gateway.admit().ok_or(HttpError::Overloaded)?;
    let media = require_content_type(request.headers(), allowed)?;
    let (parts, body) = request.into_parts();
    let read = read_body(&parts.headers, body, state.config.max_body_bytes);
    let body = tokio::time::timeout(state.config.body_timeout, read)
        .await
        .map_err(|_| HttpError::Timeout)??;
    state
        .config
        .auth
        .check(&parts.headers, parts.uri.query(), &body)
        .map_err(HttpError::Auth)?;
    Ok((permit, media, body))
}

/// `POST /v1/events:batch`: a JSON array of events (`application/json`) or one event per line
/// (`application/x-ndjson`). Answers 200 with one result per item, in order: a bad item is
/// answered with its error, and an item the store did not take (JetStream may store part of a
/// batch) with `"retry": true`; neither rejects the others. The whole batch is rejected (400)
/// only when it cannot be split into items, and answered 503 only when storage failed and
/// nothing was stored.
async fn post_batch(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, HttpError> {
    let ndjson = [
        "application/x-ndjson",
        "application/ndjson",
        "application/jsonl",
        "application/json-seq",
    ];
    let allowed = ["application/json", ndjson[0], ndjson[1], ndjson[2]];
    let (_permit, content_type, body) = accept(&state, request, &allowed).await?;
    let policy = state.gateway.decode_policy();
    let items: Vec<Result<(Decoded, Bytes), DecodeError>> = if content_type == "application/json" {
        decode::decode_array(&body, policy)
            .map_err(HttpError::Invalid)?
            .into_iter()
            .map(|item| Ok((item.decoded?, body.slice(item.range))))
            .collect()
    } else {
        split_lines(&body)
            .into_iter()
            .map(|line| Ok((decode::decode_with(&line, policy)?, line)))
            .collect()
    };
    let results = state.gateway.ingest_batch(items).await;
    let storage_error = results.iter().find_map(|result| match result {
        Err(IngestError::Unavailable(error)) => Some(error),
        _ => None,
    });
    if let Some(error) = storage_error {
        if !results.iter().any(Result::is_ok) {
            // Nothing stored: the sender retries the whole batch.
            return Err(HttpError::Storage(error.clone()));
        }
    }
    let mut answer = BatchAnswer {
        stored: 0,
        duplicates: 0,
        rejected: 0,
        unavailable: 0,
        results: Vec::with_capacity(results.len()),
    };
    for result in &results {
        let item = match result {
            Ok(ingested) => {
                if ingested.appended.duplicate {
                    answer.duplicates += 1;
                } else {
                    answer.stored += 1;
                }
                ItemAnswer::Appended(ingested)
            }
            Err(IngestError::Invalid(error)) => {
                answer.rejected += 1;
                ItemAnswer::Rejected(ErrorBody::from(error))
            }
            Err(IngestError::Unavailable(error)) => {
                answer.unavailable += 1;
                ItemAnswer::Unavailable {
                    error: error.to_string(),
                    retry: true,
                }
            }
        };
        answer.results.push(item);
    }
    let mut response = Json(answer).into_response();
    if storage_error.is_some() {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    Ok(response)
}

/// The answer to a batch: counts, then one result per item in order.
#[derive(serde::Serialize)]
struct BatchAnswer<'a> {
    stored: usize,
    duplicates: usize,
    rejected: usize,
    /// Items not stored because storage failed (only when some were); send them again.
    #[serde(skip_serializing_if = "is_zero")]
    unavailable: usize,
    results: Vec<ItemAnswer<'a>>,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

#[derive(serde::Serialize)]
#[serde(untagged)]
enum ItemAnswer<'a> {
    Appended(&'a Ingested),
    Rejected(ErrorBody<'a>),
    /// Not stored (storage failed for this item while others were stored): send it again.
    Unavailable {
        error: String,
        retry: bool,
    },
}

/// A decode error as JSON: `{"error", "path", "line", "column"}` (the last two when known).
#[derive(serde::Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    path: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    line: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    column: Option<usize>,
}

impl<'a> From<&'a DecodeError> for ErrorBody<'a> {
    fn from(error: &'a DecodeError) -> Self {
        let (line, column) = match (error.line, error.column) {
            (Some(line), Some(column)) => (Some(line), Some(column)),
            _ => (None, None),
        };
        Self {
            error: &error.message,
            path: &error.path,
            line,
            column,
        }
    }
}

/// Splits NDJSON into its non-blank lines.
fn split_lines(body: &Bytes) -> Vec<Bytes> {
    body.split(|&b| b == b'\n')
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(|line| body.slice_ref(line))
        .collect()
}

/// The media type without parameters, if it is one of `allowed`.
fn require_content_type(
    headers: &HeaderMap,
    allowed: &[&'static str],
) -> Result<&'static str, HttpError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let media = value.split(';').next().unwrap_or("").trim();
    allowed
        .iter()
        .find(|allowed| media.eq_ignore_ascii_case(allowed))
        .copied()
        .ok_or(HttpError::UnsupportedMediaType(allowed.join(", ")))
}

async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, HttpError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(HttpError::TooLarge(limit));
    }
    axum::body::to_bytes(body, limit).await.map_err(|error| {
        let too_large = std::error::Error::source(&error)
            .is_some_and(|source| source.is::<http_body_util::LengthLimitError>());
        if too_large {
            HttpError::TooLarge(limit)
        } else {
            HttpError::BodyRead
        }
    })
}

fn subscribe_status(error: &crate::subscribe::SubscribeError) -> StatusCode {
    use crate::subscribe::SubscribeError;
    match error {
        SubscribeError::Log(LogError::Truncated { .. }) => StatusCode::GONE,
        SubscribeError::Log(_) | SubscribeError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        SubscribeError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        SubscribeError::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Every way an HTTP request fails; each maps to one status and a JSON body `{"error": ...}`.
#[derive(Debug, thiserror::Error)]
enum HttpError {
    #[error("invalid event")]
    Invalid(DecodeError),
    #[error(transparent)]
    Storage(LogError),
    #[error("request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("unsupported content type; expected one of: {0}")]
    UnsupportedMediaType(String),
    #[error("could not read the request body")]
    BodyRead,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    BadQuery(String),
    #[error(transparent)]
    Subscribe(crate::subscribe::SubscribeError),
    #[error(transparent)]
    Auth(AuthError),
    #[error("too many requests in flight; retry shortly")]
    Overloaded,
    #[error("the request body was not received in time")]
    Timeout,
    #[error("not found")]
    NotFound,
}

impl From<IngestError> for HttpError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Invalid(error) => Self::Invalid(error),
            IngestError::Unavailable(error) => Self::Storage(error),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::Invalid(_) | Self::BodyRead => StatusCode::BAD_REQUEST,
            Self::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadQuery(_) => StatusCode::BAD_REQUEST,
            Self::Subscribe(error) => subscribe_status(error),
            Self::Auth(AuthError::Unauthenticated) => StatusCode::UNAUTHORIZED,
            Self::Auth(AuthError::Forbidden) => StatusCode::FORBIDDEN,
            Self::Overloaded => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
        };
        let body = match &self {
            Self::Invalid(error) => json!(ErrorBody::from(error)),
            other => json!({"error": other.to_string()}),
        };
        let mut response = (status, Json(body)).into_response();
        let headers = response.headers_mut();
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
