//! `migrate-stream`: copies a stream of the layout of releases before the bounded one (a subject
//! per event) into a new stream of today's layout, in order, resumable.
//!
//! - Each record is copied as it is (payload, receive time, `Nats-Msg-Id`), under its new
//!   subject, with an `Iqgw-Migrated-From` header naming its sequence in the old stream.
//! - Each publish expects the target's last sequence to be the one before it
//!   (`Nats-Expected-Last-Sequence`): the target is always a copy of a prefix of the old stream,
//!   without a hole, and a gateway writing to it meanwhile stops the copy.
//! - Run again after an interruption, it goes on after the last record copied (its header).
//! - Sequences change (a hole in the old stream is closed up), so the new stream is another store:
//!   cursors of the old one are refused by it.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures_util::{StreamExt, TryStreamExt};

use super::config::{self, NatsConfig};
use super::{connect_at_start, unavailable, RECEIVED_AT};
use crate::log::LogError;

/// The header naming a copied record's sequence in the old stream.
const MIGRATED_FROM: &str = "Iqgw-Migrated-From";
/// The header naming the old stream a copy comes from ([`super::Origin`]: its Raft group or its
/// creation time), so that a run never goes on from a stream deleted and created again since.
const MIGRATED_ORIGIN: &str = "Iqgw-Migrated-Origin";
/// Sequences of the old stream read at once.
const PAGE: u64 = 1024;

/// What a migration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    /// Records copied by this run.
    pub copied: u64,
    /// The old stream's sequence this run went on after (0: from the start).
    pub resumed_after: u64,
    /// The old stream's last sequence, copied.
    pub source_last: u64,
    /// The new stream's last sequence.
    pub target_last: u64,
}

/// Copies the stream `config.stream` (the old layout, refused otherwise) into the stream `to`
/// (created with `config`'s settings if missing). `progress` is told the records copied so far,
/// now and then.
pub async fn migrate(
    config: &NatsConfig,
    to: &str,
    progress: impl Fn(u64),
) -> Result<Migration, LogError> {
    if to == config.stream {
        return Err(LogError::Misconfigured(
            "--to must name another stream than --nats-stream".into(),
        ));
    }
    let servers = config::parse_servers(&config.url).map_err(LogError::Misconfigured)?;
    config.check_files().map_err(LogError::Misconfigured)?;
    let client = connect_at_start(config, servers).await?;
    let mut context = jetstream::new(client.clone());
    context.set_timeout(config.ack_timeout.max(Duration::from_secs(5)));
    let prefix = &config.subject_prefix;

    let mut source = context.get_stream(&config.stream).await.map_err(|error| {
        LogError::Misconfigured(format!("cannot read stream {}: {error}", config.stream))
    })?;
    let source_info = source.info().await.map_err(unavailable)?.clone();
    let source_config = source_info.config.clone();
    let origin = super::Origin::of(&source_info).to_string();
    if !config::is_old_layout(&source_config, prefix) {
        return Err(LogError::Misconfigured(format!(
            "stream {} is not of the earlier layout (subjects [\"{prefix}.*\"], one message per \
             subject; it has {:?}): nothing to migrate. Is --nats-subject-prefix the one its \
             gateways used?",
            config.stream, source_config.subjects
        )));
    }

    let target_config = NatsConfig {
        stream: to.to_owned(),
        ..config.clone()
    };
    let wanted = target_config.stream_config();
    let mut target = match context.get_stream(to).await {
        Ok(stream) => stream,
        Err(error) if super::is_stream_not_found(&error.kind()) => context
            .create_stream(wanted.clone())
            .await
            .map_err(|error| unavailable(format!("cannot create stream {to}: {error}")))?,
        Err(error) => return Err(unavailable(format!("cannot read stream {to}: {error}"))),
    };
    let target_info = target.info().await.map_err(unavailable)?.clone();
    let problems = config::incompatibilities(&target_info.config, &wanted);
    if !problems.is_empty() {
        return Err(LogError::Misconfigured(format!(
            "stream {to} is not usable by the gateway: {}",
            problems.join("; ")
        )));
    }
    let mut target_last = target_info.state.last_sequence;
    let resumed_after = if target_last == 0 {
        0
    } else {
        copied_from(&target, prefix, to, &config.stream, &origin).await?
    };

    let mut copied = 0;
    let mut next = resumed_after + 1;
    loop {
        let source_last = source
            .info()
            .await
            .map_err(unavailable)?
            .state
            .last_sequence;
        if next > source_last {
            return Ok(Migration {
                copied,
                resumed_after,
                source_last,
                target_last,
            });
        }
        let end = source_last.min(next + PAGE - 1);
        let page: Vec<Option<jetstream::message::StreamMessage>> =
            futures_util::stream::iter(next..=end)
                .map(|sequence| {
                    let source = source.clone();
                    async move {
                        match source.direct_get(sequence).await {
                            Ok(message) => Ok(Some(message)),
                            Err(error) if error.kind() == stream::DirectGetErrorKind::NotFound => {
                                Ok(None)
                            }
                            Err(error) => Err(unavailable(error)),
                        }
                    }
                })
                .buffered(32)
                .try_collect()
                .await?;
        let mut acks = Vec::with_capacity(page.len());
        for message in page.into_iter().flatten() {
            let publish = copy_of(&message, prefix, &origin, target_last + acks.len() as u64)?;
            let ack = context
                .send_publish(publish.0, publish.1)
                .await
                .map_err(unavailable)?;
            acks.push((message.sequence, ack));
        }
        for (sequence, ack) in acks {
            let ack = ack.await.map_err(|error| {
                unavailable(format!(
                    "copying sequence {sequence} of {} failed ({error}); {copied} records were \
                     copied by this run. Run the command again to go on: it checks the copy \
                     first (is a gateway writing to {to}? Stop it first)",
                    config.stream
                ))
            })?;
            if ack.duplicate {
                return Err(LogError::Misconfigured(format!(
                    "sequence {sequence} of {} is already in {to} (its Nats-Msg-Id was seen \
                     within the duplicate window): another migrate-stream run into {to}, or a \
                     gateway, stored it first. If another run is copying, let it finish (and \
                     run this one again after it: it checks the copy); otherwise stop the \
                     gateways, delete {to} and migrate again",
                    config.stream
                )));
            }
            target_last = ack.sequence;
            copied += 1;
        }
        progress(copied);
        next = end + 1;
    }
}

