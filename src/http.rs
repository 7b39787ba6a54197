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
use crate::decode::pool::Busy;
use crate::decode::{self, BatchItem, DecodeError, Policy};
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
    let result = match response.extensions().get::<Abandoned>() {
        // Not the sender's event: its client went away before the body was whole.
        Some(Abandoned) => "abandoned",
        None => crate::metrics::result_word(response.status().as_u16()),
    };
    observed
        .gateway
        .metrics()
        .observe_request(observed.route, result, started.elapsed());
    response
}

/// Marks the answer to a request whose client stopped sending its body part way (a closed
/// connection, a reset stream): counted as `abandoned`, not as an invalid event.
#[derive(Clone, Copy)]
struct Abandoned;

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
    let key = idempotency_key(request.headers())?;
    let (_permit, _, body) = accept(&state, request, &["application/json"]).await?;
    Ok(Json(state.gateway.ingest_json(body, key.as_deref()).await?))
}

/// The sender's idempotency key: `Idempotency-Key`, else Standard Webhooks' `webhook-id` (the
/// same for every retry of a delivery). A transitive event sent with one is stored once.
fn idempotency_key(headers: &header::HeaderMap) -> Result<Option<String>, HttpError> {
    let Some((name, value)) = ["idempotency-key", "webhook-id"]
        .iter()
        .find_map(|name| headers.get(*name).map(|value| (*name, value)))
    else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .map_err(|_| HttpError::BadHeader(format!("{name}: expected visible ASCII")))?;
    decode::check_idempotency_key(key)
        .map_err(|error| HttpError::BadHeader(format!("{name}: {error}")))?;
    Ok(Some(key.to_owned()))
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

/// Items of a batch answered one by one at most, in `results`; the rest are summarised in
/// `omitted`, as runs.
const DETAILED_ITEMS: usize = 1000;

/// Rejected items answered in full at most: `results` stops before the next one.
const DETAILED_ERRORS: usize = 100;

/// Runs in `omitted` at most; past them, one last run counts what each later item came to.
const MAX_RUNS: usize = 100;

/// Deviations listed in a batch answer: a stored item's list is given whole while fewer than this
/// many have been listed before it; later lists are only counted (`omitted_deviations`; every
/// stored event still carries its own).
const LISTED_DEVIATIONS: usize = 100;

/// What a batch answer keeps of one item while the valid ones are stored: a few bytes each, so a
/// body of many tiny items costs little memory.
enum Slot {
    /// A valid item: its result is the next one the store answers.
    Event,
    /// A rejected item: its error, when it may be shown (one of the first, or the first of a run
    /// of items with the same error), and whether the item before it had the same error.
    Rejected {
        error: Option<Box<DecodeError>>,
        continues: bool,
    },
}

/// A batch split into items and decoded.
struct Batch {
    slots: Vec<Slot>,
    /// The valid items' records, built as they were decoded.
    events: Vec<crate::gateway::Built>,
    rejected: usize,
}

/// Splits and decodes a batch body (a JSON array, or NDJSON): on a decode worker.
fn decode_batch(
    body: &Bytes,
    array: bool,
    policy: Policy,
    max_event_bytes: usize,
) -> Result<Batch, DecodeError> {
    let mut batch = Batch {
        slots: Vec::new(),
        events: Vec::new(),
        rejected: 0,
    };
    // The error of the item before, when it was rejected: a run goes on while it is the same.
    let mut previous: Option<(String, String)> = None;
    let mut runs_kept = 0;
    let each = |item: BatchItem| match item.decoded {
        Ok(decoded) => {
            batch.slots.push(Slot::Event);
            batch.events.push(crate::gateway::built(
                decoded,
                body.slice(item.range),
                max_event_bytes,
            ));
            previous = None;
        }
        Err(error) => {
            batch.rejected += 1;
            let index = batch.slots.len();
            let continues = previous
                .as_ref()
                .is_some_and(|(message, path)| *message == error.message && *path == error.path);
            // Kept: every error `results` may show, and the first of each run `omitted` may
            // show; the others are only counted.
            let shown = batch.rejected <= DETAILED_ERRORS + 1 || index == DETAILED_ITEMS;
            // Runs are counted from where `results` stops (the runs before are answered item
            // by item): `omitted` shows up to MAX_RUNS of them, each error with its first item.
            let past_results = batch.rejected > DETAILED_ERRORS || index >= DETAILED_ITEMS;
            let starts_run = !continues && past_results && runs_kept <= MAX_RUNS;
            if starts_run {
                runs_kept += 1;
            }
            if !continues {
                previous = Some((error.message.clone(), error.path.clone()));
            }
            batch.slots.push(Slot::Rejected {
                error: (shown || starts_run).then(|| Box::new(error)),
                continues,
            });
        }
    };
    if array {
        decode::decode_array(body, policy, each)?;
    } else {
        decode::decode_lines(body, policy, each);
    }
    Ok(batch)
}

/// `POST /v1/events:batch`: a JSON array of events (`application/json`) or one event per line
/// (`application/x-ndjson`). Answers 200 with what became of each item, in order: the first
/// items one by one in `results` (a bad item with its error, an item the store did not take with
/// `"retry": true`; neither rejects the others), the rest in runs of like items in `omitted`, so
/// the answer stays small whatever the body. The whole batch is rejected (400) only when it
/// cannot be split into items, and answered 503 only when storage failed and nothing was stored.
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
    let key = idempotency_key(request.headers())?;
    let (_permit, content_type, body) = accept(&state, request, &allowed).await?;
    let body = body.slice_ref(decode::strip_bom(&body));
    let policy = state.gateway.decode_policy();
    let max_event_bytes = state.gateway.max_event_bytes();
    let array = content_type == "application/json";
    let Batch {
        slots,
        mut events,
        rejected,
    } = state
        .gateway
        .decoder()
        .run(body.len(), move || {
            decode_batch(&body, array, policy, max_event_bytes)
        })
        .await
        .map_err(HttpError::Busy)?
        .map_err(HttpError::Invalid)?;
    // A transitive item of a request with an idempotency key is keyed by its place in the body.
    let places = slots
        .iter()
        .enumerate()
        .filter(|(_, slot)| matches!(slot, Slot::Event));
    for ((index, _), event) in places.zip(events.iter_mut()) {
        event.keyed(key.as_deref(), index);
    }
    // One result per stored item: JetStream stores each on its own, so some may fail while
    // others are stored (answered per item); nothing stored at all is a 503 (retry the batch).
    let ingested = state.gateway.ingest_batch(events).await;
    // An item too large to store is refused for good (413 alone), not retried.
    let too_large = ingested
        .iter()
        .filter(|item| matches!(item, Err(LogError::TooLarge(_))))
        .count();
    let unavailable = ingested.iter().filter(|item| item.is_err()).count() - too_large;
    let unknown = ingested
        .iter()
        .filter(|item| matches!(item, Err(LogError::Unknown(_))))
        .count();
    if unavailable > 0 && unavailable == ingested.len() {
        // Some may be stored: the answer says so, whatever became of the others.
        let error = ingested
            .iter()
            .find(|item| matches!(item, Err(LogError::Unknown(_))))
            .or_else(|| ingested.iter().find(|item| item.is_err()));
        if let Some(Err(error)) = error {
            return Err(HttpError::Storage(error.clone()));
        }
    }
    // `results`: the first items, up to the first one past either bound.
    let mut detailed = slots.len().min(DETAILED_ITEMS);
    let mut detailed_errors = 0;
    for (i, slot) in slots.iter().enumerate().take(detailed) {
        if matches!(slot, Slot::Rejected { .. }) {
            detailed_errors += 1;
            if detailed_errors > DETAILED_ERRORS {
                detailed = i;
                detailed_errors -= 1;
                break;
            }
        }
    }
    let detailed_events = slots[..detailed]
        .iter()
        .filter(|slot| matches!(slot, Slot::Event))
        .count();
    let mut listed = 0;
    let mut list_until = detailed_events;
    let mut omitted_deviations = 0;
    for (i, item) in ingested.iter().enumerate() {
        let Ok(item) = item else { continue };
        if i < detailed_events && listed < LISTED_DEVIATIONS {
            listed += item.deviations.len();
        } else {
            list_until = list_until.min(i);
            omitted_deviations += item.deviations.len();
        }
    }
    let omitted = runs(&slots[detailed..], &ingested[detailed_events..], detailed)
        .map_err(|error| HttpError::Storage(LogError::Unavailable(error.into())))?;
    let duplicates = ingested
        .iter()
        .filter(|i| i.as_ref().is_ok_and(|i| i.appended.duplicate))
        .count();
    let mut response = Json(BatchAnswer {
        stored: ingested.len() - unavailable - too_large - duplicates,
        duplicates,
        rejected: rejected + too_large,
        unavailable,
        unknown,
        omitted_errors: rejected - detailed_errors,
        omitted_deviations,
        results: Results {
            slots: &slots[..detailed],
            ingested: &ingested[..detailed_events],
            list_until,
        },
        omitted,
    })
    .into_response();
    if unavailable > 0 {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    Ok(response)
}

/// The answer to a batch: counts, the first items one by one, then runs of the others.
#[derive(serde::Serialize)]
struct BatchAnswer<'a> {
    stored: usize,
    duplicates: usize,
    rejected: usize,
    /// Items not stored because storage failed (only when some were); send them again.
    #[serde(skip_serializing_if = "is_zero")]
    unavailable: usize,
    /// Of `unavailable`, the items whose outcome is unknown: the store's answer was lost, they
    /// may be stored (sent again, an event with an id or an idempotency key is stored once).
    #[serde(skip_serializing_if = "is_zero")]
    unknown: usize,
    /// Rejected items not answered in full (they are in `omitted`).
    #[serde(skip_serializing_if = "is_zero")]
    omitted_errors: usize,
    #[serde(skip_serializing_if = "is_zero")]
    omitted_deviations: usize,
    results: Results<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    omitted: Vec<Run<'a>>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Consecutive items (`from` to `to`, 0-based indices in the body, both included) that came to
/// the same thing.
#[derive(serde::Serialize)]
#[serde(untagged)]
enum Run<'a> {
    /// Stored (or, `duplicate`, stored before) under consecutive sequences from `sequence` to
    /// `last_sequence`.
    Stored {
        from: usize,
        to: usize,
        sequence: u64,
        last_sequence: u64,
        duplicate: bool,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        conflict: bool,
    },
    /// Rejected, each with this error at this path.
    Rejected {
        from: usize,
        to: usize,
        error: &'a str,
        path: &'a str,
    },
    /// Not stored: storage failed for them (send them again when `retry`).
    Unstored {
        from: usize,
        to: usize,
        error: String,
        retry: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        outcome: Option<&'static str>,
    },
    /// Past [`MAX_RUNS`]: what the remaining items came to, counted.
    Rest {
        from: usize,
        to: usize,
        stored: usize,
        duplicates: usize,
        rejected: usize,
        unavailable: usize,
        #[serde(skip_serializing_if = "is_zero")]
        unknown: usize,
    },
}

