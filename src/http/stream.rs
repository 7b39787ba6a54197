//! `GET /v1/events:stream`: Server-Sent Events for consumers without gRPC (`curl -N`, browsers),
//! with the same filters and start positions as gRPC Subscribe; `Last-Event-ID` (= sequence)
//! resumes; `references=true` adds the entities each event points at. `GET /v1/stats`: the
//! figures the web console shows.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use serde_json::json;

use super::{shown, AppState, HttpError};
use crate::auth::Scope;
use crate::budget::{HeldBody, PermitSlot};
use crate::subscribe::{Filter, Start, SubscribeError};
use crate::wire::EncodedEvent;

/// Query parameters: `type`, `project`, `channel`, `chat`, `client`, `user`, `actor` (repeat them
/// or separate values with commas); at most one start position: `from=beginning`, `after=SEQ`,
/// `since=RFC3339` or `tail=N` (the last N events); `references=true|false`; `token` (when gRPC
/// tokens are configured and a header cannot be sent; read by [`crate::auth::query_token`]).
#[derive(Debug, Default)]
struct Params {
    filter: Filter,
    start: Option<StartParam>,
    /// Add the resolved references to each event's data.
    references: bool,
    /// The store the cursor (`after=`, `Last-Event-ID`) came from (the `iqgw-store` header).
    store: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum StartParam {
    Start(Start),
    Tail(u64),
}

/// Bytes of a parameter's name or value echoed in an error at most.
const ECHOED: usize = 40;

/// Milliseconds since the Unix epoch of `since=`: RFC 3339 from 0001-01-01 to 9999-12-31, the
/// range gRPC's `since_time` takes (before 1970 too), or the looser forms humantime reads
/// (`2026-12-07 10:00:00Z`).
fn since_ms(value: &str) -> Result<i64, String> {
    /// 0001-01-01T00:00:00Z, as gRPC's `since_time` allows.
    const MIN_SECONDS: i64 = -62_135_596_800;
    if let Ok(at) =
        time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339)
    {
        let seconds = at.unix_timestamp();
        if seconds < MIN_SECONDS {
            return Err("since: before 0001-01-01T00:00:00Z".to_owned());
        }
        return Ok(seconds * 1000 + i64::from(at.millisecond()));
    }
    let at = humantime::parse_rfc3339_weak(value).map_err(|e| format!("since: {e}"))?;
    Ok(at
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}

fn parse(query: Option<&str>) -> Result<Params, String> {
    let mut params = Params::default();
    let mut start_key: Option<String> = None;
    for (key, value) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let ids = || -> Result<Vec<i64>, String> {
            value
                .split(',')
                .filter(|v| !v.is_empty())
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("{key}: `{}` is not an integer id", shown(v, ECHOED)))
                })
                .collect()
        };
        let words = || value.split(',').map(str::to_owned).collect::<Vec<_>>();
        let start = match key.as_ref() {
            "type" => {
                params.filter.event_types.extend(words());
                None
            }
            "actor" => {
                params.filter.actors.extend(words());
                None
            }
            "project" => {
                params.filter.project_ids.extend(ids()?);
                None
            }
            "channel" => {
                params.filter.channel_ids.extend(ids()?);
                None
            }
            "chat" => {
                params.filter.chat_ids.extend(ids()?);
                None
            }
            "client" => {
                params.filter.client_ids.extend(ids()?);
                None
            }
            "user" => {
                params.filter.user_ids.extend(ids()?);
                None
            }
            "from" if value == "beginning" => Some(StartParam::Start(Start::Beginning)),
            "from" => {
                return Err(format!(
                    "from: `{}` is not a start position; expected `from=beginning` (or after=SEQ, \
                     since=RFC3339, tail=N)",
                    shown(&value, ECHOED)
                ))
            }
            "after" => Some(StartParam::Start(Start::After(value.parse().map_err(
                |_| format!("after: `{}` is not a sequence", shown(&value, ECHOED)),
            )?))),
            "since" => Some(StartParam::Start(Start::Since(since_ms(&value)?))),
            "tail" => Some(StartParam::Tail(value.parse().map_err(|_| {
                format!("tail: `{}` is not a count", shown(&value, ECHOED))
            })?)),
            "references" => {
                params.references = match value.as_ref() {
                    "true" => true,
                    "false" => false,
                    other => {
                        return Err(format!(
                            "references: expected `true` or `false`, got `{}`",
                            shown(other, ECHOED)
                        ))
                    }
                };
                None
            }
            "token" => None,
            // Empty: no store named, as gRPC's empty `store`.
            "store" => {
                params.store = (!value.is_empty()).then(|| value.into_owned());
                None
            }
            other => {
                return Err(format!(
                    "unknown parameter `{}`; expected type, project, channel, chat, client, user, \
                     actor, from, after, since, tail, references, store or token",
                    shown(other, ECHOED)
                ))
            }
        };
        if let Some(start) = start {
            if let Some(first) = &start_key {
                return Err(format!(
                    "`{first}` and `{key}` both give a start position; give at most one of from, \
                     after, since, tail"
                ));
            }
            start_key = Some(key.into_owned());
            params.start = Some(start);
        }
    }
    Ok(params)
}

