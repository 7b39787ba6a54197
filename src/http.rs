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

use crate::auth::{AuthError, GrpcAuth, HeadCheck, IngestAuth, MetricsAuth};
use crate::decode::{self, BatchItem, DecodeError};
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
    /// The token `/metrics` needs (`--metrics-token`); none: open.
    pub metrics_auth: MetricsAuth,
    /// Bodies read at once whose sender only a signature over that body can authenticate
    /// (`--webhook-secret` without `--ingest-token`); more get 429. A budget of their own, so
    /// that senders nobody has authenticated yet never hold the ingest slots (`--max-in-flight`)
    /// of those who are.
    pub max_awaiting_signature: usize,
    /// The byte budget of bodies being received and handled (`--request-body-memory`), shared
    /// with gRPC; a body that does not fit gets 429 at once.
    pub budget: crate::request_budget::BodyBudget,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 1024 * 1024,
            body_timeout: std::time::Duration::from_secs(30),
            auth: IngestAuth::default(),
            subscribe_auth: GrpcAuth::default(),
            metrics_auth: MetricsAuth::default(),
            max_awaiting_signature: 1024,
            budget: crate::request_budget::BodyBudget::unmetered(
                crate::request_budget::DEFAULT_REQUEST_BODY_MEMORY,
            ),
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
    /// Slots for bodies read before their sender is authenticated ([`HttpConfig::max_awaiting_signature`]).
    awaiting_signature: std::sync::Arc<tokio::sync::Semaphore>,
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
        .with_state(AppState(std::sync::Arc::new(Shared {
            awaiting_signature: std::sync::Arc::new(tokio::sync::Semaphore::new(
                config.max_awaiting_signature.max(1),
            )),
            gateway,
            config,
        })))
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

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(error) = state.config.metrics_auth.check(&headers) {
        return HttpError::Auth(error).into_response();
    }
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

