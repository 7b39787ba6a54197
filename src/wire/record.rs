//! The compact stored record (format 1): each event stored once, compressed.
//!
//! A record is `[0x00, version]` then a [`Compact`] message. The first byte tells it from the
//! records of earlier releases (a bare [`StoredEvent`], whose first byte is a field tag, never
//! 0: protobuf has no field 0), which stay readable. What a reader needs without the event's
//! content stays outside the compressed part: the filter keys (so a filter can pass over a
//! record without decompressing it) and the digests (so a redelivery's conflict is decided
//! without decoding the stored body again). The content (typed envelope, original body,
//! deviations, and the references as indices into the envelope's `Rels` lists rather than
//! copies) is one zstd frame, decompressed once per record read (by the hub or a catch-up page),
//! never per subscriber: the references' bytes are rebuilt then, once, from the envelope's.

use std::cell::RefCell;
use std::sync::LazyLock;

use bytes::{Buf, Bytes};
use prost::encoding::{decode_key, decode_varint, skip_field, DecodeContext, WireType};
use prost::Message;
use sha2::{Digest as _, Sha256};

use super::{Keys, StoredEvent};
use crate::decode::{Indices, REFERENCE_FIELDS};

/// First byte of a compact record (a field number of 0 is not protobuf: no [`StoredEvent`]
/// starts with it).
const MARK: u8 = 0x00;
/// The compact form's version this build writes (and the newest it reads): [`VERSION_1`] with a
/// checksum of the whole record (CRC-32C of the mark, the version and the [`Compact`] message,
/// four bytes little-endian, between the version and the message), checked by every read.
const VERSION: u8 = 2;
/// The first compact form, without a checksum (written until December 2026; still read, its
/// zstd frame checked by its own checksum, its body against its digest by `verify`).
const VERSION_1: u8 = 1;
/// The checksum's length in a record of [`VERSION`].
const CHECKSUM_BYTES: usize = 4;
/// zstd level: fast to compress (a few ms per MB), a third to a tenth of JSON's size.
const LEVEL: i32 = 3;
/// The largest content a record may say it holds (a damaged length is refused, not allocated).
const MAX_CONTENT: u64 = 256 << 20;

/// How the content is kept.
const CODEC_NONE: u32 = 0;
const CODEC_ZSTD: u32 = 1;
/// zstd with [`DICTIONARY_1`] (what this build writes).
const CODEC_ZSTD_DICTIONARY_1: u32 = 2;

/// A zstd dictionary trained on the vendor's shapes (the webhook samples and every field of the
/// protos, with varied ids, times, texts and event types; `wire::record::tests::train`), shipped
/// in the binary. Never changed once released: a new one is a new codec, and every earlier one
/// stays here so that old records read.
const DICTIONARY_1: &[u8] = include_bytes!("dictionary-1.zstd-dict");

/// The outer, uncompressed part of a compact record.
#[derive(Clone, PartialEq, Message)]
struct Compact {
    #[prost(message, optional, tag = "1")]
    keys: Option<Keys>,
    /// SHA-256 of the original body as stored (empty when there is none: a typed Publish).
    #[prost(bytes = "bytes", tag = "2")]
    body_digest: Bytes,
    /// SHA-256 of the typed envelope as this build decoded it, before any cut to fit.
    #[prost(bytes = "bytes", tag = "3")]
    envelope_digest: Bytes,
    /// Which protos typed the envelope ([`typing`]): the envelope digest decides only between
    /// events typed alike.
    #[prost(fixed64, tag = "4")]
    typing: u64,
    /// [`CODEC_NONE`] or [`CODEC_ZSTD`].
    #[prost(uint32, tag = "5")]
    codec: u32,
    /// The content's length once decompressed.
    #[prost(uint64, tag = "6")]
    content_len: u64,
    /// The encoded [`Content`], compressed by `codec`.
    #[prost(bytes = "bytes", tag = "7")]
    content: Bytes,
    /// SHA-256 of the typed `ChatEvent` alone (empty in records written before it was kept): a
    /// redelivery whose `ChatEvent` is the same is the same event, whatever its `Rels`.
    #[prost(bytes = "bytes", tag = "8")]
    chat_event_digest: Bytes,
}

/// The compressed part of a compact record.
#[derive(Clone, PartialEq, Message)]
struct Content {
    /// The typed envelope, protobuf-encoded (cut to fit, see `fit`).
    #[prost(bytes = "bytes", tag = "1")]
    envelope: Bytes,
    /// The original body, verbatim.
    #[prost(bytes = "bytes", tag = "2")]
    raw_json: Bytes,
    /// The deviations in their `Event` wire form (see [`StoredEvent::deviations`]).
    #[prost(bytes = "bytes", tag = "3")]
    deviations: Bytes,
    /// The referenced entities: for each `References` field (in `REFERENCE_FIELDS` order), one
    /// more than its index in its `Rels` list, 0 for none.
    #[prost(uint32, repeated, tag = "4")]
    references: Vec<u32>,
}

