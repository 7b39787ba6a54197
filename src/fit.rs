//! The typed form bounded at ingest: every stored event fits one gRPC message.
//!
//! A subscriber asking for everything (`include_raw_json`, `include_references`) is sent the
//! typed envelope, the body, the references (copies of `Rels` entries) and the deviations in one
//! `Event`. An opaque value (`google.protobuf.Value`: `Options`, `Permissions`, `Fields`, ...)
//! costs up to 11 bytes per JSON `0,`, so a body within `--max-body-bytes` could make an event
//! over the 4 MiB that stock gRPC clients accept. Past `--max-event-bytes` in that largest form,
//! the largest opaque values are cut to `null` here, each a `cut` deviation (the raw JSON keeps
//! them), until the event fits; an event that still does not fit is refused.

use std::ops::Range;

use bytes::Bytes;
use prost::encoding::{decode_varint, encode_varint, WireType};
use prost::Message;
use prost_reflect::{FieldDescriptor, MessageDescriptor};

use crate::decode::{Deviation, Indices, Outcome};
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

/// The largest form of the event `envelope` (encoded: `encoded_len` bytes, its references at
/// `indices`) with a body of `raw_len` bytes and `deviations`.
fn size(
    envelope: &Envelope,
    encoded_len: usize,
    indices: &Indices,
    raw_len: usize,
    deviations: &[Deviation],
) -> usize {
    largest_len(
        encoded_len,
        raw_len,
        crate::wire::encode_deviations(deviations).len(),
        crate::decode::references_len(envelope, indices),
    )
}

