//! The tolerant decode (DESIGN invariant 7): reads any JSON body into the typed messages, field by
//! field from the protos' descriptors, and reports what did not fit as [`Deviation`]s instead of
//! refusing the event.
//!
//! It runs only when the fast, strict decode (serde derives on the generated messages) refuses a
//! body, so a body that fits the protos costs nothing here. It walks the body's JSON text once
//! (a cursor over text serde_json has checked first): a number is never converted before its
//! field's kind is known (ids beyond 2^53 stay exact, `1e400` in an unknown field is no error), a
//! number coerced to a string keeps its JSON text, and unknown fields are skipped without being
//! read. What it keeps is written straight in the protobuf wire format, read into the
//! [`Envelope`] by prost at the end: the cost is linear in the body, a small factor of the strict
//! decode's. A field's path (`Rels.Chats[0].Id`) is a stack of segments borrowed from the body,
//! spelled out (and cut to [`MAX_ERROR_TEXT`] bytes) only for a deviation that is reported.
//!
//! Rules, for a field of the proto:
//! - `null` leaves it unset (its default), as the fast decode does: not a deviation;
//! - a lossless coercion sets it and is reported as [`Outcome::Coerced`]: an integer-valued number
//!   (`1.0`, `1e2`) or a decimal string (`"84"`) to an integer field, `0`/`1` or
//!   `"true"`/`"false"` to a bool, a number to a string field (its JSON text), a numeric string to
//!   a floating-point field;
//! - anything else leaves it unset and is reported as [`Outcome::Dropped`]; a list item that is
//!   not an object drops that item only; a repeated field that is not a list drops the field;
//! - a `google.protobuf.Value` nested deeper than stock decoders read ([`MAX_VALUE_DEPTH`]) is cut
//!   to `null` there and reported as [`Outcome::Cut`] (DESIGN invariant 9).
//!
//! At most [`MAX_DEVIATIONS`] deviations, of [`MAX_DEVIATION_BYTES`] in all, are reported per
//! event; a last one counts the others. The raw JSON, stored verbatim beside the typed message,
//! keeps everything.

use std::borrow::Cow;
use std::ops::Range;
use std::sync::LazyLock;

use prost::encoding::{encode_key, encode_varint, WireType};
use prost::Message as _;
use prost_reflect::{DescriptorPool, FieldDescriptor, Kind, MessageDescriptor};
use serde::de::Visitor;

use super::{Deviation, Outcome, MAX_DEVIATIONS, MAX_DEVIATION_BYTES, MAX_ERROR_TEXT};
use crate::pb::webhook::v1::Envelope;

/// The webhook messages' descriptors, read once from the descriptor set built into the binary.
static POOL: LazyLock<DescriptorPool> = LazyLock::new(|| {
    DescriptorPool::decode(crate::pb::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set built into the binary decodes")
});

/// Protobuf nesting levels that a `google.protobuf.Value` may take, counting itself. Stock decoders
/// (prost, protobuf-python, Go, Java) stop at 100 levels of nested messages in all; a Value sits at
/// most 8 levels below a streamed `Event`, and a JSON array costs 2 levels (`ListValue`, `Value`),
/// an object 3 (`Struct`, its map entry, `Value`). 64 leaves a margin for clients that wrap the
/// event once more.
pub const MAX_VALUE_DEPTH: usize = 64;

/// Why the tolerant decode refused the body (all else is a deviation).
#[derive(Debug)]
pub(super) enum Refusal {
    /// The text is not JSON: the caller explains it with the field path and position.
    Syntax,
    /// A field the gateway needs is missing or unusable.
    Invalid(super::DecodeError),
}

/// What the tolerant decode made of a body: the typed envelope and what did not fit.
pub(super) struct Tolerated {
    pub envelope: Envelope,
    pub deviations: Vec<Deviation>,
}

/// What one decode did beyond reading the body: what tests of its cost count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Work {
    /// Bytes of field paths and patterns spelled out (for reported deviations only).
    pub path_bytes: usize,
    /// Bytes of protobuf written for prost to read.
    pub encoded_bytes: usize,
}

/// Decodes `text` (a JSON object) tolerantly. The caller then validates what the gateway needs.
pub(super) fn decode(text: &str) -> Result<Tolerated, Refusal> {
    decode_counting(text).map(|(tolerated, _)| tolerated)
}

/// [`decode`], and what it cost.
pub(super) fn decode_counting(text: &str) -> Result<(Tolerated, Work), Refusal> {
    // The walk below trusts the grammar: serde_json checks it first (without converting
    // anything, so `1e400` is no error here).
    serde_json::from_str::<serde::de::IgnoredAny>(text).map_err(|_| Refusal::Syntax)?;
    let mut cursor = Cursor { text, at: 0 };
    if cursor.peek() != Some(b'{') {
        return Err(Refusal::Invalid(super::DecodeError::at(
            ".",
            "expected a JSON object",
        )));
    }
    let descriptor = POOL
        .get_message_by_name("iqchannels.webhook.v1.Envelope")
        .expect("the Envelope is in the built-in descriptor set");
    let mut walk = Walk::default();
    let mut out = Vec::with_capacity(text.len());
    walk.message(&mut cursor, &descriptor, &mut out)?;
    walk.work.encoded_bytes = out.len();
    let envelope = Envelope::decode(out.as_slice()).map_err(|error| {
        Refusal::Invalid(super::DecodeError::at(
            ".",
            format!("internal error: the typed event does not decode: {error}"),
        ))
    })?;
    let mut deviations = walk.deviations;
    if walk.omitted > 0 {
        deviations.push(Deviation {
            path: ".".to_owned(),
            expected: format!(
                "at most {MAX_DEVIATIONS} deviations ({MAX_DEVIATION_BYTES} bytes) reported per \
                 event"
            ),
            found: format!("{} more", walk.omitted),
            outcome: Outcome::Dropped,
            pattern: ".".to_owned(),
        });
    }
    Ok((
        Tolerated {
            envelope,
            deviations,
        },
        walk.work,
    ))
}