/// What became of one item.
enum Outcome<'a> {
    Stored(&'a Ingested),
    Unstored(&'a LogError),
    Rejected {
        error: Option<&'a DecodeError>,
        continues: bool,
    },
}

impl<'a> Run<'a> {
    /// A run of the one item `index`; `None` when it cannot start one (an error not kept).
    fn start(index: usize, outcome: &Outcome<'a>) -> Option<Self> {
        Some(match outcome {
            Outcome::Stored(item) => Run::Stored {
                from: index,
                to: index,
                sequence: item.appended.sequence,
                last_sequence: item.appended.sequence,
                duplicate: item.appended.duplicate,
                conflict: item.conflict,
            },
            Outcome::Unstored(error) => Run::Unstored {
                from: index,
                to: index,
                error: error.to_string(),
                retry: retryable(error),
                outcome: outcome_word(error),
            },
            Outcome::Rejected { error, .. } => {
                let error = (*error)?;
                Run::Rejected {
                    from: index,
                    to: index,
                    error: &error.message,
                    path: &error.path,
                }
            }
        })
    }

    /// Adds item `index` (the one after this run) if it came to the same; whether it did.
    fn extend(&mut self, index: usize, outcome: &Outcome<'a>) -> bool {
        match (self, outcome) {
            (
                Run::Stored {
                    to,
                    last_sequence,
                    duplicate,
                    conflict,
                    ..
                },
                Outcome::Stored(item),
            ) if item.appended.duplicate == *duplicate
                && item.conflict == *conflict
                && item.appended.sequence == *last_sequence + 1 =>
            {
                *to = index;
                *last_sequence += 1;
                true
            }
            (Run::Rejected { to, .. }, Outcome::Rejected { continues, .. }) if *continues => {
                *to = index;
                true
            }
            (Run::Unstored { to, error, .. }, Outcome::Unstored(next))
                if next.to_string() == *error =>
            {
                *to = index;
                true
            }
            (
                Run::Rest {
                    to,
                    stored,
                    duplicates,
                    rejected,
                    unavailable,
                    unknown,
                    ..
                },
                outcome,
            ) => {
                *to = index;
                match outcome {
                    Outcome::Stored(item) if item.appended.duplicate => *duplicates += 1,
                    Outcome::Stored(_) => *stored += 1,
                    Outcome::Unstored(LogError::Unknown(_)) => {
                        *unavailable += 1;
                        *unknown += 1;
                    }
                    Outcome::Unstored(error) if retryable(error) => *unavailable += 1,
                    Outcome::Unstored(_) => *rejected += 1,
                    Outcome::Rejected { .. } => *rejected += 1,
                }
                true
            }
            _ => false,
        }
    }
}

/// The items of `slots` (the first at index `first` of the body), with the store's results of
/// the valid ones, as runs: at most [`MAX_RUNS`] and one last that counts the rest.
fn runs<'a>(
    slots: &'a [Slot],
    ingested: &'a [Result<Ingested, LogError>],
    first: usize,
) -> Result<Vec<Run<'a>>, &'static str> {
    let mut runs: Vec<Run<'a>> = Vec::new();
    let mut results = ingested.iter();
    for (i, slot) in slots.iter().enumerate() {
        let index = first + i;
        let outcome = match slot {
            Slot::Event => match results.next() {
                Some(Ok(item)) => Outcome::Stored(item),
                Some(Err(error)) => Outcome::Unstored(error),
                None => return Err("fewer results than stored items"),
            },
            Slot::Rejected { error, continues } => Outcome::Rejected {
                error: error.as_deref(),
                continues: *continues,
            },
        };
        if let Some(last) = runs.last_mut() {
            if last.extend(index, &outcome) {
                continue;
            }
        }
        let run = (runs.len() < MAX_RUNS)
            .then(|| Run::start(index, &outcome))
            .flatten();
        let run = run.unwrap_or_else(|| {
            let mut rest = Run::Rest {
                from: index,
                to: index,
                stored: 0,
                duplicates: 0,
                rejected: 0,
                unavailable: 0,
                unknown: 0,
            };
            // Counts the item (a rest run takes any).
            rest.extend(index, &outcome);
            rest
        });
        runs.push(run);
    }
    Ok(runs)
}