/// What identifies an event's content, kept with its record: a redelivery is compared by these,
/// never by decoding the stored body again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    /// SHA-256 of the body as stored (`None` without a body: a typed Publish).
    pub body: Option<[u8; 32]>,
    /// SHA-256 of the typed envelope as decoded (before any cut to fit).
    pub envelope: [u8; 32],
    /// Which protos typed it ([`typing`]).
    pub typing: u64,
    /// SHA-256 of the typed `ChatEvent` alone, as encoded (`None` in records written before it
    /// was kept).
    pub chat_event: Option<[u8; 32]>,
}

impl Digests {
    /// The digests of an event with this body (empty for none), this encoded envelope and its
    /// encoded `ChatEvent`.
    pub fn of(raw_json: &[u8], envelope: &[u8], chat_event: &[u8]) -> Self {
        Self {
            body: (!raw_json.is_empty()).then(|| Sha256::digest(raw_json).into()),
            envelope: Sha256::digest(envelope).into(),
            typing: typing(),
            chat_event: Some(Sha256::digest(chat_event).into()),
        }
    }

    /// Whether the stored event with `stored` digests has this event's `ChatEvent`, when both
    /// were typed alike and the stored record kept its digest; `None` when only a decode can
    /// tell.
    pub fn same_chat_event(&self, stored: &Digests) -> Option<bool> {
        match (self.chat_event, stored.chat_event) {
            (Some(new), Some(old)) if self.typing == stored.typing => Some(new == old),
            _ => None,
        }
    }

    /// Whether a stored event with `stored` digests is the event with these: `Some(true)` when
    /// the bodies are the same bytes or both typed the same, `Some(false)` when they differ and
    /// were typed by the same protos, `None` when only a decode of the stored body can tell (it
    /// was typed by other protos).
    pub fn same_event(&self, stored: &Digests) -> Option<bool> {
        if self.body.is_some() && self.body == stored.body {
            return Some(true);
        }
        if self.envelope == stored.envelope {
            return Some(true);
        }
        (self.typing == stored.typing).then_some(false)
    }
}

/// A fingerprint of the protos built into this binary: the first 8 bytes of the SHA-256 of
/// their descriptor set.
pub fn typing() -> u64 {
    static TYPING: LazyLock<u64> = LazyLock::new(|| {
        let digest = Sha256::digest(crate::pb::FILE_DESCRIPTOR_SET);
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest[..8]);
        u64::from_be_bytes(first)
    });
    *TYPING
}

/// A record that does not read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CorruptRecord(pub String);

impl From<prost::DecodeError> for CorruptRecord {
    fn from(error: prost::DecodeError) -> Self {
        Self(error.to_string())
    }
}

/// One event's parts, to be stored as a compact record.
#[derive(Debug, Clone, Copy)]
pub struct Parts<'a> {
    /// The typed envelope, encoded (as it will be served).
    pub envelope: &'a [u8],
    /// The original body (empty for none).
    pub raw_json: &'a [u8],
    /// The filter keys.
    pub keys: &'a Keys,
    /// The deviations in their `Event` wire form.
    pub deviations: &'a [u8],
    /// The referenced entities' places in `Rels`.
    pub references: &'a Indices,
    /// The content's digests.
    pub digests: &'a Digests,
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    /// For records compressed without a dictionary.
    static PLAIN: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// `Content`'s encoding, written from the borrowed parts (no copy of them first).
fn content(parts: &Parts<'_>) -> Vec<u8> {
    let references: Vec<u32> = parts
        .references
        .0
        .iter()
        .map(|index| index.map_or(0, |i| i as u32 + 1))
        .collect();
    let mut content = Vec::with_capacity(
        parts.envelope.len() + parts.raw_json.len() + parts.deviations.len() + 64,
    );
    for (tag, field) in [
        (1, parts.envelope),
        (2, parts.raw_json),
        (3, parts.deviations),
    ] {
        if !field.is_empty() {
            prost::encoding::encode_key(tag, WireType::LengthDelimited, &mut content);
            prost::encoding::encode_varint(field.len() as u64, &mut content);
            content.extend_from_slice(field);
        }
    }
    prost::encoding::uint32::encode_packed(4, &references, &mut content);
    content
}

/// Encodes `parts` as a compact record.
pub fn encode(parts: &Parts<'_>) -> Bytes {
    let content = content(parts);
    let compressed = COMPRESSOR.with(|cell| {
        let mut cell = cell.borrow_mut();
        if cell.is_none() {
            // With the frame's checksum: damage is found when the record is read (`verify`).
            *cell = zstd::bulk::Compressor::with_dictionary(LEVEL, DICTIONARY_1)
                .ok()
                .and_then(|mut compressor| {
                    compressor
                        .set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(true))
                        .ok()?;
                    Some(compressor)
                });
        }
        cell.as_mut()
            .and_then(|compressor| compressor.compress(&content).ok())
    });
    let content_len = content.len() as u64;
    let (codec, content) = match compressed {
        Some(compressed) if compressed.len() < content.len() => {
            (CODEC_ZSTD_DICTIONARY_1, compressed)
        }
        _ => (CODEC_NONE, content),
    };
    let outer = Compact {
        keys: Some(parts.keys.clone()),
        body_digest: parts
            .digests
            .body
            .map_or_else(Bytes::new, |d| Bytes::copy_from_slice(&d)),
        envelope_digest: Bytes::copy_from_slice(&parts.digests.envelope),
        typing: parts.digests.typing,
        chat_event_digest: parts
            .digests
            .chat_event
            .map_or_else(Bytes::new, |digest| Bytes::copy_from_slice(&digest)),
        codec,
        content_len,
        content: content.into(),
    };
    seal(&outer)
}