/// Everything an ingest request goes through before its body is decoded, cheapest and least
/// trusting first: credentials that need no body (401: the shared token, the form of signature
/// headers), the representation (415: content type, charset, content encoding), admission (429),
/// body size (413), room in the body budget (429) and time (408), then the signature over the
/// raw body (401). A sender that is not authenticated before its body is read (signatures only)
/// holds a slot of its own budget while the body arrives, and an ingest slot only once the
/// signature is good. Returns the ingest slot with the body's bytes in the budget (hold both
/// until answered), the media type and the body.
async fn accept(
    state: &AppState,
    request: Request,
    allowed: &[&'static str],
) -> Result<(Admitted, &'static str, Bytes), HttpError> {
    let (parts, body) = request.into_parts();
    let auth = &state.config.auth;
    let head = auth
        .check_head(&parts.headers, parts.uri.query())
        .map_err(HttpError::Auth)?;
    let media = require_representation(&parts.headers, allowed)?;
    let permit = match head {
        HeadCheck::Authenticated => state.gateway.admit(),
        HeadCheck::AwaitingSignature => state.awaiting_signature.clone().try_acquire_owned().ok(),
    }
    .ok_or(HttpError::Overloaded)?;
    let reservation = state.config.budget.reservation();
    let read = read_body(
        &parts.headers,
        body,
        state.config.max_body_bytes,
        &reservation,
    );
    let body = tokio::time::timeout(state.config.body_timeout, read)
        .await
        .map_err(|_| HttpError::Timeout)??;
    auth.check_body(&parts.headers, &body)
        .map_err(HttpError::Auth)?;
    let permit = match head {
        HeadCheck::Authenticated => permit,
        HeadCheck::AwaitingSignature => {
            drop(permit);
            state.gateway.admit().ok_or(HttpError::Overloaded)?
        }
    };
    let admitted = Admitted {
        _slot: permit,
        _body: reservation,
    };
    Ok((admitted, media, body))
}

/// An admitted ingest request: its ingest slot and its body's bytes in the budget, both given
/// back when dropped.
struct Admitted {
    _slot: tokio::sync::OwnedSemaphorePermit,
    _body: crate::request_budget::Reservation,
}

/// Rejected items of a batch answered in full; past them a rejected item's result is `null` and
/// it is only counted (`omitted_errors`). With [`LISTED_DEVIATIONS`] this bounds the answer to a
/// small multiple of the body (one result per item: `null,` for the 2 bytes of `{\n`) plus a
/// fixed amount, whatever the body holds.
const DETAILED_ERRORS: usize = 100;

/// Deviations listed in a batch answer: a stored item's list is given whole while fewer than this
/// many have been listed before it; later lists are only counted (`omitted_deviations`; every
/// stored event still carries its own).
const LISTED_DEVIATIONS: usize = 100;

/// What a batch answer keeps of one item while the valid ones are stored: a few bytes each, so a
/// body of many tiny items costs little memory.
enum Slot {
    /// A valid item: its result is the next one the store answers.
    Event,
    /// A rejected item: its error, while fewer than [`DETAILED_ERRORS`] were kept.
    Rejected(Option<Box<DecodeError>>),
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
    let body = body.slice_ref(decode::strip_bom(&body));
    let policy = state.gateway.decode_policy();
    let mut slots = Vec::new();
    let mut events = Vec::new();
    let mut rejected = 0;
    let each = |item: BatchItem| match item.decoded {
        Ok(decoded) => {
            slots.push(Slot::Event);
            events.push((decoded, body.slice(item.range)));
        }
        Err(error) => {
            rejected += 1;
            slots.push(Slot::Rejected(
                (rejected <= DETAILED_ERRORS).then(|| Box::new(error)),
            ));
        }
    };
    if content_type == "application/json" {
        decode::decode_array(&body, policy, each).map_err(HttpError::Invalid)?;
    } else {
        decode::decode_lines(&body, policy, each);
    }
    // One result per stored item: JetStream stores each on its own, so some may fail while
    // others are stored (answered per item); nothing stored at all is a 503 (retry the batch).
    let ingested = state.gateway.ingest_batch(events).await;
    let unavailable = ingested.iter().filter(|item| item.is_err()).count();
    if unavailable > 0 && unavailable == ingested.len() {
        if let Some(error) = ingested.iter().find_map(|item| item.as_ref().err()) {
            return Err(HttpError::Storage(error.clone()));
        }
    }
    let mut listed = 0;
    let mut list_until = ingested.len();
    let mut omitted_deviations = 0;
    for (i, item) in ingested.iter().enumerate() {
        let Ok(item) = item else { continue };
        if listed < LISTED_DEVIATIONS {
            listed += item.deviations.len();
        } else {
            list_until = list_until.min(i);
            omitted_deviations += item.deviations.len();
        }
    }
    let duplicates = ingested
        .iter()
        .filter(|i| i.as_ref().is_ok_and(|i| i.appended.duplicate))
        .count();
    let mut response = Json(BatchAnswer {
        stored: ingested.len() - unavailable - duplicates,
        duplicates,
        rejected,
        unavailable,
        omitted_errors: rejected.saturating_sub(DETAILED_ERRORS),
        omitted_deviations,
        results: Results {
            slots: &slots,
            ingested: &ingested,
            list_until,
        },
    })
    .into_response();
    if unavailable > 0 {
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
    #[serde(skip_serializing_if = "is_zero")]
    omitted_errors: usize,
    #[serde(skip_serializing_if = "is_zero")]
    omitted_deviations: usize,
    results: Results<'a>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// One result per item, written as they are serialized (never a list of answers in memory):
/// `{"sequence", "duplicate", "deviations"?}`, `{"error", "retry": true}` (not stored: storage
/// failed for it while others were stored), `{"error", "path", "line", "column"}` or `null`.
struct Results<'a> {
    slots: &'a [Slot],
    ingested: &'a [Result<Ingested, LogError>],
    /// Stored items from this one on are answered without their deviations.
    list_until: usize,
}

/// An item storage did not take.
#[derive(serde::Serialize)]
struct Unstored {
    error: String,
    retry: bool,
}

impl serde::Serialize for Results<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeSeq};
        let mut seq = serializer.serialize_seq(Some(self.slots.len()))?;
        let mut ingested = self.ingested.iter().enumerate();
        for slot in self.slots {
            match slot {
                Slot::Event => match ingested.next() {
                    Some((i, Ok(item))) if i < self.list_until => seq.serialize_element(item)?,
                    Some((_, Ok(item))) => seq.serialize_element(&item.appended)?,
                    Some((_, Err(error))) => seq.serialize_element(&Unstored {
                        error: error.to_string(),
                        retry: true,
                    })?,
                    None => return Err(S::Error::custom("fewer results than stored items")),
                },
                Slot::Rejected(Some(error)) => seq.serialize_element(&ErrorBody::from(&**error))?,
                Slot::Rejected(None) => seq.serialize_element(&())?,
            }
        }
        seq.end()
    }
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