/// Whether `value`, as a `google.protobuf.Value`, nests within [`MAX_VALUE_DEPTH`] (the fast
/// decode refuses a body otherwise, and this decode cuts it).
pub(super) fn depth_fits(value: &serde_json::Value) -> bool {
    fn levels(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::Array(items) => 2 + items.iter().map(levels).max().unwrap_or(0),
            serde_json::Value::Object(fields) => 3 + fields.values().map(levels).max().unwrap_or(0),
            _ => 0,
        }
    }
    // The outer Value is level 1.
    levels(value) < MAX_VALUE_DEPTH
}

/// One JSON value at the cursor: a scalar already read, or the kind of container that starts
/// there (not read yet: walked or skipped by the caller).
enum Json<'a> {
    Null,
    Bool(bool),
    /// The number's exact JSON text.
    Number(&'a str),
    String(Cow<'a, str>),
    /// A string that held an unpaired UTF-16 surrogate escape (`"\ud800"`), which no Rust or
    /// protobuf string can hold: each one replaced by U+FFFD.
    Replaced(String),
    Array,
    Object,
}

impl Json<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number(_) => "a number",
            Json::String(_) => "a string",
            Json::Replaced(_) => "a string with an unpaired surrogate",
            Json::Array => "an array",
            Json::Object => "an object",
        }
    }

    fn is_container(&self) -> bool {
        matches!(self, Json::Array | Json::Object)
    }
}

/// A string or key: borrowed from the body unless it had escapes.
struct Str<'a> {
    text: Cow<'a, str>,
    replaced: bool,
}

/// A position in JSON text that serde_json has checked: the walk reads each byte once. Should
/// the text break the grammar after all, it says [`Refusal::Syntax`], never panics.
struct Cursor<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    /// The next byte that is not whitespace (the cursor moved onto it).
    fn peek(&mut self) -> Option<u8> {
        let bytes = self.text.as_bytes();
        while let Some(&byte) = bytes.get(self.at) {
            if !matches!(byte, b' ' | b'\n' | b'\r' | b'\t') {
                return Some(byte);
            }
            self.at += 1;
        }
        None
    }

    /// Steps over `byte` (the next one that is not whitespace).
    fn open(&mut self, byte: u8) -> Result<(), Refusal> {
        if self.peek() != Some(byte) {
            return Err(Refusal::Syntax);
        }
        self.at += 1;
        Ok(())
    }

    /// Inside an object: the next entry's key (the cursor then on its value), or `None` past
    /// the closing brace.
    fn next_key(&mut self, first: &mut bool) -> Result<Option<Str<'a>>, Refusal> {
        if !self.next(first, b'}')? {
            return Ok(None);
        }
        let key = self.string()?;
        self.open(b':')?;
        Ok(Some(key))
    }

    /// Inside an array: whether another item follows (the cursor then on it).
    fn next_item(&mut self, first: &mut bool) -> Result<bool, Refusal> {
        self.next(first, b']')
    }

    fn next(&mut self, first: &mut bool, close: u8) -> Result<bool, Refusal> {
        match self.peek() {
            Some(byte) if byte == close => {
                self.at += 1;
                Ok(false)
            }
            Some(b',') if !*first => {
                self.at += 1;
                Ok(true)
            }
            Some(_) if *first => {
                *first = false;
                Ok(true)
            }
            _ => Err(Refusal::Syntax),
        }
    }

    /// The value at the cursor: a scalar is read, a container only recognised.
    fn value(&mut self) -> Result<Json<'a>, Refusal> {
        Ok(match self.peek() {
            Some(b'{') => Json::Object,
            Some(b'[') => Json::Array,
            Some(b'"') => {
                let string = self.string()?;
                match string.text {
                    Cow::Owned(text) if string.replaced => Json::Replaced(text),
                    text => Json::String(text),
                }
            }
            Some(b'n') => self.literal("null", Json::Null)?,
            Some(b't') => self.literal("true", Json::Bool(true))?,
            Some(b'f') => self.literal("false", Json::Bool(false))?,
            Some(_) => {
                let start = self.at;
                let bytes = self.text.as_bytes();
                while matches!(
                    bytes.get(self.at),
                    Some(b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E')
                ) {
                    self.at += 1;
                }
                if self.at == start {
                    return Err(Refusal::Syntax);
                }
                Json::Number(&self.text[start..self.at])
            }
            None => return Err(Refusal::Syntax),
        })
    }

    fn literal(&mut self, word: &str, json: Json<'a>) -> Result<Json<'a>, Refusal> {
        let rest = self.text.as_bytes().get(self.at..).unwrap_or_default();
        if !rest.starts_with(word.as_bytes()) {
            return Err(Refusal::Syntax);
        }
        self.at += word.len();
        Ok(json)
    }

    /// The JSON string at the cursor, with its quotes; and whether it has escapes.
    fn raw_string(&mut self) -> Result<(&'a str, bool), Refusal> {
        if self.peek() != Some(b'"') {
            return Err(Refusal::Syntax);
        }
        let bytes = self.text.as_bytes();
        let start = self.at;
        let mut at = start + 1;
        let mut escaped = false;
        loop {
            match bytes.get(at) {
                Some(b'"') => break,
                Some(b'\\') => {
                    escaped = true;
                    at += 2;
                }
                Some(_) => at += 1,
                None => return Err(Refusal::Syntax),
            }
        }
        self.at = at + 1;
        let raw = self.text.get(start..at + 1).ok_or(Refusal::Syntax)?;
        Ok((raw, escaped))
    }

    /// The JSON string at the cursor, unescaped (by serde_json) only when it has escapes.
    fn string(&mut self) -> Result<Str<'a>, Refusal> {
        let (raw, escaped) = self.raw_string()?;
        if !escaped {
            return Ok(Str {
                text: Cow::Borrowed(&raw[1..raw.len() - 1]),
                replaced: false,
            });
        }
        let text: Text = serde_json::from_str(raw).map_err(|_| Refusal::Syntax)?;
        Ok(Str {
            text: Cow::Owned(text.text),
            replaced: text.replaced,
        })
    }

    /// Steps over the value at the cursor without reading it.
    fn skip(&mut self) -> Result<(), Refusal> {
        if !matches!(self.peek(), Some(b'{' | b'[')) {
            return self.value().map(drop);
        }
        let bytes = self.text.as_bytes();
        let mut depth = 0usize;
        loop {
            match bytes.get(self.at) {
                Some(b'"') => {
                    self.raw_string()?;
                    continue;
                }
                Some(b'{' | b'[') => depth += 1,
                Some(b'}' | b']') => {
                    depth = depth.checked_sub(1).ok_or(Refusal::Syntax)?;
                    if depth == 0 {
                        self.at += 1;
                        return Ok(());
                    }
                }
                Some(_) => {}
                None => return Err(Refusal::Syntax),
            }
            self.at += 1;
        }
    }

    /// Steps over `json` if it is a container not walked.
    fn discard(&mut self, json: &Json<'_>) -> Result<(), Refusal> {
        if json.is_container() {
            self.skip()
        } else {
            Ok(())
        }
    }
}

