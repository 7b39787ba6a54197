//! What every gRPC request meets before tonic reads its body, and what every gRPC answer meets
//! on its way out:
//! - `EventGateway` calls: the token is checked on the headers (no body is read for a caller
//!   without one), and each request message reserves its declared length in the shared
//!   [`BodyBudget`] as soon as its 5-byte gRPC header arrives (RESOURCE_EXHAUSTED at once when it
//!   does not fit, or when it is over `--max-body-bytes`). The reservation travels with the
//!   request ([`Held`]), so the handler keeps it until it has answered. A message that has not
//!   arrived whole within `--request-timeout` of the call's start is refused
//!   (DEADLINE_EXCEEDED), and its reservation given back: a client that declares a large
//!   message and stalls cannot hold the budget.
//! - `grpc.health.v1` and reflection calls (open to anyone): at most
//!   `--max-health-reflection-calls` open at once (watches and reflection streams included;
//!   more get RESOURCE_EXHAUSTED), each request message at most
//!   `--max-health-reflection-message-bytes`, refused with an error naming that flag.
//! - Every answer: a `grpc-message` is cut so that a client cannot make the server repeat its
//!   input at length (a quoted piece to [`MAX_ERROR_TEXT`] bytes, the whole to
//!   [`MAX_STATUS_TEXT`]): grpc-core clients refuse metadata over 16 KiB and would see
//!   RESOURCE_EXHAUSTED instead of the real code.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::{Code, Status};