/// The envelope `encoded` (the encoding of `envelope`, whose references are at `indices`), with
/// its largest opaque values cut to `null` (each added to `deviations`) as far as needed for the
/// event to fit `max` bytes in its largest form, and whether any was cut. Unchanged (no work
/// beyond measuring it) when it fits already.
///
/// The cut works on the encoded bytes, guided by the descriptors: an opaque value is a byte
/// range, never decoded, so the memory it takes is a small multiple of the envelope's encoding
/// whatever the value holds (a million `0`s decoded as messages would take hundreds of MiB).
/// Cutting values changes no id, so the references stay at `indices`.
pub fn fit(
    envelope: Envelope,
    encoded: Bytes,
    indices: &Indices,
    raw_len: usize,
    deviations: &mut Vec<Deviation>,
    max: usize,
) -> Result<(Bytes, bool), TooLarge> {
    let mut total = size(&envelope, encoded.len(), indices, raw_len, deviations);
    if total <= max {
        return Ok((encoded, false));
    }
    // The typed form is only needed again to measure the references once cut.
    drop(envelope);
    let too_large = |size| TooLarge { size, max };
    let descriptor = descriptor("iqchannels.webhook.v1.Envelope").ok_or(too_large(total))?;
    let mut encoded = encoded;
    let mut cut = 0usize;
    let mut reported = 0usize;
    loop {
        let mut candidates = Vec::new();
        collect(
            &encoded,
            0,
            &descriptor,
            &mut String::new(),
            &mut candidates,
        )
        .ok_or(too_large(total))?;
        // Largest first, until what is saved covers the excess (references may count a value
        // twice: measured again after). A value already `null` saves nothing.
        let mut order: Vec<usize> = (0..candidates.len())
            .filter(|&i| candidates[i].range.len() > NULL_LEN)
            .collect();
        if order.is_empty() {
            return Err(too_large(total));
        }
        order.sort_by_key(|&i| std::cmp::Reverse(candidates[i].range.len()));
        let excess = total - max;
        let mut saved = 0;
        let mut chosen = Vec::new();
        for i in order {
            chosen.push(i);
            saved += candidates[i].range.len() - NULL_LEN;
            if saved >= excess {
                break;
            }
        }
        chosen.sort_unstable();
        let ranges: Vec<Range<usize>> = chosen
            .iter()
            .map(|&i| candidates[i].range.clone())
            .collect();
        let mut rewritten = Vec::with_capacity(encoded.len().saturating_sub(saved) + 16);
        rewrite(&encoded, 0, &descriptor, &ranges, &mut rewritten).ok_or(too_large(total))?;
        encoded = Bytes::from(rewritten);
        for &i in &chosen {
            cut += 1;
            if reported < CUTS_REPORTED {
                reported += 1;
                let candidate = &candidates[i];
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
        // The cuts not reported one by one are counted in one deviation, added after the loop
        // and measured here.
        let more = cut > reported;
        if more {
            deviations.push(more_cut(cut - reported));
        }
        let envelope = Envelope::decode(encoded.as_ref()).map_err(|_| too_large(total))?;
        total = size(&envelope, encoded.len(), indices, raw_len, deviations);
        if more {
            deviations.pop();
        }
        if total <= max {
            break;
        }
    }
    if cut > reported {
        deviations.push(more_cut(cut - reported));
    }
    Ok((encoded, true))
}

/// The deviation that counts the cuts not reported one by one.
fn more_cut(more: usize) -> Deviation {
    Deviation {
        path: ".".to_owned(),
        expected: format!("at most {CUTS_REPORTED} cut opaque values reported per event"),
        found: format!("{more} more cut"),
        outcome: Outcome::Cut,
        pattern: ".".to_owned(),
    }
}

/// The encoded length of a `google.protobuf.Value` holding `null`: its `null_value` (field 1,
/// varint 0).
const NULL_LEN: usize = 2;
const NULL: [u8; NULL_LEN] = [0x08, 0x00];

const VALUE: &str = "google.protobuf.Value";

/// An opaque value that may be cut.
struct Candidate {
    /// Where its encoding (without its field's key and length) is in the envelope's.
    range: Range<usize>,
    /// Its field path (`Rels.Projects[0].Options`).
    path: String,
    /// What kind of JSON it holds.
    found: &'static str,
}

fn descriptor(name: &str) -> Option<MessageDescriptor> {
    crate::pb::descriptor_pool().ok()?.get_message_by_name(name)
}

/// One field of an encoded message: where its key starts, where its value (for a
/// length-delimited field: its content) starts and ends.
struct Field {
    number: u32,
    wire_type: WireType,
    start: usize,
    /// Where its key ends.
    after_key: usize,
    content: Range<usize>,
    end: usize,
}

/// The fields of the encoded message `buf`, in order; `None` for bytes that are not a message
/// (never the case for an envelope the gateway encoded).
fn fields(buf: &[u8]) -> impl Iterator<Item = Option<Field>> + '_ {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at >= buf.len() {
            return None;
        }
        let field = next_field(buf, at);
        at = field.as_ref().map_or(buf.len(), |field| field.end);
        Some(field)
    })
}

fn next_field(buf: &[u8], start: usize) -> Option<Field> {
    let varint = |at: usize| -> Option<(u64, usize)> {
        let mut rest = buf.get(at..)?;
        let before = rest.len();
        let value = decode_varint(&mut rest).ok()?;
        Some((value, at + before - rest.len()))
    };
    let (key, after_key) = varint(start)?;
    let number = u32::try_from(key >> 3).ok()?;
    let wire_type = WireType::try_from(key & 7).ok()?;
    let (content, end) = match wire_type {
        WireType::Varint => {
            let (_, end) = varint(after_key)?;
            (after_key..end, end)
        }
        WireType::SixtyFourBit => (after_key..after_key + 8, after_key + 8),
        WireType::ThirtyTwoBit => (after_key..after_key + 4, after_key + 4),
        WireType::LengthDelimited => {
            let (len, content_start) = varint(after_key)?;
            let end = content_start.checked_add(usize::try_from(len).ok()?)?;
            (content_start..end, end)
        }
        WireType::StartGroup | WireType::EndGroup => return None,
    };
    (end <= buf.len()).then_some(Field {
        number,
        wire_type,
        start,
        after_key,
        content,
        end,
    })
}