/// The message to publish for `message` of the old stream, expecting the new stream's last
/// sequence to be `target_last`.
fn copy_of(
    message: &jetstream::message::StreamMessage,
    prefix: &str,
    origin: &str,
    target_last: u64,
) -> Result<(String, jetstream::message::PublishMessage), LogError> {
    let token = message
        .subject
        .as_str()
        .strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('.'))
        .ok_or_else(|| {
            LogError::Misconfigured(format!(
                "sequence {} of the old stream has subject {}, not under {prefix}",
                message.sequence, message.subject
            ))
        })?;
    let received_at = message
        .headers
        .get(RECEIVED_AT)
        .map(|value| value.as_str().to_owned())
        .unwrap_or_else(|| (message.time.unix_timestamp_nanos() / 1_000_000).to_string());
    let mut publish = jetstream::message::PublishMessage::build()
        .payload(message.payload.clone())
        .header(RECEIVED_AT, received_at.as_str())
        .header(MIGRATED_FROM, message.sequence.to_string().as_str())
        .header(MIGRATED_ORIGIN, origin)
        .expected_last_sequence(target_last);
    // The old layout: `<prefix>.<id>` (negative: a transitive event's idempotency key), or
    // `<prefix>.t<nuid>` for a transitive event without one.
    let subject = match token.parse::<i64>() {
        Ok(id) => {
            publish = publish.message_id(id.to_string());
            if id > 0 {
                config::event_subject(prefix, id)
            } else {
                config::transitive_subject(prefix)
            }
        }
        Err(_) => config::transitive_subject(prefix),
    };
    Ok((subject, publish))
}

/// The old stream's sequence of the last record copied into `target` (its header), once the
/// target's tail is checked to be copies only.
///
/// Why the tail: every publish expects the target's last sequence, so a foreign event (a gateway
/// writing to the target) makes the copy right after it fail, and the run stops. But the copies
/// already in flight behind that one expect a last sequence the foreign event has just made true:
/// they are stored, one copy short. So a foreign event, and the hole it leaves, is always among
/// the last [`PAGE`] records of a run that failed; records written after a run are at the tail.
/// Each of the last `PAGE + 1` records must be a copy, in increasing order of their old
/// sequences, without a hole.
async fn copied_from(
    target: &stream::Stream,
    prefix: &str,
    to: &str,
    source_name: &str,
    origin: &str,
) -> Result<u64, LogError> {
    let refuse = |why: String| {
        LogError::Misconfigured(format!(
            "stream {to} is not a faithful copy: {why}. It may hold events a gateway wrote to it \
             during the copy; stop every gateway on it, delete it (`nats stream rm {to}`) and \
             migrate again"
        ))
    };
    let last = target
        .get_last_raw_message_by_subject(&format!("{prefix}.*.*"))
        .await
        .map_err(|error| refuse(format!("its last record cannot be read ({error})")))?;
    let first = target
        .get_info()
        .await
        .map_err(unavailable)?
        .state
        .first_sequence;
    let mut later: Option<(u64, u64)> = None;
    let from = last.sequence.saturating_sub(PAGE).max(first.max(1));
    for sequence in (from..=last.sequence).rev() {
        let message = match target.get_raw_message(sequence).await {
            Ok(message) => message,
            Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                return Err(refuse(format!("sequence {sequence} is missing")));
            }
            Err(error) => return Err(unavailable(error)),
        };
        let old = message
            .headers
            .get(MIGRATED_FROM)
            .and_then(|value| value.as_str().parse::<u64>().ok())
            .ok_or_else(|| {
                refuse(format!(
                    "sequence {sequence} has no {MIGRATED_FROM} header (not a copy)"
                ))
            })?;
        if let Some((later_sequence, later_old)) = later {
            if old >= later_old {
                return Err(refuse(format!(
                    "sequence {sequence} is a copy of {old}, not of one before {later_old} \
                     (the copy at {later_sequence})"
                )));
            }
        }
        later = Some((sequence, old));
    }
    later
        .map(|_| ())
        .ok_or_else(|| refuse("nothing could be read".into()))?;
    // The same old stream, not one deleted and created again since (its sequences name other
    // events).
    let copied_origin = last
        .headers
        .get(MIGRATED_ORIGIN)
        .map(|value| value.as_str().to_owned());
    if copied_origin.as_deref() != Some(origin) {
        return Err(LogError::Misconfigured(format!(
            "stream {to} was copied from another stream {source_name} ({}), not the one there now \
             ({origin}): it was deleted and created again since. Migrate into a new, empty \
             stream",
            copied_origin.as_deref().unwrap_or("unknown")
        )));
    }
    last.headers
        .get(MIGRATED_FROM)
        .and_then(|value| value.as_str().parse::<u64>().ok())
        .ok_or_else(|| refuse(format!("its last record has no {MIGRATED_FROM} header")))
}
