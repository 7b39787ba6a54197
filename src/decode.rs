//! The webhook's JSON wire format -> the typed [`Envelope`]. The only module that knows the JSON.
//!
//! Field names, nullability and which fields are required come from the protos: build.rs puts
//! serde attributes on the generated messages (see `serde_support`). Unknown fields and `Rels`
//! kinds are skipped here; they are not lost, because the original body is stored beside the
//! typed message. What an event points at is read here too, once, at ingest: the filter keys
//! ([`keys`]) and the referenced entities ([`references`]).

pub mod pool;
mod resolve;
pub mod serde_support;
mod tolerant;

pub use tolerant::MAX_VALUE_DEPTH;

pub use resolve::{indices, references, references_len, Indices, REFERENCE_FIELDS};

use crate::pb::webhook::v1::Envelope;
use crate::wire::Keys;

/// How strictly a body must match the protos.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Policy {
    /// DESIGN invariant 7: a field that does not fit its proto type never refuses the event; it is
    /// coerced when that loses nothing, else left unset, and reported as a [`Deviation`].
    #[default]
    Tolerant,
    /// Any deviation refuses the body, naming its path (`--strict-decode`).
    Strict,
}

/// What happened to a field that did not fit its proto type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// Converted without loss (`1.0` to an integer, `"84"` to an int64, `1` to a bool, a number
    /// to a string).
    Coerced,
    /// Left unset in the typed form; the raw JSON keeps it.
    Dropped,
    /// An opaque value cut to `null` where it would nest deeper than stock protobuf decoders
    /// read (DESIGN invariant 9); the raw JSON keeps it.
    Cut,
    /// A key spelled as one of the vendor's SDKs has spelled it ([`respelling`]: `BirthDay` for
    /// `Birthday`), typed into the field of the usual spelling; the raw JSON keeps it as sent.
    Respelled,
    /// A string or key with an unpaired UTF-16 surrogate escape (`"\ud800"`: valid JSON, but no
    /// protobuf string can hold it), each replaced by U+FFFD; the raw JSON keeps the escape.
    Replaced,
}

impl Outcome {
    /// The lower-case name, as in JSON and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Coerced => "coerced",
            Outcome::Dropped => "dropped",
            Outcome::Cut => "cut",
            Outcome::Replaced => "replaced",
            Outcome::Respelled => "respelled",
        }
    }
}

/// A field of the body that did not fit the proto. Never carries the field's value (it may be
/// personal data): only where, what was expected and what kind of JSON was found.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Deviation {
    /// Full path, `Rels.ChatMessages[0].NoticeId`.
    pub path: String,
    /// What the proto expects there (`int64`, `bool`, `a list`, ...).
    pub expected: String,
    /// What kind of JSON was there (`a string`, `a number`, ...).
    pub found: String,
    /// What the gateway did about it.
    pub outcome: Outcome,
    /// The path of the proto field with array indices removed (`Rels.ChatMessages[].NoticeId`);
    /// inside an opaque value or a map, the field's own path: a set bounded by the protos, for
    /// metric labels and log-once, free of keys chosen by the sender.
    #[serde(skip)]
    pub pattern: String,
}

/// `path` with array indices removed: `Rels.ChatMessages[0].NoticeId` -> `Rels.ChatMessages[].NoticeId`.
pub fn path_pattern(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push_str("[]");
            }
            ']' => in_index = false,
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// Deviations reported per event at most; past it they are counted in one last deviation.
pub const MAX_DEVIATIONS: usize = 100;

/// Bytes of the deviations reported per event at most (their paths, each cut to
/// [`MAX_ERROR_TEXT`], and texts); past it they are counted in one last deviation, so that what
/// an event carries about its body stays small whatever the body.
pub const MAX_DEVIATION_BYTES: usize = 16 * 1024;

/// A decoded body: the typed envelope and what of the body did not fit it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The typed event.
    pub envelope: Envelope,
    /// Fields coerced, dropped or cut, in body order (empty for a body that fits the protos).
    pub deviations: Vec<Deviation>,
}

/// Why a body is not a webhook event. Says where (a field path such as `ChatEvent.Id` or
/// `Rels.Chats[0].ProjectId`, `.` for the whole body) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct DecodeError {
    /// Where in the body: a dotted field path with `[i]` for array items.
    pub path: String,
    /// What is wrong and what was expected.
    pub message: String,
    /// 1-based line of the offending byte, when the parser knows it.
    pub line: Option<usize>,
    /// 1-based column of the offending byte, when the parser knows it.
    pub column: Option<usize>,
}