/// A JSON string or key as text: an unpaired UTF-16 surrogate escape, which JSON allows and no
/// Rust or protobuf string can hold, becomes U+FFFD (`replaced`); the raw JSON keeps the escape.
pub(super) struct Text {
    pub text: String,
    pub replaced: bool,
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // serde_json hands over a string's bytes unchecked: UTF-8, with an unpaired surrogate
        // encoded as WTF-8.
        deserializer.deserialize_bytes(TextVisitor)
    }
}

struct TextVisitor;

impl Visitor<'_> for TextVisitor {
    type Value = Text;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON string")
    }

    fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Text, E> {
        Ok(Text {
            text: text.to_owned(),
            replaced: false,
        })
    }

    fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<Text, E> {
        Ok(from_wtf8(bytes))
    }
}

/// UTF-8 text from WTF-8: each encoded surrogate (`ED A0..BF 80..BF`) becomes one U+FFFD, as
/// does any other invalid sequence (serde_json makes none).
pub(super) fn from_wtf8(mut bytes: &[u8]) -> Text {
    let mut text = String::with_capacity(bytes.len());
    let mut replaced = false;
    loop {
        match std::str::from_utf8(bytes) {
            Ok(valid) => {
                text.push_str(valid);
                return Text { text, replaced };
            }
            Err(error) => {
                let (valid, rest) = bytes.split_at(error.valid_up_to());
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                text.push(char::REPLACEMENT_CHARACTER);
                replaced = true;
                let surrogate = matches!(rest, [0xED, 0xA0..=0xBF, 0x80..=0xBF, ..]);
                let skip = if surrogate {
                    3
                } else {
                    error.error_len().unwrap_or(rest.len())
                };
                bytes = &rest[skip..];
            }
        }
    }
}

/// One step of a field's path: a key (borrowed from the body) or an array index.
enum Segment<'a> {
    Key(Cow<'a, str>),
    Index(usize),
}

/// Text of at most [`MAX_ERROR_TEXT`] bytes, built piece by piece: what does not fit is never
/// copied, and a cut is marked with `…`, as error texts are.
#[derive(Default)]
struct Bounded {
    text: String,
    cut: bool,
}

impl Bounded {
    fn push(&mut self, piece: &str) {
        if self.cut {
            return;
        }
        let room = MAX_ERROR_TEXT - self.text.len();
        if piece.len() <= room {
            self.text.push_str(piece);
            return;
        }
        let mut end = room;
        while !piece.is_char_boundary(end) {
            end -= 1;
        }
        self.text.push_str(&piece[..end]);
        self.cut = true;
    }

    fn finish(mut self) -> String {
        if self.cut {
            self.text.push('…');
        }
        self.text
    }
}