/// The sequence in `Last-Event-ID` (sent by `EventSource` on reconnection), `None` when absent or
/// empty. It resumes after that sequence, whatever start position the URL gives (the browser
/// reconnects to the same URL).
fn last_event_id(headers: &HeaderMap) -> Result<Option<u64>, HttpError> {
    let Some(value) = headers.get("last-event-id") else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(value.as_bytes());
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(|_| {
        HttpError::BadQuery(format!(
            "Last-Event-ID: `{}` is not a sequence",
            shown(text, ECHOED)
        ))
    })
}

/// Checks the subscribe scope: `Authorization: Bearer` or the `token` query parameter.
fn authorize(state: &AppState, headers: &HeaderMap, query: Option<&str>) -> Result<(), HttpError> {
    let auth = &state.config.subscribe_auth;
    if !auth.enabled() {
        return Ok(());
    }
    let mut headers = headers.clone();
    if let Some(token) = query.and_then(crate::auth::query_token) {
        if let Ok(value) = format!("Bearer {token}").parse() {
            headers.insert(axum::http::header::AUTHORIZATION, value);
        }
    }
    auth.check(&headers, Scope::Subscribe)
        .map_err(HttpError::Auth)
}

pub(super) async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
    disconnect: Option<axum::Extension<crate::server::Disconnect>>,
) -> Response {
    let slot = PermitSlot::default();
    let evict = disconnect.map(|axum::Extension(disconnect)| disconnect.evict());
    match open(&state, &headers, query.as_deref(), slot.clone(), evict).await {
        // Each frame carries the budget's bytes of its event until hyper has written it.
        Ok(sse) => {
            let mut response = sse
                .into_response()
                .map(|body| axum::body::Body::new(HeldBody::new(body, slot)));
            if let Ok(store) = state.gateway.store_identity().parse() {
                response.headers_mut().insert(crate::grpc::STORE, store);
            }
            response
        }
        Err(error) => error.into_response(),
    }
}

