//! The gRPC edge: `iqchannels.gateway.v1.EventGateway`, health and reflection. The only module
//! that knows tonic; the one place errors become `tonic::Status`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use tonic::{Request, Response, Status};
use tonic_health::ServingStatus;

use crate::auth::{AuthError, GrpcAuth, Scope};
use crate::budget::{HeldBody, PermitSlot};
use crate::decode::DecodeError;
use crate::gateway::{Gateway, IngestError};
use crate::log::LogError;
use crate::pb::gateway::v1::{
    event_gateway_server::{EventGateway, EventGatewayServer},
    get_event_request, publish_request, subscribe_request, GetEventRequest, PublishRequest,
    PublishResponse, SubscribeRequest,
};
use crate::subscribe::{Filter, Start, SubscribeError, Subscription};
use crate::wire::{EncodedEvent, Form, WireEvent};

mod drain;
mod health;

mod edge;

pub use edge::{
    cut_status_text, DEFAULT_HEALTH_REFLECTION_CALLS, DEFAULT_HEALTH_REFLECTION_MESSAGE_BYTES,
    MAX_STATUS_TEXT,
};

/// What bounds the gRPC requests the gateway reads.
#[derive(Debug, Clone)]
pub struct GrpcLimits {
    /// `--max-body-bytes`: the largest `EventGateway` request message.
    pub max_message_bytes: usize,
    /// `--max-health-reflection-message-bytes`: the largest health or reflection request
    /// message.
    pub health_reflection_message_bytes: usize,
    /// `--max-health-reflection-calls`: health and reflection calls open at once.
    pub health_reflection_calls: usize,
    /// The byte budget of request bodies, shared with the HTTP edge.
    pub budget: crate::request_budget::BodyBudget,
    /// `--request-timeout`: how long an `EventGateway` request message may take to arrive.
    pub message_timeout: std::time::Duration,
}

/// The tonic routes for everything gRPC the gateway serves on its port.
pub fn routes(
    gateway: Gateway,
    limits: GrpcLimits,
    auth: GrpcAuth,
) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    let descriptors = [
        crate::pb::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
    ];
    let mut v1 = tonic_reflection::server::Builder::configure();
    let mut v1alpha = tonic_reflection::server::Builder::configure();
    for set in descriptors {
        v1 = v1.register_encoded_file_descriptor_set(set);
        v1alpha = v1alpha.register_encoded_file_descriptor_set(set);
    }
    // Each reflection service describes itself; teach each about the other so that a listing
    // through either (grpcurl 1.8 asks v1alpha) shows both.
    v1 =
        v1.register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET);
    v1alpha =
        v1alpha.register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET);
    let shutdown = gateway.shutdown();
    let (reporter, health) = health::service(gateway.shutdown());
    tokio::spawn(report_health(gateway.clone(), reporter));
    // The edge refuses a health or reflection message over its limit before tonic sees it;
    // tonic's own limit is the same, should a message reach it anyway.
    let small = limits.health_reflection_message_bytes;
    let edge = std::sync::Arc::new(edge::Edge {
        auth: auth.clone(),
        budget: limits.budget,
        max_message_bytes: limits.max_message_bytes,
        message_timeout: limits.message_timeout,
        health_reflection_message_bytes: small,
        health_reflection_calls: limits.health_reflection_calls.max(1),
        calls: std::sync::Arc::new(tokio::sync::Semaphore::new(
            limits.health_reflection_calls.max(1),
        )),
        gateway: gateway.clone(),
    });
    let service = EventGatewayServer::new(Service { gateway, auth })
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(usize::MAX);
    let mut routes = tonic::service::Routes::new(service)
        .add_service(health.max_decoding_message_size(small))
        .add_service(v1.build_v1()?.max_decoding_message_size(small))
        .add_service(v1alpha.build_v1alpha()?.max_decoding_message_size(small));
    let router = std::mem::take(routes.axum_router_mut());
    *routes.axum_router_mut() = router
        .layer(axum::middleware::from_fn(hold_until_sent))
        .layer(tower::util::MapResponseLayer::new(standard_codes))
        .layer(axum::middleware::from_fn_with_state(edge, edge::edge))
        .layer(drain::DrainLayer::new(shutdown));
    Ok(routes)
}