/// The message type of a length-delimited `field` the cut looks into (maps are left whole).
fn message_field(
    message: &MessageDescriptor,
    field: &Field,
) -> Option<(FieldDescriptor, MessageDescriptor)> {
    if field.wire_type != WireType::LengthDelimited {
        return None;
    }
    let descriptor = message.get_field(field.number)?;
    if descriptor.is_map() {
        return None;
    }
    let kind = descriptor.kind().as_message()?.clone();
    Some((descriptor, kind))
}

/// Every opaque value in the encoded `message` (at `base` in the envelope's encoding), in byte
/// order, with its path; `None` for bytes that do not parse.
fn collect(
    buf: &[u8],
    base: usize,
    message: &MessageDescriptor,
    path: &mut String,
    out: &mut Vec<Candidate>,
) -> Option<()> {
    // Items seen per repeated field number, for the `[i]` of paths.
    let mut items: Vec<(u32, usize)> = Vec::new();
    for field in fields(buf) {
        let field = field?;
        let Some((descriptor, kind)) = message_field(message, &field) else {
            continue;
        };
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(descriptor.json_name());
        if descriptor.is_list() {
            let index = match items.iter_mut().find(|(number, _)| *number == field.number) {
                Some((_, seen)) => {
                    *seen += 1;
                    *seen - 1
                }
                None => {
                    items.push((field.number, 1));
                    0
                }
            };
            path.push_str(&format!("[{index}]"));
        }
        let content = &buf[field.content.clone()];
        let at = base + field.content.start;
        if kind.full_name() == VALUE {
            out.push(Candidate {
                range: at..at + content.len(),
                path: path.clone(),
                found: value_kind(content),
            });
        } else {
            collect(content, at, &kind, path, out)?;
        }
        path.truncate(len);
    }
    Some(())
}

/// What kind of JSON an encoded `google.protobuf.Value` holds (its oneof's field numbers).
fn value_kind(value: &[u8]) -> &'static str {
    match next_field(value, 0).map(|field| field.number) {
        Some(2) => "a number",
        Some(3) => "a string",
        Some(4) => "a boolean",
        Some(5) => "an object",
        Some(6) => "an array",
        _ => "null",
    }
}

/// Writes the encoded `message` (at `base` in the envelope's encoding) to `out` with every
/// opaque value whose range is in `cut` (sorted, not overlapping) replaced by `null`, at any
/// depth (inside other opaque values too); fields with nothing to cut are copied as they are.
/// `None` for bytes that do not parse.
fn rewrite(
    buf: &[u8],
    base: usize,
    message: &MessageDescriptor,
    cut: &[Range<usize>],
    out: &mut Vec<u8>,
) -> Option<()> {
    for field in fields(buf) {
        let field = field?;
        let at = base + field.content.start..base + field.content.end;
        // The first range to cut that does not end before this field's content.
        let first = cut.partition_point(|range| range.end <= at.start);
        let inside = cut.get(first).is_some_and(|range| range.start < at.end);
        // Into maps too: a `google.protobuf.Struct` holds its values in one.
        let kind = (field.wire_type == WireType::LengthDelimited)
            .then(|| message.get_field(field.number))
            .flatten()
            .and_then(|descriptor| descriptor.kind().as_message().cloned());
        match kind {
            Some(kind) if inside => {
                out.extend_from_slice(&buf[field.start..field.after_key]);
                if kind.full_name() == VALUE && cut[first] == at {
                    encode_varint(NULL_LEN as u64, out);
                    out.extend_from_slice(&NULL);
                } else {
                    let mut inner = Vec::new();
                    rewrite(
                        &buf[field.content.clone()],
                        at.start,
                        &kind,
                        cut,
                        &mut inner,
                    )?;
                    encode_varint(inner.len() as u64, out);
                    out.extend_from_slice(&inner);
                }
            }
            _ => out.extend_from_slice(&buf[field.start..field.end]),
        }
    }
    Some(())
}