/// Bytes of an error's message or path given back to the sender at most: a message may quote
/// the sender's own text (a string value of any length), and every answer stays small.
pub const MAX_ERROR_TEXT: usize = 200;

impl DecodeError {
    /// The error with its message and path cut to [`MAX_ERROR_TEXT`] bytes (`…` marks a cut).
    fn bounded(mut self) -> Self {
        clip(&mut self.message);
        clip(&mut self.path);
        self
    }

    /// The error placed in a batch body, for an item that starts at `start`: the fault's own
    /// line and column when the parser knew them (they are within the item), else the item's.
    fn placed(mut self, lines: &mut Lines<'_>, start: usize) -> Self {
        let (line, column) = lines.position(start);
        (self.line, self.column) = match (self.line, self.column) {
            (Some(1), Some(within)) => (Some(line), Some(column + within - 1)),
            (Some(within_line), Some(within)) => (Some(line + within_line - 1), Some(within)),
            _ => (Some(line), Some(column)),
        };
        self
    }

    fn at(path: &str, message: impl Into<String>) -> Self {
        Self {
            path: path.to_owned(),
            message: message.into(),
            line: None,
            column: None,
        }
    }

    /// An error about the whole body at byte `offset`, with its 1-based line and column (in
    /// bytes, like serde_json).
    fn at_offset(body: &[u8], offset: usize, message: String) -> Self {
        let before = &body[..offset];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let line_start = before
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        Self {
            path: ".".to_owned(),
            message,
            line: Some(line),
            column: Some(offset - line_start + 1),
        }
    }

    fn from_serde(err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        let mut path = known_path(err.path());
        let inner = err.into_inner();
        // A missing field is reported at its parent object; name the field itself.
        let missing = inner.to_string();
        if let Some(field) = missing
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            path = if path == "." {
                field.to_owned()
            } else {
                format!("{path}.{field}")
            };
        }
        Self::from_json(path, &inner)
    }

    /// Whether the body's text is at fault (not a field's type).
    fn is_syntax(&self) -> bool {
        self.message.starts_with("malformed JSON") || self.message.starts_with("truncated JSON")
    }

    /// A JSON syntax or type error at the top of the body.
    pub fn from_json_error(err: &serde_json::Error) -> Self {
        Self::from_json(".".to_owned(), err)
    }

    fn from_json(path: String, err: &serde_json::Error) -> Self {
        let (line, column) = (err.line(), err.column());
        let text = err.to_string();
        // serde_json appends the position; it is reported in its own fields.
        let message = match text.rfind(" at line ") {
            Some(i) if line > 0 => text[..i].to_owned(),
            _ => text,
        };
        let message = match err.classify() {
            serde_json::error::Category::Syntax => format!("malformed JSON: {message}"),
            serde_json::error::Category::Eof => format!("truncated JSON: {message}"),
            _ => message,
        };
        Self {
            path,
            message,
            line: (line > 0).then_some(line),
            column: (line > 0).then_some(column),
        }
    }
}

/// Cuts `text` to [`MAX_ERROR_TEXT`] bytes at a character boundary, marking the cut with `…`.
/// The edges use it for every piece of client input an error repeats.
pub fn clip(text: &mut String) {
    clip_to(text, MAX_ERROR_TEXT);
}

/// Cuts `text` to `max` bytes at a character boundary, marking the cut with `…`.
pub fn clip_to(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
}

/// 1-based line and column (in bytes, like serde_json) of offsets in one body, asked for in
/// increasing order: each byte is scanned once however many positions are asked for.
struct Lines<'a> {
    body: &'a [u8],
    /// How far the scan has come, the line it is on and where that line starts.
    scanned: usize,
    line: usize,
    line_start: usize,
}

impl<'a> Lines<'a> {
    fn new(body: &'a [u8]) -> Self {
        Self {
            body,
            scanned: 0,
            line: 1,
            line_start: 0,
        }
    }