/// The path of `Subscribe`.
const SUBSCRIBE: &str = "/iqchannels.gateway.v1.EventGateway/Subscribe";

/// A `Subscribe` response's frames carry the budget's bytes of the events encoded in them, given
/// back once hyper has written them (see `budget`): the stream puts each event's permit in the
/// slot this layer hands it in the request's extensions.
async fn hold_until_sent(
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.uri().path() != SUBSCRIBE {
        return next.run(request).await;
    }
    let slot = PermitSlot::default();
    request.extensions_mut().insert(slot.clone());
    next.run(request)
        .await
        .map(|body| axum::body::Body::new(HeldBody::new(body, slot)))
}

/// Gives the codes the gRPC status code guide prescribes to two refusals tonic makes before a
/// handler runs: a request message over the size limit is RESOURCE_EXHAUSTED (tonic says
/// OUT_OF_RANGE, which here means "removed by retention"), and one that is not valid protobuf is
/// INVALID_ARGUMENT (tonic says INTERNAL, which blames the server). Both arrive as trailers-only
/// responses, recognised by tonic's own messages; everything else passes untouched.
fn standard_codes<B>(mut response: http::Response<B>) -> http::Response<B> {
    const TOO_LARGE: &str = "Error, decoded message length too large";
    const UNDECODABLE: &str = "failed to decode Protobuf message";
    let Some(status) = Status::from_header_map(response.headers()) else {
        return response;
    };
    let replaced = match status.code() {
        tonic::Code::OutOfRange if status.message().starts_with(TOO_LARGE) => {
            let detail = status.message().trim_start_matches(TOO_LARGE);
            Status::resource_exhausted(format!(
                "request message too large{detail} (--max-body-bytes)"
            ))
        }
        tonic::Code::Internal if status.message().starts_with(UNDECODABLE) => {
            Status::invalid_argument(format!(
                "the request is not a valid protobuf message: {}",
                status.message()
            ))
        }
        _ => return response,
    };
    let headers = response.headers_mut();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        headers.remove(name);
    }
    // The new message is ASCII we wrote around tonic's; should it still not fit a header,
    // the code alone is set.
    if replaced.add_header(headers).is_err() {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from(replaced.code() as i32),
        );
    }
    response
}