/// The state of one decode: where it is and the deviations found so far.
#[derive(Default)]
struct Walk<'a> {
    /// The path of the value being read.
    path: Vec<Segment<'a>>,
    deviations: Vec<Deviation>,
    /// Bytes of the deviations' paths and texts reported so far.
    deviation_bytes: usize,
    /// Deviations past [`MAX_DEVIATIONS`] or [`MAX_DEVIATION_BYTES`], counted only.
    omitted: usize,
    /// Inside an opaque value or a map: the pattern of that field, for every deviation below it
    /// (their paths hold keys chosen by the sender).
    within: Option<String>,
    work: Work,
}

impl<'a> Walk<'a> {
    /// The current path, spelled out and cut to [`MAX_ERROR_TEXT`] bytes.
    fn path(&mut self) -> String {
        let mut out = Bounded::default();
        for (i, segment) in self.path.iter().enumerate() {
            if out.cut {
                break;
            }
            match segment {
                Segment::Key(key) => {
                    if i > 0 {
                        out.push(".");
                    }
                    out.push(key);
                }
                Segment::Index(index) => out.push(&format!("[{index}]")),
            }
        }
        let path = out.finish();
        self.work.path_bytes += path.len();
        path
    }

    /// The current path with array indices removed (`Rels.ChatMessages[].NoticeId`): outside
    /// maps and opaque values, a path of the protos' field names.
    fn pattern(&mut self) -> String {
        let mut out = Bounded::default();
        for (i, segment) in self.path.iter().enumerate() {
            match segment {
                Segment::Key(key) => {
                    if i > 0 {
                        out.push(".");
                    }
                    out.push(key);
                }
                Segment::Index(_) => out.push("[]"),
            }
        }
        let pattern = out.finish();
        self.work.path_bytes += pattern.len();
        pattern
    }

    fn deviate(&mut self, expected: &str, found: &str, outcome: Outcome) {
        if self.deviations.len() >= MAX_DEVIATIONS || self.deviation_bytes >= MAX_DEVIATION_BYTES {
            self.omitted += 1;
            return;
        }
        let path = self.path();
        let size = path.len() + expected.len() + found.len();
        if self.deviation_bytes + size > MAX_DEVIATION_BYTES {
            // Full: this one and every later one are counted only.
            self.deviation_bytes = MAX_DEVIATION_BYTES;
            self.omitted += 1;
            return;
        }
        self.deviation_bytes += size;
        let pattern = match &self.within {
            Some(pattern) => pattern.clone(),
            None => self.pattern(),
        };
        self.deviations.push(Deviation {
            path,
            expected: expected.to_owned(),
            found: found.to_owned(),
            outcome,
            pattern,
        });
    }

    /// A string whose unpaired surrogates were replaced by U+FFFD.
    fn replaced(&mut self) {
        self.deviate(
            "a string",
            "a string with an unpaired surrogate",
            Outcome::Replaced,
        );
    }

    /// A key (the last segment of the path) whose unpaired surrogates were replaced by U+FFFD.
    fn replaced_key(&mut self) {
        self.deviate(
            "a key",
            "a key with an unpaired surrogate",
            Outcome::Replaced,
        );
    }

    /// Runs `f` with deviations below the current path labelled with its pattern.
    fn within<T>(&mut self, f: impl FnOnce(&mut Self) -> T) -> T {
        let outer = self.within.take();
        let pattern = match &outer {
            Some(pattern) => pattern.clone(),
            None => self.pattern(),
        };
        self.within = Some(pattern);
        let result = f(self);
        self.within = outer;
        result
    }

    /// The object at the cursor as a message of `descriptor`, its fields appended to `out`.
    fn message(
        &mut self,
        cursor: &mut Cursor<'a>,
        descriptor: &MessageDescriptor,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        // Where each field was written; a key given again removes what it wrote before.
        let mut written: Vec<(u32, Range<usize>)> = Vec::new();
        let mut removed: Vec<Range<usize>> = Vec::new();
        cursor.open(b'{')?;
        let mut first = true;
        while let Some(key) = cursor.next_key(&mut first)? {
            let respelled = match descriptor.get_field_by_json_name(&key.text) {
                Some(field) => Some((field, None)),
                None => super::respelling(descriptor.full_name(), &key.text).and_then(|usual| {
                    Some((descriptor.get_field_by_json_name(usual)?, Some(usual)))
                }),
            };
            let Some((field, usual)) = respelled else {
                // Unknown to the proto: kept in the raw JSON only. A key with an unpaired
                // surrogate (no field's name) is reported, as the strict decode refuses it.
                if key.replaced {
                    // Labelled `ChatEvent.*` (or by the enclosing map or opaque field): the key
                    // is the sender's, and labels stay bounded.
                    let pattern = match &self.within {
                        Some(pattern) => pattern.clone(),
                        None if self.path.is_empty() => "*".to_owned(),
                        None => format!("{}.*", self.pattern()),
                    };
                    let outer = self.within.replace(pattern);
                    self.path.push(Segment::Key(key.text));
                    self.replaced_key();
                    self.path.pop();
                    self.within = outer;
                }
                cursor.skip()?;
                continue;
            };
            // A respelling: the path names the key as sent (one of a few short, known
            // spellings), the field is typed as if spelled as usual.
            let found = usual.map(|_| format!("the key {:?}", key.text));
            self.path.push(Segment::Key(key.text));
            if let (Some(usual), Some(found)) = (usual, found) {
                self.deviate(&format!("the key {usual:?}"), &found, Outcome::Respelled);
            }
            let number = field.number();
            let earlier = written.iter().position(|(n, _)| *n == number);
            if let Some(i) = earlier {
                self.deviate(
                    "the key once",
                    "a duplicate key (the last one is kept)",
                    Outcome::Dropped,
                );
                removed.push(written[i].1.clone());
            }
            let start = out.len();
            self.field(cursor, &field, out)?;
            let range = start..out.len();
            match earlier {
                Some(i) => written[i].1 = range,
                None => written.push((number, range)),
            }
            self.path.pop();
        }
        remove(out, removed);
        Ok(())
    }