/// `outer` as a record of [`VERSION`]: the mark, the version, the checksum, the message.
fn seal(outer: &Compact) -> Bytes {
    let mut out = Vec::with_capacity(2 + CHECKSUM_BYTES + outer.encoded_len());
    out.extend_from_slice(&[MARK, VERSION, 0, 0, 0, 0]);
    outer.encode(&mut out).expect("a Vec grows as needed");
    let checksum = checksum(&out);
    out[2..2 + CHECKSUM_BYTES].copy_from_slice(&checksum.to_le_bytes());
    out.into()
}

/// The CRC-32C of a record of [`VERSION`] (its checksum's own bytes left out).
fn checksum(record: &[u8]) -> u32 {
    let head = record.get(..2).unwrap_or(record);
    let message = record.get(2 + CHECKSUM_BYTES..).unwrap_or_default();
    crc32c::crc32c_append(crc32c::crc32c(head), message)
}

/// What [`sealed_len`] found at the start of some bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sealed {
    /// A whole record of [`VERSION`] of this many bytes, its checksum matching.
    Found(usize),
    /// It may be one, but more bytes are needed: at least this many in all.
    NeedMore(usize),
    /// Not a record of [`VERSION`].
    No,
}

/// Whether `bytes` starts with a whole record of [`VERSION`] (for the salvage of a store whose
/// index is damaged, `admin::salvage`): its fields are read in order (prost writes them by
/// increasing tag), and after each one the checksum of what was read is compared with the
/// record's, so that a record is found without knowing its length.
pub fn sealed_len(bytes: &[u8]) -> Sealed {
    if bytes.len() < 2 + CHECKSUM_BYTES + 1 {
        return Sealed::NeedMore(2 + CHECKSUM_BYTES + 1);
    }
    if bytes[0] != MARK || bytes[1] != VERSION {
        return Sealed::No;
    }
    let stored = u32::from_le_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]);
    let head = crc32c::crc32c(&bytes[..2]);
    let mut at = 2 + CHECKSUM_BYTES;
    let mut last_tag = 0;
    let mut crc = head;
    loop {
        let mut rest = &bytes[at..];
        let available = rest.len();
        let Ok((tag, wire_type)) = decode_key(&mut rest) else {
            // A key cut short, or not a key: more bytes tell, up to a key's length.
            return if available < 10 {
                Sealed::NeedMore(at + 10)
            } else {
                Sealed::No
            };
        };
        if tag <= last_tag || tag > 8 {
            return Sealed::No;
        }
        last_tag = tag;
        let field_len = match wire_type {
            WireType::LengthDelimited => {
                let Ok(len) = decode_varint(&mut rest) else {
                    return if available < 20 {
                        Sealed::NeedMore(at + 20)
                    } else {
                        Sealed::No
                    };
                };
                if len > MAX_CONTENT + (1 << 20) {
                    return Sealed::No;
                }
                (available - rest.len()) + len as usize
            }
            WireType::Varint => match decode_varint(&mut rest) {
                Ok(_) => available - rest.len(),
                Err(_) if available < 10 => return Sealed::NeedMore(at + 10),
                Err(_) => return Sealed::No,
            },
            WireType::SixtyFourBit => (available - rest.len()) + 8,
            _ => return Sealed::No,
        };
        let end = at + field_len;
        if end > bytes.len() {
            return Sealed::NeedMore(end);
        }
        crc = crc32c::crc32c_append(crc, &bytes[at..end]);
        at = end;
        if crc == stored {
            return Sealed::Found(at);
        }
        if tag == 8 {
            return Sealed::No;
        }
    }
}

/// How many reads of a record's content found it damaged (a checksum that does not match, or a
/// record that does not parse) since the process started: `iqgw_damaged_record_reads_total`.
pub static DAMAGED_READS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn damaged(why: impl Into<String>) -> CorruptRecord {
    CorruptRecord(why.into())
}

/// The [`Compact`] message of a compact record, its checksum checked (a record of [`VERSION`]),
/// or `None` for a version this build does not read. A record whose checksum does not match is
/// an error, whatever part of it was damaged.
fn message(payload: &[u8]) -> Result<Option<&[u8]>, CorruptRecord> {
    match payload.get(1) {
        Some(&VERSION) => {
            let stored = payload
                .get(2..2 + CHECKSUM_BYTES)
                .ok_or_else(|| damaged("truncated record"))?;
            let stored = u32::from_le_bytes(stored.try_into().unwrap_or_default());
            if checksum(payload) != stored {
                return Err(damaged(
                    "the record's checksum does not match: its bytes were changed after it was \
                     written",
                ));
            }
            Ok(payload.get(2 + CHECKSUM_BYTES..))
        }
        Some(&VERSION_1) => Ok(payload.get(2..)),
        Some(_) => Ok(None),
        None => Err(damaged("truncated record")),
    }
}