/// Keeps `grpc.health.v1` in step with readiness: SERVING when ready, NOT_SERVING while the store
/// is failing or the gateway drains.
async fn report_health(gateway: Gateway, reporter: tonic_health::server::HealthReporter) {
    let mut last = None;
    loop {
        let status = if gateway.ready() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        if last != Some(status) {
            reporter.set_service_status("", status).await;
            reporter
                .set_service_status(
                    crate::pb::gateway::v1::event_gateway_server::SERVICE_NAME,
                    status,
                )
                .await;
            last = Some(status);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

struct Service {
    gateway: Gateway,
    auth: GrpcAuth,
}

impl Service {
    /// `Publish`, uncounted (see [`EventGateway::publish`]).
    async fn publish_inner(
        &self,
        mut request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        self.authorize(&request, Scope::Publish)?;
        // The body's bytes stay reserved in the budget until the event is answered.
        let _held = request.extensions_mut().remove::<edge::Held>();
        let _permit = self.gateway.admit().ok_or_else(|| {
            Status::resource_exhausted("too many requests in flight; retry shortly")
        })?;
        let request = request.into_inner();
        let key = (!request.idempotency_key.is_empty()).then_some(&*request.idempotency_key);
        if let Some(key) = key {
            crate::decode::check_idempotency_key(key)
                .map_err(|error| Status::invalid_argument(format!("idempotency_key: {error}")))?;
        }
        let ingested = match request.event {
            Some(publish_request::Event::RawJson(body)) => {
                self.gateway.ingest_json(body.into(), key).await
            }
            Some(publish_request::Event::Envelope(envelope)) => {
                self.gateway.ingest_envelope(envelope, key).await
            }
            None => {
                return Err(Status::invalid_argument(
                    "event: expected `envelope` or `raw_json`",
                ))
            }
        }
        .map_err(ingest_status)?;
        Ok(Response::new(PublishResponse {
            sequence: ingested.appended.sequence,
            duplicate: ingested.appended.duplicate,
            deviations: ingested.deviations.iter().map(Into::into).collect(),
            conflict: ingested.conflict,
        }))
    }

    /// Checks the bearer token in the request's metadata for `scope`.
    fn authorize<T>(&self, request: &Request<T>, scope: Scope) -> Result<(), Status> {
        if !self.auth.enabled() {
            return Ok(());
        }
        let headers = request.metadata().clone().into_headers();
        self.auth
            .check(&headers, scope)
            .map_err(|error| match error {
                AuthError::Unauthenticated => Status::unauthenticated(error.to_string()),
                AuthError::Forbidden => Status::permission_denied(error.to_string()),
            })
    }
}

/// Counts one `Publish` when dropped: with its result once answered, else as `cancelled` (tonic
/// drops a call whose deadline passed, and hyper one whose client reset it).
struct ObservedPublish<'a> {
    gateway: &'a Gateway,
    started: std::time::Instant,
    result: Option<&'static str>,
}

impl Drop for ObservedPublish<'_> {
    fn drop(&mut self) {
        self.gateway.metrics().observe_request(
            "publish",
            self.result.unwrap_or("cancelled"),
            self.started.elapsed(),
        );
    }
}

/// The `result` label of a `Publish` refused with `status`: the word of the HTTP status its code
/// stands for (a message too large is `too_large`, not `overloaded`).
fn publish_result(status: &Status) -> &'static str {
    use tonic::Code;
    let http = match status.code() {
        Code::InvalidArgument => 400,
        Code::Unauthenticated | Code::PermissionDenied => 401,
        Code::ResourceExhausted if status.message().contains("too large") => 413,
        Code::ResourceExhausted => 429,
        Code::Unavailable => 503,
        Code::DeadlineExceeded | Code::Cancelled => return "cancelled",
        _ => 500,
    };
    crate::metrics::result_word(http)
}

type EventStream = Pin<Box<dyn Stream<Item = Result<WireEvent, Status>> + Send>>;

#[tonic::async_trait]
impl EventGateway for Service {
    type SubscribeStream = EventStream;

    async fn subscribe(
        &self,
        request: Request<SubscribeRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.authorize(&request, Scope::Subscribe)?;
        let slot = request.extensions().get::<PermitSlot>().cloned();
        let evict = request
            .extensions()
            .get::<crate::server::Disconnect>()
            .map(crate::server::Disconnect::evict);
        let request = request.into_inner();
        let store = self.gateway.store_identity();
        let after = match request.start {
            Some(subscribe_request::Start::AfterSequence(sequence)) => Some(sequence),
            _ => None,
        };
        if !request.store.is_empty() && !self.gateway.holds_cursors_of(&request.store, after) {
            return Err(Status::failed_precondition(crate::gateway::other_store(
                &request.store,
                &store,
            )));
        }
        let filter = request.filter.map(filter_from).unwrap_or_default();
        let start = match request.start {
            None => Start::Live,
            Some(subscribe_request::Start::Beginning(())) => Start::Beginning,
            Some(subscribe_request::Start::AfterSequence(sequence)) => Start::After(sequence),
            Some(subscribe_request::Start::SinceTime(at)) => Start::Since(since_ms(&at)?),
        };
        let form = Form {
            raw_json: request.include_raw_json,
            references: request.include_references,
        };
        let subscription = self
            .gateway
            .subscribe_evictable(filter, start, evict)
            .await
            .map_err(subscribe_status)?;
        tracing::debug!(position = subscription.position(), "subscriber attached");
        // The stream is pulled by tonic as the client reads: a slow client holds at most the one
        // page its cursor has read; a client that leaves drops the subscription.
        let stream = SubscriptionStream {
            state: State::Ready(Box::new(subscription)),
            form,
            slot,
        };
        let mut response = Response::new(Box::pin(stream) as EventStream);
        if let Ok(value) = store.parse() {
            response.metadata_mut().insert(STORE, value);
        }
        Ok(response)
    }