async fn open(
    state: &AppState,
    headers: &HeaderMap,
    query: Option<&str>,
    slot: PermitSlot,
    evict: Option<crate::budget::Evict>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, HttpError> {
    authorize(state, headers, query)?;
    let params = parse(query).map_err(HttpError::BadQuery)?;
    let resume = last_event_id(headers)?;
    if let Some(theirs) = &params.store {
        let after = match (resume, params.start) {
            (Some(last), _) => Some(last),
            (None, Some(StartParam::Start(Start::After(after)))) => Some(after),
            _ => None,
        };
        if !state.gateway.holds_cursors_of(theirs, after) {
            let ours = state.gateway.store_identity();
            return Err(HttpError::OtherStore(crate::gateway::other_store(
                theirs, &ours,
            )));
        }
    }
    let start = match (resume, params.start) {
        (Some(last), _) => Start::After(last),
        (None, Some(StartParam::Start(start))) => start,
        (None, Some(StartParam::Tail(count))) => {
            Start::After(state.gateway.last_sequence().saturating_sub(count))
        }
        (None, None) => Start::Live,
    };
    let subscription = match state
        .gateway
        .subscribe_evictable(params.filter.clone(), start, evict.clone())
        .await
    {
        Ok(subscription) => subscription,
        // A tail longer than what is retained starts at the oldest retained event, with the
        // same filter. (An expired `Last-Event-ID` is not a tail: it gets the explicit answer.)
        Err(SubscribeError::Log(crate::log::LogError::Truncated { .. }))
            if resume.is_none() && matches!(params.start, Some(StartParam::Tail(_))) =>
        {
            state
                .gateway
                .subscribe_evictable(params.filter.clone(), Start::Beginning, evict)
                .await
                .map_err(HttpError::Subscribe)?
        }
        Err(error) => return Err(HttpError::Subscribe(error)),
    };
    let references = params.references;
    let stream = futures_util::stream::unfold(Some(subscription), move |state| {
        let slot = slot.clone();
        async move {
            let mut subscription = state?;
            match subscription.next().await {
                Ok(event) => {
                    if let Some(permit) = subscription.take_permit() {
                        slot.put(permit);
                    }
                    Some((Ok(sse_event(&event, references)), Some(subscription)))
                }
                // The stream ends with an explicit error event, never silently.
                Err(error) => Some((
                    Ok(SseEvent::default().event("error").data(error.to_string())),
                    None,
                )),
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// `id: <sequence>`, `data: {"sequence", "received_at_ms", "type", "chat_id", "actor", "event":
/// <the webhook body>}`; `"deviations": [{"path", "expected", "found", "outcome"}]` when the body
/// had any; `"references"` when asked for (resolved at ingest, from their stored encoding, in the
/// protobuf JSON mapping).
fn sse_event(event: &Arc<EncodedEvent>, references: bool) -> SseEvent {
    let data = SseData {
        sequence: event.sequence,
        received_at_ms: event.received_at_ms,
        event_type: &event.keys.event_type,
        chat_id: event.keys.chat_id,
        actor: &event.keys.actor,
        deviations: deviations_json(event),
        references: references.then(|| {
            crate::pb::to_json("iqchannels.gateway.v1.References", &event.references)
                .unwrap_or_else(|error| {
                    tracing::warn!(sequence = event.sequence, %error, "stored references do not decode");
                    serde_json::Value::Null
                })
        }),
        event: body(event),
    };
    let data = serde_json::to_string(&data).unwrap_or_default();
    SseEvent::default()
        .id(event.sequence.to_string())
        .data(data)
}

/// The JSON data of one SSE event. The body comes last: the console reads its exact text from
/// there (int64 ids stay exact).
#[derive(serde::Serialize)]
struct SseData<'a> {
    sequence: u64,
    received_at_ms: i64,
    #[serde(rename = "type")]
    event_type: &'a str,
    chat_id: Option<i64>,
    actor: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    deviations: Vec<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    references: Option<serde_json::Value>,
    event: Box<serde_json::value::RawValue>,
}

/// The webhook body as it was received when it is JSON text (byte for byte: numbers beyond a
/// double and lone surrogates in strings included), else the protobuf JSON mapping of the typed
/// envelope with the wire names (a typed gRPC Publish has no original body).
fn body(event: &EncodedEvent) -> Box<serde_json::value::RawValue> {
    // On one line (an SSE data line cannot carry a carriage return), numbers untouched.
    let raw = std::str::from_utf8(&event.raw_json)
        .ok()
        .and_then(crate::decode::compact_json)
        .and_then(|text| serde_json::value::RawValue::from_string(text).ok());
    raw.or_else(|| {
        crate::pb::to_json("iqchannels.webhook.v1.Envelope", &event.envelope)
            .ok()
            .and_then(|value| serde_json::value::to_raw_value(&value).ok())
    })
    .or_else(|| serde_json::value::RawValue::from_string("null".to_owned()).ok())
    .unwrap_or_default()
}

/// The event's deviations as JSON objects, their outcome in lower case.
fn deviations_json(event: &EncodedEvent) -> Vec<serde_json::Value> {
    event
        .deviations()
        .iter()
        .map(|deviation| {
            let outcome = deviation.outcome().as_str_name();
            json!({
                "path": deviation.path,
                "expected": deviation.expected,
                "found": deviation.found,
                "outcome": outcome
                    .strip_prefix("DEVIATION_OUTCOME_")
                    .unwrap_or(outcome)
                    .to_ascii_lowercase(),
            })
        })
        .collect()
}

/// `GET /v1/stats`: totals, the head of the log and every subscriber's lag.
pub(super) async fn stats(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(error) = authorize(&state, &headers, query.as_deref()) {
        return error.into_response();
    }
    Json(state.gateway.stats()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_map_to_filter_and_start() {
        let params = parse(Some(
            "type=message_created,chat_closed&chat=21&chat=22&actor=user&after=41",
        ))
        .unwrap();
        assert_eq!(
            params.filter.event_types,
            vec!["message_created", "chat_closed"]
        );
        assert_eq!(params.filter.chat_ids, vec![21, 22]);
        assert_eq!(params.filter.actors, vec!["user"]);
        assert!(matches!(
            params.start,
            Some(StartParam::Start(Start::After(41)))
        ));
        assert!(matches!(
            parse(Some("tail=5")).unwrap().start,
            Some(StartParam::Tail(5))
        ));
        assert!(parse(Some("chat=abc")).is_err());
        assert!(parse(Some("colour=red")).is_err());
        assert!(parse(Some("references=true")).unwrap().references);
        assert!(!parse(Some("references=false")).unwrap().references);
        assert!(!parse(None).unwrap().references);
        let error = parse(Some("references=yes")).unwrap_err();
        assert!(error.starts_with("references: "), "{error}");
        assert!(parse(Some("from=beginning&tail=2")).is_err());
        assert!(parse(Some("token=abc&from=beginning")).is_ok());
        let long = format!("{}=1", "k".repeat(8192));
        assert!(parse(Some(&long)).unwrap_err().len() < 200);
    }
}