/// Whether `payload` is a compact record (else a [`StoredEvent`] of an earlier release).
pub fn is_compact(payload: &[u8]) -> bool {
    payload.first() == Some(&MARK)
}

/// The filter keys of a compact record read from a borrowed payload: the outer message's field
/// 1 only, the compressed content skipped by its length (never copied or decompressed). `None`
/// when the record is not one this build reads.
pub fn keys_of_compact(payload: &[u8]) -> Option<Keys> {
    head(payload).map(|head| head.keys.unwrap_or_default())
}

/// What a reader will hold of the record `payload` once it is read back: its content once
/// decompressed (a compact record says how long that is without being decompressed: a
/// compressible content can be a thousand times its record), or the payload itself (an
/// earlier release's record, or one this build cannot read). Catch-up budgets count this,
/// never the compressed length.
pub fn held_len(payload: &[u8]) -> usize {
    if !is_compact(payload) {
        return payload.len();
    }
    head(payload).map_or(payload.len(), |head| {
        usize::try_from(head.content_len)
            .unwrap_or(usize::MAX)
            .max(payload.len())
    })
}

/// [`Compact`] with only its fields 1 (keys) and 6 (content length): the compressed content is
/// skipped by its length, never copied.
#[derive(Clone, PartialEq, Message)]
struct Head {
    #[prost(message, optional, tag = "1")]
    keys: Option<Keys>,
    #[prost(uint64, tag = "6")]
    content_len: u64,
}

/// The [`Head`] of a compact record this build reads, its checksum checked (`None` when it does
/// not match: a filter then keeps the record, and the read that follows reports it).
fn head(payload: &[u8]) -> Option<Head> {
    Head::decode(message(payload).ok()??).ok()
}

fn outer(payload: &Bytes) -> Result<Compact, CorruptRecord> {
    let Some(message) = message(payload)? else {
        return Err(CorruptRecord(format!(
            "compact record version {}, written by a newer release (this one reads up to \
             {VERSION})",
            payload.get(1).copied().unwrap_or_default()
        )));
    };
    let outer = Compact::decode(payload.slice_ref(message)).map_err(|e| damaged(e.to_string()))?;
    // Every compact record has one: without it, the record is not whole.
    if outer.envelope_digest.len() != 32 {
        return Err(damaged("record without its envelope digest"));
    }
    Ok(outer)
}

/// The filter keys of a record, without decompressing its content.
pub fn keys(payload: &Bytes) -> Result<Keys, CorruptRecord> {
    if is_compact(payload) {
        Ok(outer(payload)?.keys.unwrap_or_default())
    } else {
        Ok(legacy(payload)?.keys.unwrap_or_default())
    }
}

/// Whether `byte` can start a record of an earlier release (a bare [`StoredEvent`]): the tag of
/// one of its fields, all length-delimited (prost writes the envelope's first, and an event has
/// one). An empty record (a value cut to its header) has none.
pub fn may_start_legacy(byte: Option<&u8>) -> bool {
    matches!(byte, Some(0x0A | 0x12 | 0x1A | 0x22 | 0x2A))
}

/// A record of an earlier release, which has no checksum: it must at least start as one and hold
/// an event (an envelope or a body). An empty record or anything else is damaged, never an
/// empty event.
fn legacy(payload: &Bytes) -> Result<StoredEvent, CorruptRecord> {
    if !may_start_legacy(payload.first()) {
        return Err(CorruptRecord(match payload.first() {
            None => "empty record".into(),
            Some(byte) => format!("a record cannot start with byte {byte:#04x}"),
        }));
    }
    let stored = StoredEvent::decode(payload.clone())?;
    if stored.envelope.is_empty() && stored.raw_json.is_empty() {
        return Err(CorruptRecord("record without an event".into()));
    }
    Ok(stored)
}

/// What a stored record says of its content's identity: its digests (a compact record), or the
/// whole old record (an earlier release's, which has none).
#[derive(Debug, Clone)]
pub enum Identity {
    /// A compact record's digests and keys; nothing decompressed.
    Digests(Digests, Keys),
    /// A record of an earlier release.
    Legacy(StoredEvent),
}

/// The identity of the record `payload`.
pub fn identity(payload: &Bytes) -> Result<Identity, CorruptRecord> {
    if !is_compact(payload) {
        return Ok(Identity::Legacy(legacy(payload)?));
    }
    let outer = outer(payload)?;
    let digest = |bytes: &Bytes| <[u8; 32]>::try_from(bytes.as_ref()).ok();
    let envelope = digest(&outer.envelope_digest)
        .ok_or_else(|| CorruptRecord("record without an envelope digest".into()))?;
    Ok(Identity::Digests(
        Digests {
            body: digest(&outer.body_digest),
            envelope,
            typing: outer.typing,
            chat_event: digest(&outer.chat_event_digest),
        },
        outer.keys.unwrap_or_default(),
    ))
}