    /// The value at the cursor as `field`.
    fn field(
        &mut self,
        cursor: &mut Cursor<'a>,
        field: &FieldDescriptor,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let json = cursor.value()?;
        if matches!(json, Json::Null) {
            return Ok(());
        }
        if field.is_map() {
            return self.within(|walk| walk.map(cursor, field, json, out));
        }
        if field.is_list() {
            let Json::Array = json else {
                self.deviate("a list", json.kind(), Outcome::Dropped);
                return cursor.discard(&json);
            };
            let kind = field.kind();
            cursor.open(b'[')?;
            let (mut first, mut index) = (true, 0);
            while cursor.next_item(&mut first)? {
                self.path.push(Segment::Index(index));
                let item = cursor.value()?;
                if matches!(item, Json::Null) {
                    self.deviate(expected(&kind), "null", Outcome::Dropped);
                } else {
                    self.single(cursor, &kind, item, field.number(), out)?;
                }
                self.path.pop();
                index += 1;
            }
            return Ok(());
        }
        self.single(cursor, &field.kind(), json, field.number(), out)
            .map(drop)
    }

    fn map(
        &mut self,
        cursor: &mut Cursor<'a>,
        field: &FieldDescriptor,
        json: Json<'a>,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        let (Json::Object, Kind::Message(entry)) = (&json, field.kind()) else {
            self.deviate("an object", json.kind(), Outcome::Dropped);
            return cursor.discard(&json);
        };
        let key_kind = entry.map_entry_key_field().kind();
        let value_kind = entry.map_entry_value_field().kind();
        cursor.open(b'{')?;
        let mut first = true;
        while let Some(key) = cursor.next_key(&mut first)? {
            let start = out.len();
            let length = open(out, field.number());
            let known = map_key(&key_kind, &key.text, out);
            self.path.push(Segment::Key(key.text));
            if key.replaced {
                self.replaced_key();
            }
            let value = if known {
                cursor.value()?
            } else {
                self.deviate("a key of the map's kind", "another key", Outcome::Dropped);
                cursor.skip()?;
                Json::Null
            };
            let kept =
                !matches!(value, Json::Null) && self.single(cursor, &value_kind, value, 2, out)?;
            if kept {
                close(out, length)?;
            } else {
                out.truncate(start);
            }
            self.path.pop();
        }
        Ok(())
    }

    /// One value of `kind` (not null) as field `number`; whether it was kept.
    fn single(
        &mut self,
        cursor: &mut Cursor<'a>,
        kind: &Kind,
        json: Json<'a>,
        number: u32,
        out: &mut Vec<u8>,
    ) -> Result<bool, Refusal> {
        if let Kind::Message(descriptor) = kind {
            if descriptor.full_name() == "google.protobuf.Value" {
                let length = open(out, number);
                self.within(|walk| walk.opaque(cursor, json, 1, out))?;
                close(out, length)?;
                return Ok(true);
            }
            if let Json::Object = json {
                let length = open(out, number);
                self.message(cursor, descriptor, out)?;
                close(out, length)?;
                return Ok(true);
            }
        }
        let found = json.kind();
        let (value, coerced) = match (kind, &json) {
            (Kind::Bool, Json::Bool(b)) => (Some(Scalar::Varint(u64::from(*b))), false),
            (Kind::Bool, Json::Number(text)) => match exact_integer(text) {
                Some(n @ (0 | 1)) => (Some(Scalar::Varint(n as u64)), true),
                _ => (None, false),
            },
            (Kind::Bool, Json::String(s)) => match s.as_ref() {
                "true" => (Some(Scalar::Varint(1)), true),
                "false" => (Some(Scalar::Varint(0)), true),
                _ => (None, false),
            },
            (Kind::String, Json::String(s)) => (Some(Scalar::Bytes(s.as_bytes())), false),
            (Kind::String, Json::Replaced(s)) => {
                self.replaced();
                write(out, number, Scalar::Bytes(s.as_bytes()));
                return Ok(true);
            }
            (Kind::String, Json::Number(text)) => (Some(Scalar::Bytes(text.as_bytes())), true),
            (Kind::Double | Kind::Float, Json::Number(text)) => (float(kind, text), false),
            (Kind::Double | Kind::Float, Json::String(s)) => (float(kind, s), true),
            (Kind::Bytes, Json::String(s)) => (Some(Scalar::Bytes(s.as_bytes())), true),
            (Kind::Enum(descriptor), Json::String(s)) => (
                descriptor
                    .get_value_by_name(s)
                    .map(|value| Scalar::Varint(i64::from(value.number()) as u64)),
                false,
            ),
            (Kind::Enum(_), Json::Number(text)) => (
                exact_integer(text)
                    .and_then(|n| i32::try_from(n).ok())
                    .map(|n| Scalar::Varint(i64::from(n) as u64)),
                true,
            ),
            (Kind::Message(_) | Kind::Enum(_), _) => (None, false),
            (integer, Json::Number(text)) => {
                let exact = text.parse::<i128>().ok();
                let value = exact.or_else(|| exact_integer(text));
                (
                    value.and_then(|n| integer_field(integer, n)),
                    exact.is_none(),
                )
            }
            (integer, Json::String(s)) if is_decimal(s) => {
                (s.parse().ok().and_then(|n| integer_field(integer, n)), true)
            }
            _ => (None, false),
        };
        match value {
            Some(value) => {
                if coerced {
                    self.deviate(expected(kind), found, Outcome::Coerced);
                }
                write(out, number, value);
                Ok(true)
            }
            None => {
                self.deviate(expected(kind), found, Outcome::Dropped);
                cursor.discard(&json)?;
                Ok(false)
            }
        }
    }

    /// Any JSON as the fields of a `google.protobuf.Value` at protobuf level `depth`, cut to
    /// `null` below [`MAX_VALUE_DEPTH`].
    fn opaque(
        &mut self,
        cursor: &mut Cursor<'a>,
        json: Json<'a>,
        depth: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), Refusal> {
        // google.protobuf.Value's fields.
        const NULL: u32 = 1;
        const NUMBER: u32 = 2;
        const STRING: u32 = 3;
        const BOOL: u32 = 4;
        const STRUCT: u32 = 5;
        const LIST: u32 = 6;
        let cost = match json {
            Json::Array => 2,
            Json::Object => 3,
            _ => 0,
        };
        if depth + cost > MAX_VALUE_DEPTH {
            self.deviate(
                &format!("at most {MAX_VALUE_DEPTH} protobuf nesting levels in an opaque value"),
                json.kind(),
                Outcome::Cut,
            );
            cursor.discard(&json)?;
            write(out, NULL, Scalar::Varint(0));
            return Ok(());
        }
        match json {
            Json::Null => write(out, NULL, Scalar::Varint(0)),
            Json::Bool(b) => write(out, BOOL, Scalar::Varint(u64::from(b))),
            Json::Number(text) => match text.parse::<f64>() {
                Ok(n) if n.is_finite() => write(out, NUMBER, Scalar::Fixed64(n.to_bits())),
                _ => {
                    self.deviate("a number within double range", "a number", Outcome::Dropped);
                    write(out, NULL, Scalar::Varint(0));
                }
            },
            Json::String(s) => write(out, STRING, Scalar::Bytes(s.as_bytes())),
            Json::Replaced(s) => {
                self.replaced();
                write(out, STRING, Scalar::Bytes(s.as_bytes()));
            }
            Json::Array => {
                // ListValue { repeated Value values = 1 }
                let list = open(out, LIST);
                cursor.open(b'[')?;
                let (mut first, mut index) = (true, 0);
                while cursor.next_item(&mut first)? {
                    self.path.push(Segment::Index(index));
                    let item = cursor.value()?;
                    let value = open(out, 1);
                    self.opaque(cursor, item, depth + cost, out)?;
                    close(out, value)?;
                    self.path.pop();
                    index += 1;
                }
                close(out, list)?;
            }
            Json::Object => {
                // Struct { map<string, Value> fields = 1 }: entries { key = 1, value = 2 }.
                let fields = open(out, STRUCT);
                cursor.open(b'{')?;
                let mut first = true;
                while let Some(key) = cursor.next_key(&mut first)? {
                    let entry = open(out, 1);
                    write(out, 1, Scalar::Bytes(key.text.as_bytes()));
                    self.path.push(Segment::Key(key.text));
                    if key.replaced {
                        self.replaced_key();
                    }
                    let item = cursor.value()?;
                    let value = open(out, 2);
                    self.opaque(cursor, item, depth + cost, out)?;
                    close(out, value)?;
                    close(out, entry)?;
                    self.path.pop();
                }
                close(out, fields)?;
            }
        }
        Ok(())
    }
}