    fn position(&mut self, offset: usize) -> (usize, usize) {
        if offset < self.scanned {
            *self = Self::new(self.body);
        }
        let offset = offset.min(self.body.len());
        for (i, &byte) in self.body[self.scanned..offset].iter().enumerate() {
            if byte == b'\n' {
                self.line += 1;
                self.line_start = self.scanned + i + 1;
            }
        }
        self.scanned = offset;
        (self.line, offset - self.line_start + 1)
    }
}

/// The UTF-8 byte-order mark some senders put before the JSON text.
const BOM: &[u8] = b"\xef\xbb\xbf";

/// `body` without a leading UTF-8 byte-order mark (RFC 8259 lets a parser ignore one; stock
/// parsers, the gateway's and its consumers', refuse it). The mark is not part of the event:
/// callers store what this returns.
pub fn strip_bom(body: &[u8]) -> &[u8] {
    body.strip_prefix(BOM).unwrap_or(body)
}

/// Decodes one webhook body tolerantly ([`Policy::Tolerant`]).
pub fn decode(body: &[u8]) -> Result<Decoded, DecodeError> {
    decode_with(body, Policy::Tolerant)
}

/// Decodes one webhook body. Accepts both known versions of the format, unknown fields, `null`
/// for any field, int64 ids beyond 2^53. Refuses anything that is not a JSON object with a
/// `ChatEvent` object that has a string `Type` and (unless `Transitive`) a positive integer `Id`,
/// a `Rels` that is neither an object nor null, invalid UTF-8 anywhere, and arrays or objects
/// nested deeper than [`MAX_DEPTH`] anywhere (unknown fields included). Any other field that does
/// not fit its proto type is a [`Deviation`] ([`Policy::Tolerant`]) or refuses the body
/// ([`Policy::Strict`]). Error messages and paths are cut to [`MAX_ERROR_TEXT`] bytes.
pub fn decode_with(body: &[u8], policy: Policy) -> Result<Decoded, DecodeError> {
    decode_one(body, policy).map_err(DecodeError::bounded)
}

fn decode_one(body: &[u8], policy: Policy) -> Result<Decoded, DecodeError> {
    // serde reads a JSON array into a struct positionally; a webhook body is always an object.
    match body.iter().find(|b| !b.is_ascii_whitespace()) {
        Some(b'{') => {}
        None => return Err(DecodeError::at(".", "empty body: expected a JSON object")),
        Some(_) => {
            // Let the parser say what it is (or where the syntax breaks).
            let value: Result<serde_json::Value, _> = serde_json::from_slice(body);
            return Err(match value {
                Err(err) => DecodeError::from_json(".".to_owned(), &err),
                Ok(other) => DecodeError::at(
                    ".",
                    format!("expected a JSON object, found {}", kind(&other)),
                ),
            });
        }
    }
    // The parser skips unknown fields without checking their UTF-8; the body is kept verbatim,
    // so all of it must be valid. Checked first, so the parser can skip its own per-string check.
    let text = match std::str::from_utf8(body) {
        Ok(text) => text,
        Err(error) => {
            // A syntax error (with its field path) takes precedence over the UTF-8 one; so does
            // any error the strict policy would give.
            if let Err(tracked) = decode_tracked(body) {
                if policy == Policy::Strict || tracked.is_syntax() {
                    return Err(tracked);
                }
            }
            return Err(invalid_utf8(body, error.valid_up_to()));
        }
    };
    // The fast parse reads a body that fits the protos exactly; anything else goes to the
    // tolerant decode, or is explained by the tracked parse (which names the field). A body that
    // may hold a respelled key goes to the tolerant decode at once: the fast parse would skip it
    // as unknown.
    if may_be_respelled(body) {
        return tolerated(body, text, None, policy);
    }
    match serde_json::from_str(text) {
        Ok(envelope) => checked(body, envelope),
        Err(error) => tolerated(body, text, Some(&error), policy),
    }
}

