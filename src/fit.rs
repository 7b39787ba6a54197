//! The typed form bounded at ingest: every stored event fits one gRPC message.
//!
//! A subscriber asking for everything (`include_raw_json`, `include_references`) is sent the
//! typed envelope, the body, the references (copies of `Rels` entries) and the deviations in one
//! `Event`. An opaque value (`google.protobuf.Value`: `Options`, `Permissions`, `Fields`, ...)
//! costs up to 11 bytes per JSON `0,`, so a body within `--max-body-bytes` could make an event
//! over the 4 MiB that stock gRPC clients accept. Past `--max-event-bytes` in that largest form,
//! the largest opaque values are cut to `null` here, each a `cut` deviation (the raw JSON keeps
//! them), until the event fits; an event that still does not fit is refused.

use prost::Message;
use prost_reflect::{DynamicMessage, FieldDescriptor, MessageDescriptor, ReflectMessage, Value};

use crate::decode::{Deviation, Outcome};
use crate::pb::webhook::v1::Envelope;

/// Default `--max-event-bytes`: the message size stock gRPC clients accept (grpcurl, Python,
/// Go, tonic: 4 MiB).
pub const DEFAULT_MAX_EVENT_BYTES: usize = 4 << 20;

/// Opaque values cut reported one by one at most; the rest are counted in one more deviation.
const CUTS_REPORTED: usize = 10;

/// The encoded length of an `Event` in its largest form: its head (sequence, time: at most
/// `wire::HEAD_MAX` bytes), the envelope, the deviations (already `Event` field records), the
/// raw JSON (field 4) and the references (field 6).
pub fn largest_len(
    envelope: usize,
    raw_json: usize,
    deviations: usize,
    references: usize,
) -> usize {
    let field = |len: usize| 1 + prost::encoding::encoded_len_varint(len as u64) + len;
    crate::wire::HEAD_MAX
        + envelope
        + deviations
        + if raw_json > 0 { field(raw_json) } else { 0 }
        + field(references)
}

/// The event cannot be made to fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the event is too large: {size} bytes as a subscriber receives it (typed form, body, references, \
     deviations), over --max-event-bytes ({max}), even with every opaque value cut: send a \
     smaller body, or raise --max-event-bytes (and the subscribers' message limit)"
)]
pub struct TooLarge {
    /// Its size with every opaque value cut.
    pub size: usize,
    /// `--max-event-bytes`.
    pub max: usize,
}

/// The largest form of the event `envelope` with a body of `raw_len` bytes and `deviations`.
fn size(envelope: &Envelope, raw_len: usize, deviations: &[Deviation]) -> usize {
    let indices = crate::decode::indices(envelope);
    largest_len(
        envelope.encoded_len(),
        raw_len,
        crate::wire::encode_deviations(deviations).len(),
        crate::decode::references_len(envelope, &indices),
    )
}

/// `envelope`, with its largest opaque values cut to `null` (each added to `deviations`) as far
/// as needed for the event to fit `max` bytes in its largest form, and whether any was cut.
/// Unchanged (no work beyond measuring it) when it fits already.
pub fn fit(
    envelope: Envelope,
    raw_len: usize,
    deviations: &mut Vec<Deviation>,
    max: usize,
) -> Result<(Envelope, bool), TooLarge> {
    let mut envelope = envelope;
    let mut cut = 0usize;
    let mut reported = 0usize;
    loop {
        let total = size(&envelope, raw_len, deviations);
        if total <= max {
            break;
        }
        let Some(mut message) = dynamic(&envelope) else {
            return Err(TooLarge { size: total, max });
        };
        let mut candidates = Vec::new();
        let mut path = String::new();
        collect(&message, &mut path, &mut candidates);
        if candidates.is_empty() {
            return Err(TooLarge { size: total, max });
        }
        // Largest first, until what is saved covers the excess (references may count a value
        // twice: measured again after).
        let mut order: Vec<usize> = (0..candidates.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(candidates[i].size));
        let excess = total - max;
        let mut saved = 0;
        let mut chosen = vec![false; candidates.len()];
        for i in order {
            chosen[i] = true;
            saved += candidates[i].size.saturating_sub(NULL_LEN);
            if saved >= excess {
                break;
            }
        }
        let mut ordinal = 0;
        apply(&mut message, &chosen, &mut ordinal);
        let Ok(next) = message.transcode_to::<Envelope>() else {
            return Err(TooLarge { size: total, max });
        };
        envelope = next;
        for (candidate, _) in candidates.iter().zip(&chosen).filter(|(_, &c)| c) {
            cut += 1;
            if reported < CUTS_REPORTED {
                reported += 1;
                deviations.push(Deviation {
                    pattern: crate::decode::path_pattern(&candidate.path),
                    path: candidate.path.clone(),
                    expected: format!(
                        "an event within --max-event-bytes ({max} bytes) with its body and \
                         references"
                    ),
                    found: candidate.found.to_owned(),
                    outcome: Outcome::Cut,
                });
            }
        }
        if !candidates.iter().zip(&chosen).any(|(_, &c)| c) {
            return Err(TooLarge { size: total, max });
        }
    }
    if cut > reported {
        deviations.push(Deviation {
            path: ".".to_owned(),
            expected: format!("at most {CUTS_REPORTED} cut opaque values reported per event"),
            found: format!("{} more cut", cut - reported),
            outcome: Outcome::Cut,
            pattern: ".".to_owned(),
        });
        // Reporting the rest may have pushed it over again: measure once more.
        let total = size(&envelope, raw_len, deviations);
        if total > max {
            return Err(TooLarge { size: total, max });
        }
    }
    Ok((envelope, cut > 0))
}