/// A scalar field's value as written on the wire.
enum Scalar<'s> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'s [u8]),
}

/// Writes field `number` with `value`.
fn write(out: &mut Vec<u8>, number: u32, value: Scalar<'_>) {
    match value {
        Scalar::Varint(n) => {
            encode_key(number, WireType::Varint, out);
            encode_varint(n, out);
        }
        Scalar::Fixed64(n) => {
            encode_key(number, WireType::SixtyFourBit, out);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Scalar::Fixed32(n) => {
            encode_key(number, WireType::ThirtyTwoBit, out);
            out.extend_from_slice(&n.to_le_bytes());
        }
        Scalar::Bytes(bytes) => {
            encode_key(number, WireType::LengthDelimited, out);
            encode_varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        }
    }
}

/// Bytes reserved for the length of a message being written: a varint padded to 5 bytes (a
/// valid encoding every protobuf decoder reads), patched by [`close`] once the length is known.
const LENGTH_BYTES: usize = 5;

/// Starts message field `number`; returns where its length goes.
fn open(out: &mut Vec<u8>, number: u32) -> usize {
    encode_key(number, WireType::LengthDelimited, out);
    let at = out.len();
    out.extend_from_slice(&[0x80, 0x80, 0x80, 0x80, 0x00]);
    at
}

/// Ends the message field whose length goes at `at`.
fn close(out: &mut [u8], at: usize) -> Result<(), Refusal> {
    let length = out.len() - at - LENGTH_BYTES;
    if length >> (7 * LENGTH_BYTES) != 0 {
        return Err(Refusal::Invalid(super::DecodeError::at(
            ".",
            "the typed event is too large",
        )));
    }
    for (i, byte) in out[at..at + LENGTH_BYTES].iter_mut().enumerate() {
        let more = if i + 1 < LENGTH_BYTES { 0x80 } else { 0 };
        *byte = ((length >> (7 * i)) & 0x7f) as u8 | more;
    }
    Ok(())
}

/// Removes the byte ranges `removed` (disjoint) from `out`, in one pass.
fn remove(out: &mut Vec<u8>, mut removed: Vec<Range<usize>>) {
    if removed.is_empty() {
        return;
    }
    removed.sort_by_key(|range| range.start);
    let mut write = removed[0].start;
    for (i, range) in removed.iter().enumerate() {
        let next = removed.get(i + 1).map_or(out.len(), |next| next.start);
        out.copy_within(range.end..next, write);
        write += next - range.end;
    }
    out.truncate(write);
}

/// Writes a map entry's key (field 1) of `kind` from its JSON text; false when it is not one.
fn map_key(kind: &Kind, key: &str, out: &mut Vec<u8>) -> bool {
    let value = match kind {
        Kind::String => Some(Scalar::Bytes(key.as_bytes())),
        Kind::Bool => key
            .parse::<bool>()
            .ok()
            .map(|b| Scalar::Varint(u64::from(b))),
        integer => key
            .parse::<i128>()
            .ok()
            .and_then(|n| integer_field(integer, n)),
    };
    match value {
        Some(value) => {
            write(out, 1, value);
            true
        }
        None => false,
    }
}

/// What a field of `kind` expects, for a deviation.
fn expected(kind: &Kind) -> &'static str {
    match kind {
        Kind::Double => "double",
        Kind::Float => "float",
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => "int32",
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => "int64",
        Kind::Uint32 | Kind::Fixed32 => "uint32",
        Kind::Uint64 | Kind::Fixed64 => "uint64",
        Kind::Bool => "bool",
        Kind::String => "string",
        Kind::Bytes => "bytes",
        Kind::Message(_) => "an object",
        Kind::Enum(_) => "an enum value name",
    }
}