/// The keys the vendor's SDKs have spelled otherwise (../shared/SCHEMA.md, "Key spellings"): for
/// a message (protobuf full name), each other spelling and the usual one (the field's
/// `json_name`).
const RESPELLINGS: &[(&str, &[(&str, &str)])] = &[
    // The widget reads `BirthDay` (2024); the 2021 fixture has `Birthday`.
    (
        "iqchannels.webhook.v1.ClientDetails",
        &[("BirthDay", "Birthday")],
    ),
    // The Kotlin SDK, 2025-11-19 to 2025-12-10.
    (
        "iqchannels.webhook.v1.Client",
        &[("PersonalManagerID", "PersonalManagerId")],
    ),
    // The Swift SDK until 2024-04.
    (
        "iqchannels.webhook.v1.SingleChoice",
        &[
            ("id", "Id"),
            ("chatMessageId", "ChatMessageId"),
            ("clientId", "ClientId"),
            ("deleted", "Deleted"),
            ("createdAt", "CreatedAt"),
            ("updatedAt", "UpdatedAt"),
        ],
    ),
    ("iqchannels.webhook.v1.Chat", &[("IsOpen", "Open")]),
    ("iqchannels.webhook.v1.ChatEvent", &[("IsPublic", "Public")]),
];

/// The usual spelling of `key` in the message `message` (a protobuf full name), when `key` is a
/// spelling the vendor's SDKs have used for it.
pub(crate) fn respelling(message: &str, key: &str) -> Option<&'static str> {
    RESPELLINGS
        .iter()
        .find(|(name, _)| *name == message)?
        .1
        .iter()
        .find(|(other, _)| *other == key)
        .map(|(_, usual)| *usual)
}

/// Whether `body` may hold a respelled key: one of [`RESPELLINGS`] in quotes, or a JSON escape
/// of an ASCII letter (`"Birth\\u0044ay"`, which no encoder of the vendor's writes). The fast
/// parse would skip such a key as unknown; the tolerant decode types it. A false alarm (the text
/// inside a string value) only costs the slower decode. One pass over the body, at its quotes
/// and backslashes (it runs on every body).
fn may_be_respelled(body: &[u8]) -> bool {
    memchr::memchr2_iter(b'"', b'\\', body).any(|at| {
        let rest = &body[at + 1..];
        if body[at] == b'\\' {
            return rest.starts_with(b"u00") && matches!(rest.get(3), Some(b'4'..=b'7'));
        }
        RESPELLINGS
            .iter()
            .flat_map(|(_, keys)| keys.iter())
            .any(|(other, _)| {
                rest.starts_with(other.as_bytes()) && rest.get(other.len()) == Some(&b'"')
            })
    })
}

/// The checks after a successful fast parse of `body` into `envelope`: it fits the protos, so
/// there is no deviation.
fn checked(body: &[u8], envelope: Envelope) -> Result<Decoded, DecodeError> {
    too_deep_check(body)?;
    validate(&envelope)?;
    Ok(Decoded {
        envelope,
        deviations: Vec::new(),
    })
}

/// A body the fast parse refused with `fast`: decoded tolerantly, or explained.
///
/// `fast` is `None` when the fast parse was not tried (the body may hold a respelled key): then
/// the strict policy too reads it tolerantly, and refuses it for its first deviation.
fn tolerated(
    body: &[u8],
    text: &str,
    fast: Option<&serde_json::Error>,
    policy: Policy,
) -> Result<Decoded, DecodeError> {
    let explained = |fast: Option<&serde_json::Error>| match fast {
        Some(fast) => explain(body, fast),
        None => match serde_json::from_str::<Envelope>(text) {
            Err(fast) => explain(body, &fast),
            Ok(_) => DecodeError::at(".", "expected a webhook body"),
        },
    };
    // A "syntax" error of the fast parse may be a number out of range in a typed field (`1e400`),
    // which is valid JSON: only text that does not parse even when ignored is malformed.
    let malformed = fast.is_none_or(|fast| fast.is_syntax() || fast.is_eof())
        && (too_deep(body).is_some()
            || serde_json::from_str::<serde::de::IgnoredAny>(text).is_err());
    if (policy == Policy::Strict && fast.is_some()) || malformed {
        return Err(explained(fast));
    }
    too_deep_check(body)?;
    let tolerated = match tolerant::decode(text) {
        Ok(tolerated) => tolerated,
        Err(tolerant::Refusal::Syntax) => return Err(explained(fast)),
        Err(tolerant::Refusal::Invalid(error)) => return Err(error),
    };
    if policy == Policy::Strict {
        if let Some(deviation) = tolerated.deviations.first() {
            return Err(DecodeError::at(
                &deviation.path,
                format!("expected {}, found {}", deviation.expected, deviation.found),
            ));
        }
    }
    let transitive = tolerated
        .envelope
        .chat_event
        .as_ref()
        .is_some_and(|event| event.transitive);
    // What the gateway needs is strict (DESIGN invariant 7): a deviation there refuses the body.
    for deviation in &tolerated.deviations {
        let refused = match deviation.path.as_str() {
            "ChatEvent" | "ChatEvent.Type" | "Rels" => true,
            "ChatEvent.Id" => deviation.outcome != Outcome::Coerced && !transitive,
            _ => false,
        };
        if refused {
            let expected = match deviation.path.as_str() {
                "ChatEvent" => "an object",
                "Rels" => "an object or null",
                "ChatEvent.Type" => "a string such as \"message_created\"",
                _ => "a positive integer (only a transitive event may omit it)",
            };
            return Err(DecodeError::at(
                &deviation.path,
                format!("expected {expected}, found {}", deviation.found),
            ));
        }
    }
    validate(&tolerated.envelope)?;
    Ok(Decoded {
        envelope: tolerated.envelope,
        deviations: tolerated.deviations,
    })
}