/// The first items' results, one per item, written as they are serialized (never a list of
/// answers in memory): `{"sequence", "duplicate", "deviations"?}`, `{"error", "retry": true}`
/// (not stored: storage failed for it while others were stored), `{"error", "path", "line",
/// "column"}`.
struct Results<'a> {
    slots: &'a [Slot],
    ingested: &'a [Result<Ingested, LogError>],
    /// Stored items from this one on are answered without their deviations.
    list_until: usize,
}

/// Whether an item storage did not take may be sent again: every storage error of a batch
/// item is, but a record too large for the store (refused for good, like a 413).
fn retryable(error: &LogError) -> bool {
    !matches!(error, LogError::TooLarge(_))
}

/// Whether an event storage did not acknowledge may be stored all the same: `"unknown"` (the
/// store's answer was lost), `"not_stored"` (storage failed before it took the event). `None`
/// for a refusal that is not storage's (too large).
fn outcome_word(error: &LogError) -> Option<&'static str> {
    match error {
        LogError::Unknown(_) => Some("unknown"),
        LogError::TooLarge(_) => None,
        _ => Some("not_stored"),
    }
}

/// An item storage did not take.
#[derive(serde::Serialize)]
struct Unstored {
    error: String,
    retry: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    outcome: Option<&'static str>,
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
                        retry: retryable(error),
                        outcome: outcome_word(error),
                    })?,
                    None => return Err(S::Error::custom("fewer results than stored items")),
                },
                Slot::Rejected {
                    error: Some(error), ..
                } => seq.serialize_element(&ErrorBody::from(&**error))?,
                Slot::Rejected { error: None, .. } => seq.serialize_element(&())?,
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
    #[error("{0} (--decode-queue)")]
    Busy(Busy),
    #[error("the request body was not received in time")]
    Timeout,
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    BadHeader(String),
    #[error("{0}")]
    OtherStore(String),
}