/// `n` as a field of the integer `kind` on the wire, when it fits.
fn integer_field(kind: &Kind, n: i128) -> Option<Scalar<'static>> {
    Some(match kind {
        Kind::Int64 => Scalar::Varint(i64::try_from(n).ok()? as u64),
        Kind::Sint64 => {
            let n = i64::try_from(n).ok()?;
            Scalar::Varint(((n << 1) ^ (n >> 63)) as u64)
        }
        Kind::Sfixed64 => Scalar::Fixed64(i64::try_from(n).ok()? as u64),
        Kind::Int32 => Scalar::Varint(i64::from(i32::try_from(n).ok()?) as u64),
        Kind::Sint32 => {
            let n = i32::try_from(n).ok()?;
            Scalar::Varint(u64::from(((n << 1) ^ (n >> 31)) as u32))
        }
        Kind::Sfixed32 => Scalar::Fixed32(i32::try_from(n).ok()? as u32),
        Kind::Uint64 => Scalar::Varint(u64::try_from(n).ok()?),
        Kind::Fixed64 => Scalar::Fixed64(u64::try_from(n).ok()?),
        Kind::Uint32 => Scalar::Varint(u64::from(u32::try_from(n).ok()?)),
        Kind::Fixed32 => Scalar::Fixed32(u32::try_from(n).ok()?),
        _ => return None,
    })
}

/// A floating-point field from a number's text; `None` when it is not finite in that width.
fn float(kind: &Kind, text: &str) -> Option<Scalar<'static>> {
    let n: f64 = text.trim().parse().ok().filter(|n: &f64| n.is_finite())?;
    if !text
        .bytes()
        .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return None;
    }
    match kind {
        Kind::Float => {
            let narrow = n as f32;
            narrow
                .is_finite()
                .then_some(Scalar::Fixed32(narrow.to_bits()))
        }
        _ => Some(Scalar::Fixed64(n.to_bits())),
    }
}

/// `-?[0-9]+`, short enough for an i128.
fn is_decimal(s: &str) -> bool {
    let digits = s.strip_prefix('-').unwrap_or(s);
    !digits.is_empty() && digits.len() <= 30 && digits.bytes().all(|b| b.is_ascii_digit())
}