use crate::auth::{AuthError, GrpcAuth, Scope};
use crate::decode::MAX_ERROR_TEXT;
use crate::gateway::Gateway;
use crate::request_budget::{BodyBudget, Reservation};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Bytes of a `grpc-message` sent at most (after a quoted piece of it was cut to
/// [`MAX_ERROR_TEXT`]): the gateway's own messages, each client-given piece in them already cut,
/// stay below it.
pub const MAX_STATUS_TEXT: usize = 4 * MAX_ERROR_TEXT;

/// The default `--max-health-reflection-message-bytes`.
pub const DEFAULT_HEALTH_REFLECTION_MESSAGE_BYTES: usize = 4096;

/// The default `--max-health-reflection-calls`.
pub const DEFAULT_HEALTH_REFLECTION_CALLS: usize = 1024;

/// The settings and shared state of the gRPC edge.
pub struct Edge {
    /// Tokens for `EventGateway`.
    pub auth: GrpcAuth,
    /// The byte budget shared with the HTTP edge.
    pub budget: BodyBudget,
    /// `--max-body-bytes`: the largest `EventGateway` request message.
    pub max_message_bytes: usize,
    /// `--request-timeout`: an `EventGateway` request message not whole by then is refused.
    pub message_timeout: std::time::Duration,
    /// `--max-health-reflection-message-bytes`.
    pub health_reflection_message_bytes: usize,
    /// `--max-health-reflection-calls`.
    pub health_reflection_calls: usize,
    /// Slots for open health and reflection calls.
    pub calls: Arc<Semaphore>,
    /// For its metrics.
    pub gateway: Gateway,
}

/// The reservation of a request's body in the budget, found in the request's extensions: a
/// handler that keeps the decoded message past the body takes it out first and holds it until
/// it has answered.
#[derive(Clone, Debug)]
pub struct Held {
    _reservation: Arc<Reservation>,
}

/// Which limits a request's path calls for.
enum Kind {
    /// `iqchannels.gateway.v1.EventGateway`, needing this scope.
    Gateway(Scope),
    /// `health` or `reflection`.
    Open(&'static str),
    /// Anything else (tonic answers UNIMPLEMENTED without reading the body).
    Other,
}

fn kind(path: &str) -> Kind {
    let Some((service, method)) = path.strip_prefix('/').and_then(|p| p.split_once('/')) else {
        return Kind::Other;
    };
    match service {
        crate::pb::gateway::v1::event_gateway_server::SERVICE_NAME => {
            Kind::Gateway(if method == "Publish" {
                Scope::Publish
            } else {
                Scope::Subscribe
            })
        }
        "grpc.health.v1.Health" => Kind::Open("health"),
        "grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection" => {
            Kind::Open("reflection")
        }
        _ => Kind::Other,
    }
}

/// A refusal made while reading a request's body; the answer's status becomes this one, whatever
/// the service made of the body error (reflection ends its stream with OK).
type Refusal = Arc<OnceLock<(Code, String)>>;

/// The middleware (`axum::middleware::from_fn_with_state`) around tonic's routes.
pub async fn edge(State(edge): State<Arc<Edge>>, request: Request, next: Next) -> Response {
    let refusal = Refusal::default();
    let (mut parts, body) = request.into_parts();
    let mut call = None;
    let body = match kind(parts.uri.path()) {
        Kind::Gateway(scope) => {
            if let Err(error) = edge.auth.check(&parts.headers, scope) {
                return answer(match error {
                    AuthError::Unauthenticated => Status::unauthenticated(error.to_string()),
                    AuthError::Forbidden => Status::permission_denied(error.to_string()),
                });
            }
            let reservation = Arc::new(edge.budget.reservation());
            parts.extensions.insert(Held {
                _reservation: reservation.clone(),
            });
            Body::new(Metered {
                inner: body,
                limit: edge.max_message_bytes,
                flag: Flag::Gateway,
                reservation: Some(reservation),
                refusal: refusal.clone(),
                header: [0; 5],
                have: 0,
                skip: 0,
                deadline: Some((
                    Box::pin(tokio::time::sleep(edge.message_timeout)),
                    edge.message_timeout,
                )),
            })
        }
        Kind::Open(service) => {
            let Ok(permit) = edge.calls.clone().try_acquire_owned() else {
                edge.gateway
                    .metrics()
                    .health_reflection_call(service, false);
                return answer(Status::resource_exhausted(format!(
                    "too many health and reflection calls open at once ({} at most, \
                     --max-health-reflection-calls); retry shortly",
                    edge.health_reflection_calls
                )));
            };
            edge.gateway.metrics().health_reflection_call(service, true);
            call = Some(Call {
                _permit: permit,
                gateway: edge.gateway.clone(),
            });
            Body::new(Metered {
                inner: body,
                limit: edge.health_reflection_message_bytes,
                flag: Flag::HealthReflection,
                reservation: None,
                refusal: refusal.clone(),
                header: [0; 5],
                have: 0,
                skip: 0,
                deadline: None,
            })
        }
        Kind::Other => body,
    };
    let response = next.run(Request::from_parts(parts, body)).await;
    let (mut parts, body) = response.into_parts();
    settle(&mut parts.headers, &refusal);
    Response::from_parts(
        parts,
        Body::new(Answer {
            inner: body,
            refusal,
            _call: call,
        }),
    )
}

/// A trailers-only answer with `status`.
fn answer(status: Status) -> Response {
    status.into_http::<Body>()
}

/// An admitted health or reflection call: its slot, given back (and counted) when its answer
/// has been sent or dropped.
struct Call {
    _permit: OwnedSemaphorePermit,
    gateway: Gateway,
}

impl Drop for Call {
    fn drop(&mut self) {
        self.gateway.metrics().health_reflection_call_ended();
    }
}

/// Which flag bounds a request message.
#[derive(Clone, Copy)]
enum Flag {
    Gateway,
    HealthReflection,
}

/// A request body read through: each gRPC message's 5-byte header is looked at as it passes, and
/// the message refused before its bytes arrive when it is over the limit or, for `EventGateway`,
/// when the budget cannot hold it.
struct Metered {
    inner: Body,
    limit: usize,
    flag: Flag,
    reservation: Option<Arc<Reservation>>,
    refusal: Refusal,
    /// The current message header, `have` bytes of it so far.
    header: [u8; 5],
    have: usize,
    /// Bytes of the current message still to pass.
    skip: usize,
    /// When a message still arriving is refused (`--request-timeout`), and that timeout.
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, std::time::Duration)>,
}

impl Metered {
    /// Follows the framing through `data`; the refusal of a message, if one is refused.
    fn scan(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            let n = (5 - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < 5 {
                break;
            }
            self.have = 0;
            let [_, a, b, c, d] = self.header;
            let length = u32::from_be_bytes([a, b, c, d]) as usize;
            if length > self.limit {
                return Err(Status::resource_exhausted(match self.flag {
                    Flag::Gateway => format!(
                        "request message too large: found {length} bytes, the limit is: {} bytes \
                         (--max-body-bytes)",
                        self.limit
                    ),
                    Flag::HealthReflection => format!(
                        "request message too large: found {length} bytes, the limit for health \
                         and reflection requests is: {} bytes \
                         (--max-health-reflection-message-bytes)",
                        self.limit
                    ),
                }));
            }
            if let Some(reservation) = &self.reservation {
                reservation
                    .grow(length)
                    .map_err(|exhausted| Status::resource_exhausted(exhausted.to_string()))?;
            }
            self.skip = length;
        }
        Ok(())
    }
}

impl http_body::Body for Metered {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some((code, message)) = this.refusal.get() {
            return Poll::Ready(Some(Err(Box::new(Status::new(*code, message.clone())))));
        }
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if polled.is_pending() {
            // Waiting for the client: past the deadline, a message it started (or has yet to
            // start) is refused and its reservation given back with the body.
            if let Some((deadline, timeout)) = this.deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    let status = Status::deadline_exceeded(format!(
                        "the request message did not arrive within {} (--request-timeout)",
                        humantime::format_duration(*timeout)
                    ));
                    let _ = this
                        .refusal
                        .set((status.code(), status.message().to_owned()));
                    this.reservation = None;
                    return Poll::Ready(Some(Err(Box::new(status))));
                }
            }
        }
        match ready!(polled) {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    if let Err(status) = this.scan(data) {
                        let _ = this
                            .refusal
                            .set((status.code(), status.message().to_owned()));
                        return Poll::Ready(Some(Err(Box::new(status))));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(error)) => Poll::Ready(Some(Err(error.into()))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.refusal.get().is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An answer's body: its trailers are [`settle`]d; holds the call's slot until it is dropped.
struct Answer {
    inner: Body,
    refusal: Refusal,
    _call: Option<Call>,
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = self.get_mut();
        let polled = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        Poll::Ready(polled.map(|frame| {
            frame.map(|frame| match frame.into_trailers() {
                Ok(mut trailers) => {
                    settle(&mut trailers, &this.refusal);
                    Frame::trailers(trailers)
                }
                Err(frame) => frame,
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Makes the status in `headers` (a trailers-only answer's headers, or trailers) the refusal, if
/// the request was refused; else cuts its message as [`cut_status_text`] does.
fn settle(headers: &mut HeaderMap, refusal: &Refusal) {
    if !headers.contains_key("grpc-status") {
        return;
    }
    if let Some((code, message)) = refusal.get() {
        for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
            headers.remove(name);
        }
        set_status(headers, *code, message.clone());
        return;
    }
    let Some(message) = headers.get("grpc-message") else {
        return;
    };
    // Percent-encoding never makes a message shorter: a short header needs no look.
    if message.len() <= MAX_ERROR_TEXT {
        return;
    }
    let text = percent_decode(message.as_bytes());
    let cut = cut_status_text(&text);
    if cut == text {
        return;
    }
    let code = headers
        .get("grpc-status")
        .map_or(Code::Unknown, |value| Code::from_bytes(value.as_bytes()));
    headers.remove("grpc-message");
    let mut encoded = HeaderMap::new();
    if Status::new(code, cut).add_header(&mut encoded).is_ok() {
        if let Some(value) = encoded.remove("grpc-message") {
            headers.insert("grpc-message", value);
        }
    }
}

fn set_status(headers: &mut HeaderMap, code: Code, message: String) {
    if Status::new(code, message).add_header(headers).is_err() {
        headers.insert("grpc-status", HeaderValue::from(code as i32));
    }
}

/// A status message as the gateway sends it: a quoted piece (between the first and the last `'`,
/// where tonic's services put what the client named: reflection's "symbol '...' not found") cut
/// to [`MAX_ERROR_TEXT`] bytes, then the whole to [`MAX_STATUS_TEXT`]; `…` marks each cut.
pub fn cut_status_text(text: &str) -> String {
    // Quoted with `'` (reflection's symbols) or a backtick (tonic's `grpc-encoding` refusal).
    let open = text.find(['\'', '`']);
    let close = open.and_then(|open| text.rfind(&text[open..=open]));
    let mut out = match (open, close) {
        (Some(open), Some(close)) if close > open + 1 + MAX_ERROR_TEXT => {
            let mut quoted = text[open + 1..close].to_owned();
            crate::decode::clip(&mut quoted);
            format!("{}{quoted}{}", &text[..=open], &text[close..])
        }
        _ => text.to_owned(),
    };
    crate::decode::clip_to(&mut out, MAX_STATUS_TEXT);
    out
}

/// The text of a percent-encoded `grpc-message` (invalid UTF-8 replaced).
fn percent_decode(encoded: &[u8]) -> String {
    percent_encoding::percent_decode(encoded)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grpc_message_is_percent_decoded_and_bad_escapes_kept() {
        assert_eq!(
            percent_decode(b"symbol 'a%25b' %E2%80%A6"),
            "symbol 'a%b' …"
        );
        assert_eq!(percent_decode(b"50%zz %"), "50%zz %");
        assert_eq!(percent_decode(b"%FF"), "\u{FFFD}");
    }

    #[test]
    fn a_quoted_name_is_cut_and_the_rest_kept() {
        let symbol = "x".repeat(1 << 20);
        let cut = cut_status_text(&format!("symbol '{symbol}' not found"));
        assert!(cut.starts_with("symbol 'xxx"), "{cut}");
        assert!(cut.ends_with("…' not found"), "{cut}");
        assert_eq!(
            cut.len(),
            "symbol '' not found".len() + MAX_ERROR_TEXT + '…'.len_utf8()
        );
        let short = "symbol 'iqchannels.Nope' not found";
        assert_eq!(cut_status_text(short), short);
        let long = "é".repeat(MAX_STATUS_TEXT);
        let cut = cut_status_text(&long);
        assert!(cut.len() <= MAX_STATUS_TEXT + '…'.len_utf8() && cut.ends_with('…'));
    }

    #[test]
    fn percent_encoded_messages_are_read_back() {
        let mut headers = HeaderMap::new();
        let text = "symbol 'é%ü\n' not found";
        Status::not_found(text)
            .add_header(&mut headers)
            .expect("encodes");
        let encoded = headers.get("grpc-message").expect("set").as_bytes();
        assert_eq!(percent_decode(encoded), text);
        assert_eq!(percent_decode(b"100%"), "100%");
    }

    #[test]
    fn framing_is_followed_across_any_split_of_the_body() {
        let budget = BodyBudget::unmetered(1000);
        let mut body = Vec::new();
        for length in [3u32, 0, 700, 20] {
            body.push(0);
            body.extend_from_slice(&length.to_be_bytes());
            body.extend(std::iter::repeat_n(7u8, length as usize));
        }
        for split in [1, 2, 3, 5, 7, 64, body.len()] {
            let reservation = Arc::new(budget.reservation());
            let mut metered = Metered {
                inner: Body::empty(),
                limit: 800,
                flag: Flag::Gateway,
                reservation: Some(reservation.clone()),
                refusal: Refusal::default(),
                header: [0; 5],
                have: 0,
                skip: 0,
                deadline: None,
            };
            for chunk in body.chunks(split) {
                metered.scan(chunk).expect("fits");
            }
            assert_eq!(reservation.bytes(), 723, "split {split}");
        }
        let held = budget.reservation();
        held.grow(500).expect("fits");
        let mut metered = Metered {
            inner: Body::empty(),
            limit: 800,
            flag: Flag::Gateway,
            reservation: Some(Arc::new(budget.reservation())),
            refusal: Refusal::default(),
            header: [0; 5],
            have: 0,
            skip: 0,
            deadline: None,
        };
        let refused = metered
            .scan(&body)
            .expect_err("700 bytes do not fit beside 500");
        assert_eq!(refused.code(), Code::ResourceExhausted);
        assert!(refused.message().contains("--request-body-memory"));
        let mut too_large = Metered {
            limit: 10,
            flag: Flag::HealthReflection,
            reservation: None,
            ..metered
        };
        let refused = too_large
            .scan(&[0, 0, 0, 0, 11])
            .expect_err("over the limit");
        assert!(
            refused
                .message()
                .contains("--max-health-reflection-message-bytes"),
            "{}",
            refused.message()
        );
    }
}