/// Refuses a body whose arrays and objects nest deeper than [`MAX_DEPTH`].
fn too_deep_check(body: &[u8]) -> Result<(), DecodeError> {
    // The parser does not limit how deeply unknown fields nest; the stored body must stay
    // readable by consumers whose parsers do (serde_json's own limit).
    match too_deep(body) {
        Some(offset) => Err(DecodeError::at_offset(
            body,
            offset,
            format!("nested deeper than {MAX_DEPTH} arrays and objects"),
        )),
        None => Ok(()),
    }
}

/// One item of a batch: where its bytes are in the batch body, and what they decode to.
#[derive(Debug)]
pub struct BatchItem {
    /// The item's exact bytes in the body.
    pub range: std::ops::Range<usize>,
    /// The item decoded as by [`decode_with`], with the same errors, except that an error's
    /// line and column are in the whole body: the fault's when the parser knew where it is,
    /// else the item's first byte.
    pub decoded: Result<Decoded, DecodeError>,
}

/// Decodes a JSON array of webhook bodies, handing each item to `each` in order. Each item is
/// decoded as [`decode`] would decode its bytes alone, and a bad item does not stop the others.
/// `Err` only when the body is not a JSON array (or its syntax breaks between items), with the
/// position of the fault; items already handed over are then to be dropped.
///
/// Items are decoded during the one pass that finds where each ends. Should anything look
/// unusual (invalid UTF-8, an item that is not an object or does not decode, broken syntax),
/// the rest of the array is split first and each item decoded after, which explains every
/// fault as before. No list of items is built here: a body of many small items costs the
/// caller what it keeps of each, no more.
pub fn decode_array(
    body: &[u8],
    policy: Policy,
    mut each: impl FnMut(BatchItem),
) -> Result<(), DecodeError> {
    let mut lines = Lines::new(body);
    let done = match std::str::from_utf8(body) {
        Ok(text) => decode_array_fast(text, policy, &mut lines, &mut each),
        Err(_) => Err(0),
    };
    match done {
        Ok(()) => Ok(()),
        Err(decoded) => decode_array_split(body, policy, decoded, &mut lines, &mut each),
    }
}

/// The one-pass decode of a well-formed array. `Err(n)` where the careful path has to decide,
/// after the first `n` items (which were handed over).
fn decode_array_fast(
    text: &str,
    policy: Policy,
    lines: &mut Lines<'_>,
    each: &mut impl FnMut(BatchItem),
) -> Result<(), usize> {
    let body = text.as_bytes();
    let skip_whitespace = |mut at: usize| {
        while body.get(at).is_some_and(u8::is_ascii_whitespace) {
            at += 1;
        }
        at
    };
    let mut handed = 0;
    let mut at = skip_whitespace(0);
    if body.get(at) != Some(&b'[') {
        return Err(handed);
    }
    at = skip_whitespace(at + 1);
    let ends = |at: usize, handed: usize| {
        if skip_whitespace(at + 1) == body.len() {
            Ok(())
        } else {
            Err(handed)
        }
    };
    if body.get(at) == Some(&b']') {
        return ends(at, handed);
    }
    loop {
        if body.get(at) != Some(&b'{') {
            return Err(handed);
        }
        // A stream deserializer reports where the value it read ends; a `{...}` item needs no
        // delimiter after it, so the `,` or `]` that follows is left for this loop.
        let mut stream = serde_json::Deserializer::from_str(&text[at..]).into_iter::<Envelope>();
        let Some(Ok(envelope)) = stream.next() else {
            return Err(handed);
        };
        let end = at + stream.byte_offset();
        let item = &body[at..end];
        let decoded = if may_be_respelled(item) {
            decode_with(item, policy)
        } else {
            checked(item, envelope)
        };
        each(BatchItem {
            range: at..end,
            decoded: decoded.map_err(|error| error.placed(lines, at)),
        });
        handed += 1;
        at = skip_whitespace(end);
        match body.get(at) {
            Some(b',') => at = skip_whitespace(at + 1),
            Some(b']') => return ends(at, handed),
            _ => return Err(handed),
        }
    }
}