/// The exact integer a JSON number's text denotes (`1.0`, `1e2`, `-0.0`), or `None` when it has a
/// fraction or is too large: computed on the digits, never through a float.
fn exact_integer(text: &str) -> Option<i128> {
    let (negative, rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match rest.find(['e', 'E']) {
        Some(i) => (&rest[..i], rest[i + 1..].parse::<i64>().ok()?),
        None => (rest, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    if int.is_empty() || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = format!("{int}{frac}");
    let mut exponent = exponent.checked_sub(i64::try_from(frac.len()).ok()?)?;
    while digits.len() > 1 && digits.ends_with('0') {
        digits.pop();
        exponent += 1;
    }
    let digits = digits.trim_start_matches('0');
    if digits.is_empty() {
        return Some(0);
    }
    if exponent < 0 || digits.len() as i64 + exponent > 38 {
        return None;
    }
    let mut value: i128 = digits.parse().ok()?;
    for _ in 0..exponent {
        value = value.checked_mul(10)?;
    }
    Some(if negative { -value } else { value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A body with `ChatEvent.Id` given as `id`, and `items` numbers (`1` or, every `bad`-th one,
    /// `1e400`, beyond double range) in an opaque value under a key of `key` bytes, and as many
    /// chat messages with a `NoticeId` that is a word (dropped) every `bad`-th one.
    fn body(id: &str, items: usize, key: usize, bad: usize) -> String {
        let numbers: Vec<&str> = (0..items)
            .map(|i| {
                if bad > 0 && i % bad == 0 {
                    "1e400"
                } else {
                    "1"
                }
            })
            .collect();
        let messages: Vec<String> = (0..items)
            .map(|i| {
                let notice = if bad > 0 && i % bad == 0 {
                    "\"n\""
                } else {
                    "3"
                };
                format!(r#"{{"Id": {i}, "NoticeId": {notice}}}"#)
            })
            .collect();
        format!(
            r#"{{"ChatEvent": {{"Id": {id}, "Type": "t"}}, "Rels": {{"Projects": [{{"Id": 1, "Options": {{"{}": [{}]}}}}], "ChatMessages": [{}]}}}}"#,
            "k".repeat(key),
            numbers.join(","),
            messages.join(",")
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        /// The work beyond reading the body does not grow with the items nor the key: paths are
        /// spelled out for reported deviations only, each cut; the protobuf written is a small
        /// multiple of the body. And the typed result is the strict decode's.
        #[test]
        fn tolerant_work_is_linear_and_paths_cost_only_reported_deviations(
            items in 1usize..20_000,
            key in 1usize..100_000,
            bad in prop_oneof![Just(0usize), 1usize..5_000],
        ) {
            let text = body("\"5\"", items, key, bad);
            let (tolerated, work) = decode_counting(&text).expect("decodes");
            let reported = tolerated.deviations.len();
            prop_assert!(reported <= MAX_DEVIATIONS + 1);
            let bytes: usize = tolerated
                .deviations
                .iter()
                .map(|d| d.path.len() + d.expected.len() + d.found.len())
                .sum();
            prop_assert!(bytes <= MAX_DEVIATION_BYTES + 300, "{} bytes of deviations", bytes);
            // A path and a pattern per reported deviation, and one pattern per opaque field.
            let per_path = MAX_ERROR_TEXT + '…'.len_utf8();
            prop_assert!(
                work.path_bytes <= (2 * reported + 1) * per_path,
                "{} bytes of paths for {} deviations", work.path_bytes, reported
            );
            prop_assert!(work.encoded_bytes <= 16 * text.len(), "{} written", work.encoded_bytes);
            for deviation in &tolerated.deviations {
                prop_assert!(deviation.path.len() <= per_path);
            }
            if bad == 0 {
                let strict = body("5", items, key, 0);
                let fast: Envelope = serde_json::from_str(&strict).expect("fits the protos");
                prop_assert_eq!(&tolerated.envelope, &fast);
                prop_assert_eq!(reported, 1, "only the id is coerced");
            } else {
                // The id, and one number and one message in every `bad`, deviate.
                let deviating = 1 + 2 * items.div_ceil(bad);
                if deviating <= 20 {
                    prop_assert_eq!(reported, deviating);
                } else {
                    prop_assert!(reported > 20);
                }
            }
        }
    }

    #[test]
    fn a_key_given_twice_keeps_the_last_and_paths_are_cut_with_a_mark() {
        let long = "x".repeat(1000);
        let text = format!(
            r#"{{"ChatEvent": {{"Id": 1, "Type": "a", "ChatId": 5, "Type": "b", "ChatId": null}}, "Rels": {{"Projects": [{{"Id": 1, "Options": {{"{long}": "\ud800"}}}}]}}}}"#
        );
        let (tolerated, _) = decode_counting(&text).expect("decodes");
        let event = tolerated.envelope.chat_event.expect("ChatEvent");
        assert_eq!(event.r#type, "b");
        assert_eq!(event.chat_id, None, "the last ChatId (null) is kept");
        let paths: Vec<&str> = tolerated
            .deviations
            .iter()
            .map(|d| d.path.as_str())
            .collect();
        assert_eq!(paths[..2], ["ChatEvent.Type", "ChatEvent.ChatId"]);
        let cut = paths[2];
        assert!(
            cut.starts_with("Rels.Projects[0].Options.xxx") && cut.ends_with('…'),
            "{cut}"
        );
        assert_eq!(cut.len(), MAX_ERROR_TEXT + '…'.len_utf8());
        assert_eq!(tolerated.deviations[2].pattern, "Rels.Projects[].Options");
    }

    #[test]
    fn exact_integers_are_computed_on_the_digits() {
        for (text, want) in [
            ("1", Some(1)),
            ("1.0", Some(1)),
            ("1.50e1", Some(15)),
            ("1e2", Some(100)),
            ("-0", Some(0)),
            ("-0.0", Some(0)),
            ("100e-2", Some(1)),
            ("9007199254740993.0", Some(9_007_199_254_740_993)),
            ("1.5", None),
            ("1e-1", None),
            ("1e400", None),
            ("0.000", Some(0)),
            ("-12.000e1", Some(-120)),
        ] {
            assert_eq!(exact_integer(text), want, "{text}");
        }
    }
}