/// The encoded length of a `google.protobuf.Value` holding `null`.
const NULL_LEN: usize = 2;

const VALUE: &str = "google.protobuf.Value";

/// An opaque value that may be cut.
struct Candidate {
    /// Its encoded length.
    size: usize,
    /// Its field path (`Rels.Projects[0].Options`).
    path: String,
    /// What kind of JSON it holds.
    found: &'static str,
}

fn dynamic(envelope: &Envelope) -> Option<DynamicMessage> {
    let descriptor = descriptor("iqchannels.webhook.v1.Envelope")?;
    DynamicMessage::decode(descriptor, envelope.encode_to_vec().as_slice()).ok()
}

fn descriptor(name: &str) -> Option<MessageDescriptor> {
    crate::pb::descriptor_pool().ok()?.get_message_by_name(name)
}

fn is_value(field: &FieldDescriptor) -> bool {
    field
        .kind()
        .as_message()
        .is_some_and(|message| message.full_name() == VALUE)
}

/// Every opaque value under `message`, in the order [`apply`] visits them.
fn collect(message: &DynamicMessage, path: &mut String, out: &mut Vec<Candidate>) {
    for field in message.descriptor().fields() {
        if field.kind().as_message().is_none() || field.is_map() || !message.has_field(&field) {
            continue;
        }
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(field.json_name());
        match &*message.get_field(&field) {
            Value::List(items) => {
                for (index, item) in items.iter().enumerate() {
                    let item_len = path.len();
                    path.push_str(&format!("[{index}]"));
                    if let Value::Message(item) = item {
                        visit(&field, item, path, out);
                    }
                    path.truncate(item_len);
                }
            }
            Value::Message(item) => visit(&field, item, path, out),
            _ => {}
        }
        path.truncate(len);
    }
}

fn visit(
    field: &FieldDescriptor,
    item: &DynamicMessage,
    path: &mut String,
    out: &mut Vec<Candidate>,
) {
    if is_value(field) {
        out.push(Candidate {
            size: item.encoded_len(),
            path: path.clone(),
            found: kind(item),
        });
    } else {
        collect(item, path, out);
    }
}

/// What kind of JSON a `google.protobuf.Value` holds (its oneof's field numbers).
fn kind(value: &DynamicMessage) -> &'static str {
    let kinds = [
        (1, "null"),
        (2, "a number"),
        (3, "a string"),
        (4, "a boolean"),
        (5, "an object"),
        (6, "an array"),
    ];
    kinds
        .iter()
        .find(|(number, _)| value.has_field_by_number(*number))
        .map_or("null", |(_, kind)| kind)
}

/// Cuts to `null` every opaque value whose ordinal (in [`collect`]'s order) is chosen.
fn apply(message: &mut DynamicMessage, chosen: &[bool], ordinal: &mut usize) {
    let fields: Vec<FieldDescriptor> = message.descriptor().fields().collect();
    for field in fields {
        if field.kind().as_message().is_none() || field.is_map() || !message.has_field(&field) {
            continue;
        }
        match message.get_field_mut(&field) {
            Value::List(items) => {
                for item in items.iter_mut() {
                    if let Value::Message(item) = item {
                        cut_or_descend(&field, item, chosen, ordinal);
                    }
                }
            }
            Value::Message(item) => cut_or_descend(&field, item, chosen, ordinal),
            _ => {}
        }
    }
}

fn cut_or_descend(
    field: &FieldDescriptor,
    item: &mut DynamicMessage,
    chosen: &[bool],
    ordinal: &mut usize,
) {
    if !is_value(field) {
        apply(item, chosen, ordinal);
        return;
    }
    if chosen.get(*ordinal).copied().unwrap_or(false) {
        let null = prost_types::Value {
            kind: Some(prost_types::value::Kind::NullValue(
                prost_types::NullValue::NullValue.into(),
            )),
        };
        if let Some(descriptor) = descriptor(VALUE) {
            if let Ok(null) = DynamicMessage::decode(descriptor, null.encode_to_vec().as_slice()) {
                *item = null;
            }
        }
    }
    *ordinal += 1;
}

#[cfg(test)]
mod tests;