/// Checks how the body is represented: its media type (without parameters) must be one of
/// `allowed`, its `charset` (if given) UTF-8, and it must not be compressed (`Content-Encoding`
/// other than `identity`: no sender is known to compress, and a decompressor would make the
/// work of a request unbounded by its size on the wire). Returns the media type.
fn require_representation(
    headers: &HeaderMap,
    allowed: &[&'static str],
) -> Result<&'static str, HttpError> {
    let value = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut parts = value.split(';');
    let media = parts.next().unwrap_or("").trim();
    let media = allowed
        .iter()
        .find(|allowed| media.eq_ignore_ascii_case(allowed))
        .copied()
        .ok_or_else(|| HttpError::UnsupportedMediaType(allowed.join(", ")))?;
    for parameter in parts {
        let Some((name, charset)) = parameter.split_once('=') else {
            continue;
        };
        let charset = charset.trim().trim_matches('"');
        let utf8 = charset.eq_ignore_ascii_case("utf-8") || charset.eq_ignore_ascii_case("utf8");
        if name.trim().eq_ignore_ascii_case("charset") && !utf8 {
            return Err(HttpError::UnsupportedCharset(shown(charset, 40)));
        }
    }
    for encoding in headers.get_all(header::CONTENT_ENCODING) {
        let identity = encoding.to_str().is_ok_and(|codings| {
            codings
                .split(',')
                .map(str::trim)
                .all(|coding| coding.is_empty() || coding.eq_ignore_ascii_case("identity"))
        });
        if !identity {
            return Err(HttpError::UnsupportedEncoding);
        }
    }
    Ok(media)
}

/// `text` as it may be echoed in an answer: at most `max` bytes (cut at a character boundary,
/// marked with `…`), so a client cannot make an answer as large as its request.
fn shown(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Reads a body of at most `limit` bytes, its bytes held in `reservation`: its declared
/// `Content-Length` is reserved before anything is read (refused at once when the budget cannot
/// hold it), a body without one grows its reservation as its bytes arrive.
async fn read_body(
    headers: &HeaderMap,
    mut body: Body,
    limit: usize,
    reservation: &crate::request_budget::Reservation,
) -> Result<Bytes, HttpError> {
    use http_body_util::BodyExt;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit as u64) {
        return Err(HttpError::TooLarge(limit));
    }
    let declared = declared.map_or(0, |length| length as usize);
    reservation.grow(declared).map_err(HttpError::NoRoom)?;
    let mut buffer = bytes::BytesMut::with_capacity(declared);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| HttpError::BodyRead)?;
        let Ok(data) = frame.into_data() else {
            continue; // Trailers: nothing to keep.
        };
        let length = buffer.len() + data.len();
        if length > limit {
            return Err(HttpError::TooLarge(limit));
        }
        if length > reservation.bytes() {
            reservation
                .grow(length - reservation.bytes())
                .map_err(HttpError::NoRoom)?;
        }
        buffer.extend_from_slice(&data);
    }
    Ok(buffer.freeze())
}

fn subscribe_status(error: &crate::subscribe::SubscribeError) -> StatusCode {
    use crate::subscribe::SubscribeError;
    match error {
        SubscribeError::Log(LogError::Truncated { .. }) => StatusCode::GONE,
        SubscribeError::Log(LogError::Damaged { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
        SubscribeError::Log(_) | SubscribeError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        SubscribeError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
        SubscribeError::Corrupt(_) => StatusCode::INTERNAL_SERVER_ERROR,
        SubscribeError::Ahead { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
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
    #[error(transparent)]
    NoRoom(crate::request_budget::Exhausted),
    #[error("unsupported content type; expected one of: {0}")]
    UnsupportedMediaType(String),
    #[error("unsupported charset `{0}`; send UTF-8 (charset=utf-8, or no charset)")]
    UnsupportedCharset(String),
    #[error("unsupported content encoding; send the body uncompressed (identity)")]
    UnsupportedEncoding,
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
            Self::NoRoom(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::UnsupportedMediaType(_)
            | Self::UnsupportedCharset(_)
            | Self::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
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
        if matches!(self, Self::UnsupportedEncoding) {
            // RFC 7694: the codings the server accepts in a request.
            headers.insert(
                header::ACCEPT_ENCODING,
                header::HeaderValue::from_static("identity"),
            );
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