/// Splits the array into its items' bytes, then decodes each but the first `skip`.
fn decode_array_split(
    body: &[u8],
    policy: Policy,
    skip: usize,
    lines: &mut Lines<'_>,
    each: &mut impl FnMut(BatchItem),
) -> Result<(), DecodeError> {
    let items: Vec<&serde_json::value::RawValue> =
        serde_json::from_slice(body).map_err(|error| {
            let mut decode = DecodeError::from_json_error(&error);
            decode.message = format!("expected a JSON array of events: {}", decode.message);
            decode.bounded()
        })?;
    for item in items.into_iter().skip(skip) {
        let bytes = item.get().as_bytes();
        // The raw value borrows from `body`: its offset is where it sits there.
        let start = bytes.as_ptr() as usize - body.as_ptr() as usize;
        each(BatchItem {
            range: start..start + bytes.len(),
            decoded: decode_with(bytes, policy).map_err(|error| error.placed(lines, start)),
        });
    }
    Ok(())
}

/// Decodes NDJSON (one webhook body per line; blank lines are not items), handing each item to
/// `each` in order: its range is the whole line, without the newline.
pub fn decode_lines(body: &[u8], policy: Policy, mut each: impl FnMut(BatchItem)) {
    let mut lines = Lines::new(body);
    let mut start = 0;
    for line in body.split(|&b| b == b'\n') {
        let range = start..start + line.len();
        start = range.end + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let decoded =
            decode_with(line, policy).map_err(|error| error.placed(&mut lines, range.start));
        each(BatchItem { range, decoded });
    }
}

/// Decodes while tracking the field path, for errors that name it (`Rels.Chats[0].Id`).
fn decode_tracked(body: &[u8]) -> Result<Envelope, DecodeError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let envelope: Envelope =
        serde_path_to_error::deserialize(&mut de).map_err(DecodeError::from_serde)?;
    de.end()
        .map_err(|err| DecodeError::from_json(".".to_owned(), &err))?;
    Ok(envelope)
}

/// The error for a body the fast parse rejected: the tracked parse's, which names the field.
fn explain(body: &[u8], fast: &serde_json::Error) -> DecodeError {
    match decode_tracked(body) {
        Err(error) => error,
        // Both parsers read the same grammar; should they ever disagree, the body is still bad.
        Ok(_) => DecodeError::from_json(".".to_owned(), fast),
    }
}

/// Checks what the types cannot: a typed envelope (from JSON or from gRPC Publish) must carry a
/// `ChatEvent` with a `Type` and, unless it is transitive, a positive `Id`.
pub fn validate(envelope: &Envelope) -> Result<(), DecodeError> {
    let Some(event) = &envelope.chat_event else {
        return Err(DecodeError::at(
            "ChatEvent",
            "missing field `ChatEvent`: expected an object",
        ));
    };
    if event.r#type.is_empty() {
        return Err(DecodeError::at(
            "ChatEvent.Type",
            "missing field `Type` or empty event type: expected a string such as \"message_created\"",
        ));
    }
    if !event.transitive && event.id <= 0 {
        let found = if event.id == 0 {
            "missing field `Id` or id 0".to_owned()
        } else {
            format!("id {}", event.id)
        };
        return Err(DecodeError::at(
            "ChatEvent.Id",
            format!("{found}: expected a positive integer (only a transitive event may omit it)"),
        ));
    }
    Ok(())
}

/// The deduplication key of a valid envelope: its `ChatEvent.Id`, or `None` for a transitive
/// event (DESIGN invariant 2: never deduplicated by id).
pub fn dedup_id(envelope: &Envelope) -> Option<i64> {
    envelope
        .chat_event
        .as_ref()
        .filter(|event| !event.transitive)
        .map(|event| event.id)
}

