//! The tolerant decode (DESIGN invariant 7): reads any JSON body into the typed messages, field by
//! field from the protos' descriptors, and reports what did not fit as [`Deviation`]s instead of
//! refusing the event.
//!
//! It runs only when the fast, strict decode (serde derives on the generated messages) refuses a
//! body, so a body that fits the protos costs nothing here. It works on the body's raw JSON text
//! ([`RawValue`]): a number is never converted before its field's kind is known (ids beyond 2^53
//! stay exact, `1e400` in an unknown field is no error), and a number coerced to a string keeps
//! its JSON text.
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
//! The raw JSON, stored verbatim beside the typed message, keeps everything.

use std::collections::HashMap;
use std::sync::LazyLock;

use prost_reflect::{
    DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor,
    Value as Field,
};
use serde::de::{Deserializer as _, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::{Deviation, Outcome, MAX_DEVIATIONS};
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

/// Decodes `text` (a JSON object) tolerantly. The caller then validates what the gateway needs.
pub(super) fn decode(text: &str) -> Result<Tolerated, Refusal> {
    let raw: &RawValue = serde_json::from_str(text).map_err(|_| Refusal::Syntax)?;
    let Json::Object(entries) = classify(raw)? else {
        return Err(Refusal::Invalid(super::DecodeError::at(
            ".",
            "expected a JSON object",
        )));
    };
    let descriptor = POOL
        .get_message_by_name("iqchannels.webhook.v1.Envelope")
        .expect("the Envelope is in the built-in descriptor set");
    let mut walk = Walk::default();
    let message = walk.message(&descriptor, entries, "")?;
    let envelope = message.transcode_to::<Envelope>().map_err(|error| {
        Refusal::Invalid(super::DecodeError::at(
            ".",
            format!("internal error: the typed event does not encode: {error}"),
        ))
    })?;
    let mut deviations = walk.deviations;
    if walk.omitted > 0 {
        deviations.push(Deviation {
            path: ".".to_owned(),
            expected: format!("at most {MAX_DEVIATIONS} deviations reported per event"),
            found: format!("{} more", walk.omitted),
            outcome: Outcome::Dropped,
            pattern: ".".to_owned(),
        });
    }
    Ok(Tolerated {
        envelope,
        deviations,
    })
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

/// One JSON value, its children left as raw text.
enum Json<'a> {
    Null,
    Bool(bool),
    /// The number's exact JSON text.
    Number(&'a str),
    String(String),
    /// A string that held an unpaired UTF-16 surrogate escape (`"\ud800"`), which no Rust or
    /// protobuf string can hold: each one replaced by U+FFFD.
    Replaced(String),
    Array(Vec<&'a RawValue>),
    Object(Vec<(Text, &'a RawValue)>),
}

impl Json<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Json::Null => "null",
            Json::Bool(_) => "a boolean",
            Json::Number(_) => "a number",
            Json::String(_) => "a string",
            Json::Replaced(_) => "a string with an unpaired surrogate",
            Json::Array(_) => "an array",
            Json::Object(_) => "an object",
        }
    }
}

/// Reads the top level of a raw JSON value (already checked to be well-formed).
fn classify(raw: &RawValue) -> Result<Json<'_>, Refusal> {
    let text = raw.get();
    let syntax = |_| Refusal::Syntax;
    Ok(match text.as_bytes().first() {
        Some(b'n') => Json::Null,
        Some(b't') => Json::Bool(true),
        Some(b'f') => Json::Bool(false),
        Some(b'"') => {
            let string: Text = serde_json::from_str(text).map_err(syntax)?;
            if string.replaced {
                Json::Replaced(string.text)
            } else {
                Json::String(string.text)
            }
        }
        Some(b'[') => Json::Array(serde_json::from_str(text).map_err(syntax)?),
        Some(b'{') => {
            let mut de = serde_json::Deserializer::from_str(text);
            Json::Object(de.deserialize_map(Entries).map_err(syntax)?)
        }
        _ => Json::Number(text),
    })
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

/// An object's entries in order, duplicates kept (the walk reports them).
struct Entries;

impl<'de> Visitor<'de> for Entries {
    type Value = Vec<(Text, &'de RawValue)>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut entries = Vec::new();
        while let Some(entry) = map.next_entry::<Text, &'de RawValue>()? {
            entries.push(entry);
        }
        Ok(entries)
    }
}

/// The state of one decode: the deviations found so far.
#[derive(Default)]
struct Walk {
    deviations: Vec<Deviation>,
    /// Deviations past [`MAX_DEVIATIONS`], counted only.
    omitted: usize,
    /// Inside an opaque value or a map: the pattern of that field, for every deviation below it
    /// (their paths hold keys chosen by the sender).
    within: Option<String>,
}

impl Walk {
    fn deviate(&mut self, path: &str, expected: &str, found: &str, outcome: Outcome) {
        if self.deviations.len() >= MAX_DEVIATIONS {
            self.omitted += 1;
            return;
        }
        let pattern = match &self.within {
            Some(pattern) => pattern.clone(),
            None => super::path_pattern(path),
        };
        self.deviations.push(Deviation {
            path: path.to_owned(),
            expected: expected.to_owned(),
            found: found.to_owned(),
            outcome,
            pattern,
        });
    }

    /// A string whose unpaired surrogates were replaced by U+FFFD.
    fn replaced(&mut self, path: &str) {
        self.deviate(
            path,
            "a string",
            "a string with an unpaired surrogate",
            Outcome::Replaced,
        );
    }

    /// An entry's key and its path below `path`, reporting a replaced surrogate in the key.
    fn entry_key(&mut self, key: Text, path: &str) -> (String, String) {
        let entry_path = format!("{path}.{}", key.text);
        if key.replaced {
            self.replaced_key(&entry_path);
        }
        (key.text, entry_path)
    }

    /// A key whose unpaired surrogates were replaced by U+FFFD.
    fn replaced_key(&mut self, path: &str) {
        self.deviate(
            path,
            "a key",
            "a key with an unpaired surrogate",
            Outcome::Replaced,
        );
    }

    /// Runs `f` with deviations below `path` labelled with `path`'s pattern.
    fn within<T>(&mut self, path: &str, f: impl FnOnce(&mut Self) -> T) -> T {
        let outer = self.within.take();
        self.within = Some(outer.clone().unwrap_or_else(|| super::path_pattern(path)));
        let result = f(self);
        self.within = outer;
        result
    }

    fn message(
        &mut self,
        descriptor: &MessageDescriptor,
        entries: Vec<(Text, &RawValue)>,
        path: &str,
    ) -> Result<DynamicMessage, Refusal> {
        let mut message = DynamicMessage::new(descriptor.clone());
        let mut seen = Vec::new();
        for (
            Text {
                text: key,
                replaced,
            },
            raw,
        ) in entries
        {
            let Some(field) = descriptor.get_field_by_json_name(&key) else {
                // Unknown to the proto: kept in the raw JSON only. A key with an unpaired
                // surrogate (no field's name) is reported, as the strict decode refuses it.
                if replaced {
                    let key_path = if path.is_empty() {
                        key
                    } else {
                        format!("{path}.{key}")
                    };
                    // Labelled `ChatEvent.*` (or by the enclosing map or opaque field): the key
                    // is the sender's, and labels stay bounded.
                    let pattern = self.within.clone().unwrap_or_else(|| {
                        if path.is_empty() {
                            "*".to_owned()
                        } else {
                            format!("{}.*", super::path_pattern(path))
                        }
                    });
                    let outer = self.within.replace(pattern);
                    self.replaced_key(&key_path);
                    self.within = outer;
                }
                continue;
            };
            let field_path = if path.is_empty() {
                key
            } else {
                format!("{path}.{key}")
            };
            if seen.contains(&field.number()) {
                self.deviate(
                    &field_path,
                    "the key once",
                    "a duplicate key (the last one is kept)",
                    Outcome::Dropped,
                );
                message.clear_field(&field);
            }
            seen.push(field.number());
            if let Some(value) = self.field(&field, raw, &field_path)? {
                message.set_field(&field, value);
            }
        }
        Ok(message)
    }

    fn field(
        &mut self,
        field: &FieldDescriptor,
        raw: &RawValue,
        path: &str,
    ) -> Result<Option<Field>, Refusal> {
        let json = classify(raw)?;
        if matches!(json, Json::Null) {
            return Ok(None);
        }
        if field.is_map() {
            return self.within(path, |walk| walk.map(field, json, path));
        }
        if field.is_list() {
            let Json::Array(items) = json else {
                self.deviate(path, "a list", json.kind(), Outcome::Dropped);
                return Ok(None);
            };
            let kind = field.kind();
            let mut values = Vec::with_capacity(items.len());
            for (index, item) in items.into_iter().enumerate() {
                let item_path = format!("{path}[{index}]");
                let item = classify(item)?;
                if matches!(item, Json::Null) {
                    self.deviate(&item_path, expected(&kind), "null", Outcome::Dropped);
                    continue;
                }
                if let Some(value) = self.single(&kind, item, &item_path)? {
                    values.push(value);
                }
            }
            return Ok(Some(Field::List(values)));
        }
        self.single(&field.kind(), json, path)
    }

    fn map(
        &mut self,
        field: &FieldDescriptor,
        json: Json,
        path: &str,
    ) -> Result<Option<Field>, Refusal> {
        let Json::Object(entries) = json else {
            self.deviate(path, "an object", json.kind(), Outcome::Dropped);
            return Ok(None);
        };
        let Kind::Message(entry) = field.kind() else {
            return Ok(None);
        };
        let key_kind = entry.map_entry_key_field().kind();
        let value_kind = entry.map_entry_value_field().kind();
        let mut map = HashMap::with_capacity(entries.len());
        for (key, raw) in entries {
            let (key, entry_path) = self.entry_key(key, path);
            let key = match key_kind {
                Kind::String => Some(MapKey::String(key)),
                Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => key.parse().ok().map(MapKey::I64),
                Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => key.parse().ok().map(MapKey::I32),
                Kind::Uint64 | Kind::Fixed64 => key.parse().ok().map(MapKey::U64),
                Kind::Uint32 | Kind::Fixed32 => key.parse().ok().map(MapKey::U32),
                Kind::Bool => key.parse().ok().map(MapKey::Bool),
                _ => None,
            };
            let Some(key) = key else {
                self.deviate(
                    &entry_path,
                    "a key of the map's kind",
                    "another key",
                    Outcome::Dropped,
                );
                continue;
            };
            let value = classify(raw)?;
            if matches!(value, Json::Null) {
                continue;
            }
            if let Some(value) = self.single(&value_kind, value, &entry_path)? {
                map.insert(key, value);
            }
        }
        Ok(Some(Field::Map(map)))
    }

    /// One value of `kind` (not null).
    fn single(&mut self, kind: &Kind, json: Json, path: &str) -> Result<Option<Field>, Refusal> {
        let found = json.kind();
        let (value, coerced) = match (kind, json) {
            (Kind::Message(descriptor), json)
                if descriptor.full_name() == "google.protobuf.Value" =>
            {
                let value = self.within(path, |walk| walk.opaque(json, path, 1))?;
                let mut message = DynamicMessage::new(descriptor.clone());
                message.transcode_from(&value).map_err(|error| {
                    Refusal::Invalid(super::DecodeError::at(
                        path,
                        format!("internal error: {error}"),
                    ))
                })?;
                (Some(Field::Message(message)), false)
            }
            (Kind::Message(descriptor), Json::Object(entries)) => (
                Some(Field::Message(self.message(descriptor, entries, path)?)),
                false,
            ),
            (Kind::Bool, Json::Bool(b)) => (Some(Field::Bool(b)), false),
            (Kind::Bool, Json::Number(text)) => match exact_integer(text) {
                Some(0) => (Some(Field::Bool(false)), true),
                Some(1) => (Some(Field::Bool(true)), true),
                _ => (None, false),
            },
            (Kind::Bool, Json::String(s)) => match s.as_str() {
                "true" => (Some(Field::Bool(true)), true),
                "false" => (Some(Field::Bool(false)), true),
                _ => (None, false),
            },
            (Kind::String, Json::String(s)) => (Some(Field::String(s)), false),
            (Kind::String, Json::Replaced(s)) => {
                self.replaced(path);
                return Ok(Some(Field::String(s)));
            }
            (Kind::String, Json::Number(text)) => (Some(Field::String(text.to_owned())), true),
            (Kind::Double | Kind::Float, Json::Number(text)) => (float(kind, text), false),
            (Kind::Double | Kind::Float, Json::String(s)) => (float(kind, &s), true),
            (Kind::Bytes, Json::String(s)) => (Some(Field::Bytes(s.into_bytes().into())), true),
            (Kind::Enum(descriptor), Json::String(s)) => (
                descriptor
                    .get_value_by_name(&s)
                    .map(|value| Field::EnumNumber(value.number())),
                false,
            ),
            (Kind::Enum(_), Json::Number(text)) => (
                exact_integer(text)
                    .and_then(|n| i32::try_from(n).ok())
                    .map(Field::EnumNumber),
                true,
            ),
            (integer, Json::Number(text)) => {
                let exact = text.parse::<i128>().ok();
                let value = exact.or_else(|| exact_integer(text));
                (
                    value.and_then(|n| integer_field(integer, n)),
                    exact.is_none(),
                )
            }
            (integer, Json::String(s)) if is_decimal(&s) => {
                (s.parse().ok().and_then(|n| integer_field(integer, n)), true)
            }
            _ => (None, false),
        };
        match value {
            Some(value) => {
                if coerced {
                    self.deviate(path, expected(kind), found, Outcome::Coerced);
                }
                Ok(Some(value))
            }
            None => {
                self.deviate(path, expected(kind), found, Outcome::Dropped);
                Ok(None)
            }
        }
    }

    /// Any JSON as a `google.protobuf.Value` at protobuf level `depth`, cut to `null` below
    /// [`MAX_VALUE_DEPTH`].
    fn opaque(
        &mut self,
        json: Json,
        path: &str,
        depth: usize,
    ) -> Result<prost_types::Value, Refusal> {
        use prost_types::value::Kind as V;
        let null = V::NullValue(prost_types::NullValue::NullValue.into());
        let cost = match json {
            Json::Array(_) => 2,
            Json::Object(_) => 3,
            _ => 0,
        };
        if depth + cost > MAX_VALUE_DEPTH {
            self.deviate(
                path,
                &format!("at most {MAX_VALUE_DEPTH} protobuf nesting levels in an opaque value"),
                json.kind(),
                Outcome::Cut,
            );
            return Ok(prost_types::Value { kind: Some(null) });
        }
        let kind = match json {
            Json::Null => null,
            Json::Bool(b) => V::BoolValue(b),
            Json::Number(text) => match text.parse::<f64>() {
                Ok(n) if n.is_finite() => V::NumberValue(n),
                _ => {
                    self.deviate(
                        path,
                        "a number within double range",
                        "a number",
                        Outcome::Dropped,
                    );
                    null
                }
            },
            Json::String(s) => V::StringValue(s),
            Json::Replaced(s) => {
                self.replaced(path);
                V::StringValue(s)
            }
            Json::Array(items) => {
                let mut values = Vec::with_capacity(items.len());
                for (index, item) in items.into_iter().enumerate() {
                    let item = classify(item)?;
                    values.push(self.opaque(item, &format!("{path}[{index}]"), depth + cost)?);
                }
                V::ListValue(prost_types::ListValue { values })
            }
            Json::Object(entries) => {
                let mut fields = std::collections::BTreeMap::new();
                for (key, item) in entries {
                    let (key, item_path) = self.entry_key(key, path);
                    let item = classify(item)?;
                    let value = self.opaque(item, &item_path, depth + cost)?;
                    fields.insert(key, value);
                }
                V::StructValue(prost_types::Struct { fields })
            }
        };
        Ok(prost_types::Value { kind: Some(kind) })
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

/// `n` as a field of the integer `kind`, when it fits.
fn integer_field(kind: &Kind, n: i128) -> Option<Field> {
    match kind {
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => i64::try_from(n).ok().map(Field::I64),
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => i32::try_from(n).ok().map(Field::I32),
        Kind::Uint64 | Kind::Fixed64 => u64::try_from(n).ok().map(Field::U64),
        Kind::Uint32 | Kind::Fixed32 => u32::try_from(n).ok().map(Field::U32),
        _ => None,
    }
}

/// A floating-point field from a number's text; `None` when it is not finite in that width.
fn float(kind: &Kind, text: &str) -> Option<Field> {
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
            narrow.is_finite().then_some(Field::F32(narrow))
        }
        _ => Some(Field::F64(n)),
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