    async fn publish(
        &self,
        request: Request<PublishRequest>,
    ) -> Result<Response<PublishResponse>, Status> {
        // Counted like HTTP ingest, under route="publish"; a call dropped before its answer
        // (its deadline passed, or its client cancelled it) as "cancelled".
        let mut observed = ObservedPublish {
            gateway: &self.gateway,
            started: std::time::Instant::now(),
            result: None,
        };
        let answer = self.publish_inner(request).await;
        observed.result = Some(match &answer {
            Ok(_) => "ok",
            Err(status) => publish_result(status),
        });
        answer
    }

    async fn get_event(
        &self,
        request: Request<GetEventRequest>,
    ) -> Result<Response<WireEvent>, Status> {
        self.authorize(&request, Scope::Subscribe)?;
        let request = request.into_inner();
        let found = match request.key {
            Some(get_event_request::Key::Sequence(sequence)) => {
                self.gateway.get_by_sequence(sequence).await
            }
            Some(get_event_request::Key::EventId(event_id)) => {
                self.gateway.get_by_event_id(event_id).await
            }
            None => {
                return Err(Status::invalid_argument(
                    "key: expected `sequence` or `event_id`",
                ))
            }
        }
        .map_err(|error| match error {
            // A lookup of an event retention removed (or of sequence 0) finds nothing.
            SubscribeError::Log(error @ LogError::Truncated { .. }) => {
                Status::not_found(error.to_string())
            }
            other => subscribe_status(other),
        })?;
        let event = found.ok_or_else(|| Status::not_found("no stored event with that key"))?;
        Ok(Response::new(WireEvent {
            event: event.into(),
            form: Form {
                raw_json: request.include_raw_json,
                references: request.include_references,
            },
        }))
    }
}

/// A subscription as the stream tonic pulls. Events already at hand (a page read from the log,
/// events waiting in the live tail) are taken synchronously with [`Subscription::try_next`];
/// only waiting goes through a future, which owns the subscription until it resolves. So a busy
/// stream costs no future, no `select!` and no move of the subscription per event.
struct SubscriptionStream {
    state: State,
    /// The optional fields this stream sends (the same shared bytes for every form).
    form: Form,
    /// Where each event's permit goes, to travel with the frame it is encoded into; without
    /// one (a call that did not pass the layer), it is given back once the event is encoded.
    slot: Option<PermitSlot>,
}

type Waiting = Pin<Box<dyn Future<Output = (Box<Subscription>, Next)> + Send>>;
type Next = Result<Arc<EncodedEvent>, SubscribeError>;

enum State {
    Ready(Box<Subscription>),
    Waiting(Waiting),
    Ended,
}

impl Stream for SubscriptionStream {
    type Item = Result<WireEvent, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            let next = match std::mem::replace(&mut this.state, State::Ended) {
                State::Ended => return Poll::Ready(None),
                State::Ready(mut subscription) => match subscription.try_next() {
                    Some(next) => (subscription, next),
                    None => {
                        this.state = State::Waiting(Box::pin(async move {
                            let next = subscription.next().await;
                            (subscription, next)
                        }));
                        continue;
                    }
                },
                State::Waiting(mut waiting) => match waiting.as_mut().poll(cx) {
                    Poll::Ready(done) => done,
                    Poll::Pending => {
                        this.state = State::Waiting(waiting);
                        return Poll::Pending;
                    }
                },
            };
            return Poll::Ready(Some(match next {
                (mut subscription, Ok(event)) => {
                    if let (Some(slot), Some(permit)) = (&this.slot, subscription.take_permit()) {
                        slot.put(permit);
                    }
                    this.state = State::Ready(subscription);
                    Ok(WireEvent {
                        event,
                        form: this.form,
                    })
                }
                // The stream ends after the error (state stays `Ended`).
                (_, Err(error)) => Err(subscribe_status(error)),
            }));
        }
    }
}