/// A record's content as a [`StoredEvent`] (the compact one decompressed, its references rebuilt
/// from the envelope: the bytes a subscriber is sent, built here once), and its keys.
pub fn stored(payload: Bytes) -> Result<StoredEvent, CorruptRecord> {
    read(payload).inspect_err(|_| {
        DAMAGED_READS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
}

fn read(payload: Bytes) -> Result<StoredEvent, CorruptRecord> {
    if !is_compact(&payload) {
        return legacy(&payload);
    }
    let outer = outer(&payload)?;
    if outer.content_len > MAX_CONTENT {
        return Err(CorruptRecord(format!(
            "record content of {} bytes",
            outer.content_len
        )));
    }
    let content: Bytes = match outer.codec {
        CODEC_NONE if outer.content.len() as u64 == outer.content_len => outer.content,
        CODEC_NONE => return Err(CorruptRecord("content shorter than recorded".into())),
        CODEC_ZSTD | CODEC_ZSTD_DICTIONARY_1 => {
            let capacity = outer.content_len as usize;
            let cell = if outer.codec == CODEC_ZSTD {
                &PLAIN
            } else {
                &DECOMPRESSOR
            };
            let decompressed = cell.with(|cell| {
                let mut cell = cell.borrow_mut();
                if cell.is_none() {
                    *cell = if outer.codec == CODEC_ZSTD {
                        zstd::bulk::Decompressor::new().ok()
                    } else {
                        zstd::bulk::Decompressor::with_dictionary(DICTIONARY_1).ok()
                    };
                }
                match cell.as_mut() {
                    Some(decompressor) => decompressor
                        .decompress(&outer.content, capacity)
                        .map_err(|error| CorruptRecord(format!("content: {error}"))),
                    None => Err(CorruptRecord("no zstd context".into())),
                }
            })?;
            if decompressed.len() != capacity {
                return Err(CorruptRecord("content shorter than recorded".into()));
            }
            decompressed.into()
        }
        codec => return Err(CorruptRecord(format!("unknown codec {codec}"))),
    };
    let content = Content::decode(content)?;
    let references = references(&content.envelope, &content.references)?;
    Ok(StoredEvent {
        envelope: content.envelope,
        raw_json: content.raw_json,
        keys: outer.keys,
        deviations: content.deviations,
        references,
    })
}

/// Checks a record's content, read by [`stored`], against what its record says of it (`verify`):
/// the original body against its digest (what finds a change in a record written before
/// records had a checksum, [`VERSION_1`]). A record of an earlier release has no digest.
pub fn check_digests(payload: &Bytes, content: &StoredEvent) -> Result<(), CorruptRecord> {
    if !is_compact(payload) {
        return Ok(());
    }
    let outer = outer(payload)?;
    let body = (!content.raw_json.is_empty()).then(|| Sha256::digest(&content.raw_json));
    match body {
        Some(digest) if outer.body_digest.as_ref() != digest.as_slice() => Err(CorruptRecord(
            "the original body does not match its digest: it was changed after it was written"
                .into(),
        )),
        None if !outer.body_digest.is_empty() => {
            Err(CorruptRecord("the original body is missing".into()))
        }
        _ => Ok(()),
    }
}

/// The encoded `References` of the entities at `indices` (one more than the index, 0 for none;
/// in `REFERENCE_FIELDS` order) of the encoded envelope's `Rels`: each entity's bytes as they
/// are in the envelope, behind its `References` tag (prost's encoding of the same message).
fn references(envelope: &Bytes, indices: &[u32]) -> Result<Bytes, CorruptRecord> {
    if indices.iter().all(|&index| index == 0) {
        return Ok(Bytes::new());
    }
    let mut found: [Option<Bytes>; 8] = Default::default();
    let rels = fields(envelope, |tag| (tag == 2).then_some(()))?
        .into_iter()
        .last()
        .map(|(_, rels)| rels);
    if let Some(rels) = rels {
        let mut seen = [0u32; 16];
        for (slot, item) in fields(&rels, |tag| {
            let counter = seen.get_mut(tag as usize)?;
            *counter += 1;
            REFERENCE_FIELDS
                .iter()
                .zip(indices)
                .position(|(&(_, rels_tag), &index)| rels_tag == tag && index == *counter)
        })? {
            found[slot] = Some(item);
        }
    }
    let mut out = Vec::new();
    for ((references_tag, _), item) in REFERENCE_FIELDS.iter().zip(found) {
        if let Some(item) = item {
            prost::encoding::bytes::encode(*references_tag, &item, &mut out);
        }
    }
    Ok(out.into())
}

/// The length-delimited fields of the encoded message `message` that `pick` chooses (given their
/// tag, in order), as slices of it; other fields are skipped.
fn fields<T>(
    message: &Bytes,
    mut pick: impl FnMut(u32) -> Option<T>,
) -> Result<Vec<(T, Bytes)>, CorruptRecord> {
    let mut buf = message.clone();
    let mut out = Vec::new();
    while buf.has_remaining() {
        let (tag, wire_type) = decode_key(&mut buf)?;
        if wire_type == WireType::LengthDelimited {
            let len = decode_varint(&mut buf)? as usize;
            if len > buf.remaining() {
                return Err(CorruptRecord("envelope field past its end".into()));
            }
            let item = buf.split_to(len);
            if let Some(chosen) = pick(tag) {
                out.push((chosen, item));
            }
        } else {
            skip_field(wire_type, tag, &mut buf, DecodeContext::default())?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::Deviation;

    const FIXTURES: [&[u8]; 2] = [
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/chat_closed.json"
        )),
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/message_created_file.json"
        )),
    ];

    fn compact(body: &[u8]) -> (Bytes, StoredEvent) {
        let decoded = crate::decode::decode(body).unwrap();
        let deviations: Vec<Deviation> = decoded.deviations.clone();
        let old = crate::gateway::stored_event(
            &decoded.envelope,
            Bytes::copy_from_slice(body),
            &deviations,
        );
        let (payload, _, _) = crate::gateway::stored_record(
            decoded.envelope,
            Bytes::copy_from_slice(body),
            deviations,
            crate::fit::DEFAULT_MAX_EVENT_BYTES,
        )
        .unwrap();
        (payload, old)
    }

    #[test]
    fn a_compact_record_reads_back_as_the_earlier_form_held_it_and_smaller() {
        for fixture in FIXTURES {
            // On one line, as the vendor sends it.
            let compact_json = serde_json::from_slice::<serde_json::Value>(fixture)
                .unwrap()
                .to_string();
            let body = compact_json.as_bytes();
            let (payload, old) = compact(body);
            assert!(is_compact(&payload));
            assert!(!is_compact(&old.encode_to_vec()));
            assert_eq!(
                stored(payload.clone()).unwrap(),
                old,
                "the same parts, byte for byte"
            );
            assert_eq!(keys(&payload).unwrap(), old.keys.clone().unwrap());
            // What a filtered catch-up reads from the borrowed payload, without decompressing.
            assert_eq!(
                crate::wire::keys_of(&payload),
                Some(old.keys.clone().unwrap())
            );
            assert_eq!(
                crate::wire::keys_of(&old.encode_to_vec()),
                Some(old.keys.clone().unwrap())
            );
            // A catch-up budget counts what the record holds once decompressed.
            let content = stored(payload.clone()).unwrap();
            assert!(
                held_len(&payload)
                    >= content.envelope.len() + content.raw_json.len() + content.deviations.len(),
                "held {} for a record of {}",
                held_len(&payload),
                payload.len()
            );
            assert_eq!(held_len(&old.encode_to_vec()), old.encoded_len());
            // The dictionary at work: a quarter of the body at most (0.66 without it).
            assert!(
                payload.len() * 4 < compact_json.len(),
                "{} bytes for a body of {}",
                payload.len(),
                compact_json.len()
            );
            // The earlier form reads as it did.
            let legacy = Bytes::from(old.encode_to_vec());
            assert_eq!(stored(legacy.clone()).unwrap(), old);
            assert!(matches!(identity(&legacy).unwrap(), Identity::Legacy(_)));
            let Identity::Digests(digests, _) = identity(&payload).unwrap() else {
                panic!("a compact record has digests");
            };
            let chat_event = crate::pb::webhook::v1::Envelope::decode(old.envelope.clone())
                .unwrap()
                .chat_event
                .unwrap()
                .encode_to_vec();
            let again = Digests::of(body, &old.envelope, &chat_event);
            assert_eq!(again.same_event(&digests), Some(true));
            assert_eq!(again.same_chat_event(&digests), Some(true));
            let other = Digests::of(b"{}", b"other", b"another");
            assert_eq!(other.same_event(&digests), Some(false));
            assert_eq!(other.same_chat_event(&digests), Some(false));
            // The same ChatEvent with other Rels: refreshed.
            let refreshed = Digests::of(b"{}", b"other", &chat_event);
            assert_eq!(refreshed.same_event(&digests), Some(false));
            assert_eq!(refreshed.same_chat_event(&digests), Some(true));
            let retyped = Digests {
                typing: digests.typing ^ 1,
                ..other
            };
            assert_eq!(retyped.same_event(&digests), None, "other protos: decode");
            assert_eq!(retyped.same_chat_event(&digests), None);
            // A record kept before ChatEvent digests: only a decode tells.
            let older = Digests {
                chat_event: None,
                ..digests.clone()
            };
            assert_eq!(refreshed.same_chat_event(&older), None);
        }
    }

    #[test]
    fn a_record_compressed_without_the_dictionary_reads_too() {
        let (payload, old) = compact(FIXTURES[0]);
        let mut outer = super::outer(&payload).unwrap();
        let content = match outer.codec {
            CODEC_ZSTD_DICTIONARY_1 => zstd::bulk::Decompressor::with_dictionary(DICTIONARY_1)
                .unwrap()
                .decompress(&outer.content, outer.content_len as usize)
                .unwrap(),
            codec => panic!("written with codec {codec}"),
        };
        outer.codec = CODEC_ZSTD;
        outer.content = zstd::bulk::compress(&content, 3).unwrap().into();
        assert_eq!(stored(seal(&outer)).unwrap(), old);
        outer.codec = CODEC_NONE;
        outer.content = content.into();
        assert_eq!(stored(seal(&outer)).unwrap(), old);
    }

    #[test]
    fn a_record_of_the_first_compact_version_without_a_checksum_reads_as_it_did() {
        let (payload, old) = compact(FIXTURES[0]);
        let mut first = vec![MARK, VERSION_1];
        super::outer(&payload).unwrap().encode(&mut first).unwrap();
        let first = Bytes::from(first);
        assert_eq!(stored(first.clone()).unwrap(), old);
        assert_eq!(keys(&first).unwrap(), old.keys.clone().unwrap());
        assert_eq!(crate::wire::keys_of(&first), old.keys);
        assert!(matches!(identity(&first).unwrap(), Identity::Digests(..)));
    }

    #[test]
    fn the_mark_and_version_bytes_changed_are_never_read_as_others() {
        for fixture in FIXTURES {
            let (payload, old) = compact(fixture);
            for at in 0..2 {
                for flip in 1..=255u8 {
                    let mut damaged = payload.to_vec();
                    damaged[at] ^= flip;
                    // Read, it can only be the event as written (a version 2 record taken for a
                    // version 1 one still holds its content).
                    if let Ok(read) = stored(Bytes::from(damaged)) {
                        assert_eq!(read, old, "byte {at} changed by {flip:#x}");
                    }
                }
            }
        }
    }

    proptest::proptest! {
        /// A record is found at its start whatever follows it, and its length is exact; cut
        /// short, it needs more; a byte changed, it is not one.
        #[test]
        fn a_sealed_record_is_found_by_its_checksum_alone(
            fixture in 0..2usize,
            after in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            cut in proptest::num::usize::ANY,
            at in proptest::num::usize::ANY,
        ) {
            let (payload, _) = compact(FIXTURES[fixture]);
            let mut bytes = payload.to_vec();
            bytes.extend_from_slice(&after);
            proptest::prop_assert_eq!(sealed_len(&bytes), Sealed::Found(payload.len()));
            let cut = cut % payload.len();
            proptest::prop_assert!(
                matches!(sealed_len(&bytes[..cut]), Sealed::NeedMore(_) | Sealed::No),
                "cut at {}", cut
            );
            let mut damaged = payload.to_vec();
            let at = at % damaged.len();
            damaged[at] ^= 0x40;
            proptest::prop_assert_ne!(sealed_len(&damaged), Sealed::Found(payload.len()));
        }

        /// Whatever byte of a record is changed (the keys and digests outside the compressed
        /// content included, and content stored uncompressed), no read takes it for whole: the
        /// content, the keys, the identity are errors, and a filter keeps it (to be reported).
        #[test]
        fn any_changed_byte_of_a_record_is_found_by_every_read(
            fixture in 0..2usize,
            uncompressed in proptest::bool::ANY,
            at in proptest::num::usize::ANY,
            flip in 1..=255u8,
        ) {
            let (mut payload, _) = compact(FIXTURES[fixture]);
            if uncompressed {
                let mut outer = super::outer(&payload).unwrap();
                let Ok(content) = super::read(payload.clone()) else { unreachable!() };
                let parts = super::content(&Parts {
                    envelope: &content.envelope,
                    raw_json: &content.raw_json,
                    keys: &content.keys.clone().unwrap_or_default(),
                    deviations: &content.deviations,
                    references: &crate::decode::indices(
                        &crate::pb::webhook::v1::Envelope::decode(content.envelope.clone()).unwrap(),
                    ),
                    digests: &Digests::of(&content.raw_json, &content.envelope, b""),
                });
                outer.codec = CODEC_NONE;
                outer.content_len = parts.len() as u64;
                outer.content = parts.into();
                payload = seal(&outer);
                proptest::prop_assert!(stored(payload.clone()).is_ok());
            }
            let mut damaged = payload.to_vec();
            // The mark and version: `the_mark_and_version_bytes_changed_are_never_read_as_others`.
            let at = 2 + at % (damaged.len() - 2);
            damaged[at] ^= flip;
            let damaged = Bytes::from(damaged);
            proptest::prop_assert!(stored(damaged.clone()).is_err(), "byte {} of {}", at, payload.len());
            proptest::prop_assert!(keys(&damaged).is_err());
            proptest::prop_assert!(identity(&damaged).is_err());
            proptest::prop_assert!(crate::wire::keys_of(&damaged).is_none());
        }
    }

    /// A record cut to nothing (its value cut to the store's 16-byte header) or to zeros is
    /// damaged, never an empty event that a filter passes over (found from outside).
    #[test]
    fn an_empty_or_zeroed_record_is_damaged_not_an_empty_event() {
        for len in 0..=64 {
            let zeros = Bytes::from(vec![0u8; len]);
            assert!(stored(zeros.clone()).is_err(), "{len} zeros");
            assert!(keys(&zeros).is_err(), "{len} zeros");
            assert!(identity(&zeros).is_err(), "{len} zeros");
            assert_eq!(crate::wire::keys_of(&zeros), None, "{len} zeros");
        }
        let (_, old) = compact(FIXTURES[0]);
        let legacy = Bytes::from(old.encode_to_vec());
        for cut in 0..legacy.len().min(64) {
            let cut = legacy.slice(..cut);
            if let Ok(read) = stored(cut.clone()) {
                assert!(
                    !read.envelope.is_empty() || !read.raw_json.is_empty(),
                    "a record of {} bytes",
                    cut.len()
                );
            }
        }
    }

    #[test]
    fn damaged_or_newer_records_are_errors_never_panics() {
        let (payload, _) = compact(FIXTURES[1]);
        let mut newer = payload.to_vec();
        newer[1] = VERSION + 1;
        let error = stored(Bytes::from(newer)).unwrap_err();
        assert!(error.0.contains("newer release"), "{error}");
        for cut in [1, 2, 10, payload.len() / 2, payload.len() - 1] {
            assert!(stored(payload.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut seed = 7u64;
        for _ in 0..500 {
            let mut bytes = payload.to_vec();
            for _ in 0..3 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = 2 + (seed as usize) % (bytes.len() - 2);
                bytes[at] ^= (seed >> 32) as u8 | 1;
            }
            let _ = stored(Bytes::from(bytes));
        }
    }
}

/// Trains [`DICTIONARY_1`] (run once; the file is shipped, never changed):
/// `cargo test --lib wire::record::train -- --ignored`.
#[cfg(test)]
mod train {
    use super::*;

    /// Event types the vendor sends.
    const TYPES: [&str; 10] = [
        "chat_created",
        "chat_closed",
        "chat_assigned",
        "message_created",
        "message_read",
        "message_received",
        "system_message_created",
        "chat_changed",
        "member_added",
        "typing",
    ];

    /// Words of texts, not those of the benchmark's mix.
    const WORDS: [&str; 16] = [
        "добрый",
        "день",
        "у",
        "меня",
        "вопрос",
        "по",
        "тарифу",
        "счёт",
        "the",
        "app",
        "crashes",
        "when",
        "I",
        "open",
        "it",
        "спасибо",
    ];

    fn samples() -> Vec<Vec<u8>> {
        let root = env!("CARGO_MANIFEST_DIR");
        let sources: Vec<serde_json::Value> = [
            "../shared/fixtures/chat_closed.json",
            "../shared/fixtures/message_created_file.json",
            "tests/data/every_field.json",
        ]
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(format!("{root}/{path}")).expect(path);
            serde_json::from_str(&text).expect("JSON")
        })
        .collect();
        let mut seed = 0x1234_5678_9abc_def1u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut out = Vec::new();
        for i in 0..3000u64 {
            let mut body = sources[(i % 3) as usize].clone();
            body["ChatEvent"]["Id"] = (next() % 1_000_000_000).into();
            body["ChatEvent"]["Type"] = TYPES[(next() % 10) as usize].into();
            body["ChatEvent"]["CreatedAt"] = (1_600_000_000_000 + next() % 100_000_000_000).into();
            if let Some(messages) = body["Rels"]["ChatMessages"].as_array_mut() {
                for message in messages {
                    let words = next() % 40;
                    let text: Vec<&str> =
                        (0..words).map(|_| WORDS[(next() % 16) as usize]).collect();
                    message["Text"] = text.join(" ").into();
                    message["Id"] = (next() % 10_000_000).into();
                }
            }
            if next() % 4 == 0 {
                let chats = body["Rels"]["Chats"].clone();
                body["Rels"] = serde_json::json!({ "Chats": chats });
            }
            let raw = body.to_string().into_bytes();
            let Ok(decoded) = crate::decode::decode(&raw) else {
                continue;
            };
            let envelope = decoded.envelope.encode_to_vec();
            let keys = crate::decode::keys(&decoded.envelope);
            let indices = crate::decode::indices(&decoded.envelope);
            let chat_event = decoded
                .envelope
                .chat_event
                .as_ref()
                .map(prost::Message::encode_to_vec)
                .unwrap_or_default();
            let digests = Digests::of(&raw, &envelope, &chat_event);
            out.push(content(&Parts {
                envelope: &envelope,
                raw_json: &raw,
                keys: &keys,
                deviations: &[],
                references: &indices,
                digests: &digests,
            }));
        }
        out
    }

    #[test]
    #[ignore = "writes the shipped dictionary: run once, by hand"]
    fn train() {
        let dictionary = zstd::dict::from_samples(&samples(), 16 * 1024).expect("trained");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/wire/dictionary-1.zstd-dict"
        );
        std::fs::write(path, dictionary).expect("written");
    }
}