/// The deduplication key of a transitive event (it has no `ChatEvent.Id`) sent with the
/// sender's idempotency key `key`, as a single event (`index` `None`) or as item `index` of a
/// batch: the first 8 bytes of SHA-256(key, 0, the item's place), with the sign bit set. Negative, so never a
/// `ChatEvent.Id` (always positive where it is the key): the same key and item is stored once,
/// whatever the retries.
pub fn idempotency_id(key: &str, index: Option<usize>) -> i64 {
    use sha2::{Digest as _, Sha256};
    let mut digest = Sha256::new().chain_update(key.as_bytes()).chain_update([0]);
    if let Some(index) = index {
        digest.update((index as u64).to_le_bytes());
    }
    let digest = digest.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_le_bytes(first) | 1 << 63) as i64
}

/// The longest idempotency key taken (`Idempotency-Key`, `webhook-id`, gRPC `idempotency_key`).
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Checks a sender's idempotency key: 1 to [`MAX_IDEMPOTENCY_KEY`] bytes of visible ASCII.
pub fn check_idempotency_key(key: &str) -> Result<(), String> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(format!(
            "an idempotency key is 1 to {MAX_IDEMPOTENCY_KEY} bytes, this one {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an idempotency key is visible ASCII (no spaces or control bytes)".into());
    }
    Ok(())
}

/// `text` (JSON) on one line: without the whitespace between its tokens, its numbers and strings
/// untouched. `None` when it is not JSON.
pub fn compact_json(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    serde_json::from_str::<serde::de::IgnoredAny>(&out).ok()?;
    Some(out)
}

/// The fields subscribers filter on, read once at ingest and stored beside the event.
pub fn keys(envelope: &Envelope) -> Keys {
    let Some(event) = &envelope.chat_event else {
        return Keys::default();
    };
    let rels = envelope.rels.as_ref();
    let chat = event
        .chat_id
        .and_then(|id| rels.and_then(|rels| rels.chats.iter().find(|chat| chat.id == id)));
    Keys {
        event_id: event.id,
        event_type: event.r#type.clone(),
        actor: event.actor.clone(),
        chat_id: event.chat_id,
        client_id: event.client_id,
        user_id: event.user_id,
        project_id: chat.map(|chat| chat.project_id),
        channel_id: chat.map(|chat| chat.channel_id),
    }
}

/// Invalid UTF-8 at byte `offset`.
fn invalid_utf8(body: &[u8], offset: usize) -> DecodeError {
    DecodeError::at_offset(
        body,
        offset,
        format!("malformed JSON: invalid UTF-8 at byte {offset}: expected UTF-8 text"),
    )
}

/// Arrays and objects nested in one another at most, anywhere in a body. serde_json's limit:
/// typed fields already meet it, and so does a consumer reading the stored body with it.
pub const MAX_DEPTH: usize = 127;

/// The offset of the first `[` or `{` nested deeper than [`MAX_DEPTH`] in well-formed JSON.
fn too_deep(body: &[u8]) -> Option<usize> {
    // No more openings in all than the limit cannot nest past it. Counting them (vectorized:
    // `b | 0x20 == b'{'` holds for `[` and `{` only, and a chunk of 255 fits a `u8` count) costs a
    // fraction of the byte-by-byte walk below, which almost every body then skips.
    let openings: usize = body
        .chunks(255)
        .map(|chunk| {
            let count = chunk
                .iter()
                .fold(0u8, |count, &b| count + u8::from(b | 0x20 == b'{'));
            usize::from(count)
        })
        .sum();
    if openings <= MAX_DEPTH {
        return None;
    }
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (offset, &byte) in body.iter().enumerate() {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some(offset);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    None
}

/// The path down to the deepest field the parser knew: a syntax error inside an object yields a
/// trailing `?` segment (the key it could not read), which says nothing to the sender.
fn known_path(path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    use std::fmt::Write as _;
    let mut out = String::new();
    for segment in path.iter() {
        match segment {
            Segment::Seq { index } => {
                let _ = write!(out, "[{index}]");
            }
            Segment::Map { key } | Segment::Enum { variant: key } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Unknown => {}
        }
    }
    if out.is_empty() {
        ".".to_owned()
    } else {
        out
    }
}

fn kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests;