impl From<IngestError> for HttpError {
    fn from(error: IngestError) -> Self {
        match error {
            IngestError::Invalid(error) => Self::Invalid(error),
            IngestError::Unavailable(error) => Self::Storage(error),
            IngestError::Busy(busy) => Self::Busy(busy),
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match &self {
            Self::Invalid(_) | Self::BodyRead => StatusCode::BAD_REQUEST,
            Self::Storage(LogError::TooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoRoom(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::UnsupportedMediaType(_)
            | Self::UnsupportedCharset(_)
            | Self::UnsupportedEncoding => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::BadQuery(_) | Self::BadHeader(_) => StatusCode::BAD_REQUEST,
            Self::OtherStore(_) => StatusCode::PRECONDITION_FAILED,
            Self::Subscribe(error) => subscribe_status(error),
            Self::Auth(AuthError::Unauthenticated) => StatusCode::UNAUTHORIZED,
            Self::Auth(AuthError::Forbidden) => StatusCode::FORBIDDEN,
            Self::Overloaded | Self::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::NotFound => StatusCode::NOT_FOUND,
        };
        let body = match &self {
            Self::Invalid(error) => json!(ErrorBody::from(error)),
            Self::Storage(error) => match outcome_word(error) {
                Some(outcome) => json!({"error": self.to_string(), "outcome": outcome}),
                None => json!({"error": self.to_string()}),
            },
            other => json!({"error": other.to_string()}),
        };
        let mut response = (status, Json(body)).into_response();
        if matches!(self, Self::BodyRead) {
            response.extensions_mut().insert(Abandoned);
        }
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