/// The typed envelope with every number that is not finite (NaN, infinities: a typed gRPC
/// `Publish` can carry them, JSON cannot) in its opaque values cut to `null`, and a `cut`
/// deviation for each (at most [`CUTS_REPORTED`], then one that counts the rest). Such a number
/// has no JSON form, so an event holding one could not be sent as JSON (SSE, the CLI) nor
/// exported. Unchanged when there is none.
pub fn finite(envelope: Envelope) -> (Envelope, Vec<Deviation>) {
    let Some(descriptor) = descriptor("iqchannels.webhook.v1.Envelope") else {
        return (envelope, Vec::new());
    };
    let encoded = envelope.encode_to_vec();
    let mut values = Vec::new();
    if collect(&encoded, 0, &descriptor, &mut String::new(), &mut values).is_none() {
        return (envelope, Vec::new());
    }
    let mut found = Vec::new();
    for value in &values {
        let mut path = value.path.clone();
        non_finite(&encoded, value.range.clone(), &mut path, &mut found);
    }
    if found.is_empty() {
        return (envelope, Vec::new());
    }
    let ranges: Vec<Range<usize>> = found.iter().map(|(range, _, _)| range.clone()).collect();
    let mut out = Vec::with_capacity(encoded.len());
    let cut = rewrite(&encoded, 0, &descriptor, &ranges, &mut out)
        .and_then(|()| Envelope::decode(out.as_slice()).ok());
    let Some(cut) = cut else {
        return (envelope, Vec::new());
    };
    let mut deviations: Vec<Deviation> = found
        .iter()
        .take(CUTS_REPORTED)
        .map(|(_, path, number)| {
            // Keys are the sender's: cut as the decode cuts paths.
            let mut path = path.clone();
            crate::decode::clip_to(&mut path, crate::decode::MAX_ERROR_TEXT);
            Deviation {
                pattern: crate::decode::path_pattern(&path),
                path,
                expected: "a finite number (JSON has no other)".to_owned(),
                found: number.to_string(),
                outcome: Outcome::Cut,
            }
        })
        .collect();
    if found.len() > CUTS_REPORTED {
        deviations.push(more_cut(found.len() - CUTS_REPORTED));
    }
    (cut, deviations)
}

/// The numbers that are not finite in the encoded `google.protobuf.Value` at `range` of `buf`,
/// each with the range of the `Value` that holds it and its path.
fn non_finite(
    buf: &[u8],
    range: Range<usize>,
    path: &mut String,
    out: &mut Vec<(Range<usize>, String, f64)>,
) {
    let value = &buf[range.clone()];
    for field in fields(value).map_while(|field| field) {
        let content = range.start + field.content.start..range.start + field.content.end;
        match (field.number, field.wire_type) {
            // number_value
            (2, WireType::SixtyFourBit) => {
                let bytes: [u8; 8] = buf[content].try_into().unwrap_or([0; 8]);
                let number = f64::from_le_bytes(bytes);
                if !number.is_finite() {
                    out.push((range.clone(), path.clone(), number));
                }
            }
            // struct_value: its `fields` map, entries of key (1) and value (2)
            (5, WireType::LengthDelimited) => {
                for entry in fields(&buf[content.clone()]).map_while(|field| field) {
                    if entry.number != 1 || entry.wire_type != WireType::LengthDelimited {
                        continue;
                    }
                    let at = content.start + entry.content.start;
                    let mut key = "";
                    let mut item = None;
                    for part in fields(&buf[at..content.start + entry.content.end]).map_while(|f| f)
                    {
                        let part_range = at + part.content.start..at + part.content.end;
                        match part.number {
                            1 => key = std::str::from_utf8(&buf[part_range]).unwrap_or("?"),
                            2 => item = Some(part_range),
                            _ => {}
                        }
                    }
                    if let Some(item) = item {
                        let len = path.len();
                        path.push('.');
                        path.push_str(key);
                        non_finite(buf, item, path, out);
                        path.truncate(len);
                    }
                }
            }
            // list_value: its `values`
            (6, WireType::LengthDelimited) => {
                let items = fields(&buf[content.clone()]).map_while(|field| field);
                for (index, item) in items.filter(|item| item.number == 1).enumerate() {
                    let len = path.len();
                    path.push_str(&format!("[{index}]"));
                    let at = content.start + item.content.start..content.start + item.content.end;
                    non_finite(buf, at, path, out);
                    path.truncate(len);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests;