/// Milliseconds since the epoch of a valid `google.protobuf.Timestamp`: nanos in
/// [0, 999,999,999], seconds from 0001-01-01 to 9999-12-31 (its documented range).
fn since_ms(at: &prost_types::Timestamp) -> Result<i64, Status> {
    const MIN_SECONDS: i64 = -62_135_596_800;
    const MAX_SECONDS: i64 = 253_402_300_799;
    if !(0..1_000_000_000).contains(&at.nanos) {
        return Err(Status::invalid_argument(format!(
            "since_time.nanos: {} is not in [0, 999999999]",
            at.nanos
        )));
    }
    if !(MIN_SECONDS..=MAX_SECONDS).contains(&at.seconds) {
        return Err(Status::invalid_argument(format!(
            "since_time.seconds: {} is not between 0001-01-01 and 9999-12-31",
            at.seconds
        )));
    }
    Ok(at.seconds * 1000 + i64::from(at.nanos / 1_000_000))
}

fn filter_from(filter: crate::pb::gateway::v1::Filter) -> Filter {
    Filter {
        event_types: filter.event_types,
        project_ids: filter.project_ids,
        channel_ids: filter.channel_ids,
        chat_ids: filter.chat_ids,
        client_ids: filter.client_ids,
        user_ids: filter.user_ids,
        actors: filter.actors,
    }
}

fn decode_status(error: DecodeError) -> Status {
    let position = match (error.line, error.column) {
        (Some(line), Some(column)) => format!(" (line {line}, column {column})"),
        _ => String::new(),
    };
    Status::invalid_argument(format!("{}: {}{position}", error.path, error.message))
}

fn log_status(error: LogError) -> Status {
    match error {
        LogError::Truncated { .. } => Status::out_of_range(error.to_string()),
        LogError::Unavailable(_) | LogError::Closed => {
            outcome(Status::unavailable(error.to_string()), NOT_STORED)
        }
        // May be stored: retrying is safe for an event with an id or an idempotency key.
        LogError::Unknown(_) => outcome(Status::unavailable(error.to_string()), UNKNOWN),
        // Refused for good: the message says "too large" (clients tell it from "busy").
        LogError::TooLarge(_) => Status::resource_exhausted(error.to_string()),
        // Not retryable: reconnecting would meet the same damaged record.
        LogError::Damaged { .. } => Status::data_loss(error.to_string()),
        // Only at open; never retryable.
        LogError::NewerFormat { .. } | LogError::Misconfigured(_) => {
            Status::failed_precondition(error.to_string())
        }
    }
}

/// The header that names the store a subscription reads ([`crate::log::EventLog::identity`]):
/// what a client sends back as `SubscribeRequest.store` (SSE: `store=`) when it resumes.
pub const STORE: &str = "iqgw-store";

/// The metadata key that says of an UNAVAILABLE `Publish` whether the event may be stored:
/// [`NOT_STORED`] or [`UNKNOWN`] (the same words as HTTP's `"outcome"`).
pub const OUTCOME: &str = "iqgw-outcome";
/// The store did not take the event.
pub const NOT_STORED: &str = "not_stored";
/// The store's answer was lost: the event may be stored.
pub const UNKNOWN: &str = "unknown";

fn outcome(mut status: Status, outcome: &'static str) -> Status {
    status.metadata_mut().insert(
        OUTCOME,
        tonic::metadata::MetadataValue::from_static(outcome),
    );
    status
}

fn ingest_status(error: IngestError) -> Status {
    match error {
        IngestError::Invalid(error) => decode_status(error),
        IngestError::Unavailable(error) => log_status(error),
        IngestError::Busy(error) => Status::resource_exhausted(format!("{error} (--decode-queue)")),
    }
}

fn subscribe_status(error: SubscribeError) -> Status {
    match error {
        SubscribeError::Log(error) => log_status(error),
        SubscribeError::Corrupt(_) => Status::data_loss(error.to_string()),
        SubscribeError::ShuttingDown => Status::unavailable(error.to_string()),
        SubscribeError::TooMany(_) => Status::resource_exhausted(error.to_string()),
        // Retrying cannot help: the client must choose where to resume.
        SubscribeError::Ahead { .. } => Status::out_of_range(error.to_string()),
    }
}
