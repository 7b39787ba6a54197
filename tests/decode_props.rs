//! Properties: the decoder never panics on a mutated fixture, and every rejection names a field
//! path and says what is wrong; any JSON value placed at any field of a valid event (other than
//! the few the gateway needs), strings and keys with unpaired surrogate escapes included, is
//! stored, coerced or reported as a deviation at that field, and
//! the strict policy refuses exactly the bodies the tolerant one reports deviations for. Mutations are byte-level (flips, truncation, deleted or repeated
//! ranges) and JSON-aware (a value of another type, a deleted key, deep nesting, numbers no
//! integer holds, invalid UTF-8 inside a string), in any combination.

use iqchannels_gateway::decode;
use proptest::prelude::*;
use proptest::sample::Index;
use serde_json::Value;

const CHAT_CLOSED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/chat_closed.json"
));
const MESSAGE_CREATED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/message_created_file.json"
));

/// Stands in a serialized document for raw bytes spliced in afterwards (bytes serde_json would
/// never write: huge numbers, deep nesting, invalid UTF-8).
const MARK: &str = "\u{1}splice\u{1}";
const MARK_JSON: &[u8] = br#""\u0001splice\u0001""#;

/// Raw JSON that no field of the envelope can hold, or that is not JSON at all.
const HOSTILE_VALUES: &[&[u8]] = &[
    b"1e400",
    b"-1e400",
    b"99999999999999999999",
    b"-99999999999999999999",
    b"18446744073709551616",
    b"9223372036854775808",
    b"1.5",
    b"-0",
    b"0x10",
    b"NaN",
    b"Infinity",
    b"\"\xff\"",
    b"\"ab\xc3\"",
    b"\"\xed\xa0\x80\"",
    b"\"\xf4\x90\x80\x80\"",
    b"\"\\ud800\"",
    b"\"\\udc00x\"",
    b"\"\\u00zz\"",
    b"\"\0\"",
    b"\"unterminated",
];

/// What replaces a value chosen in the document.
#[derive(Debug, Clone)]
enum Replacement {
    Null,
    Bool(bool),
    Integer(i64),
    Float(f64),
    Text(String),
    EmptyArray,
    EmptyObject,
    /// `depth` `[` then as many `]`.
    Nested(usize),
    /// One of [`HOSTILE_VALUES`].
    Hostile(Index),
}

/// One change to a fixture.
#[derive(Debug, Clone)]
enum Mutation {
    /// Replaces one value (any depth, objects and arrays included).
    Replace(Index, Replacement),
    /// Removes one member of one object.
    DeleteKey(Index),
    /// Flips one bit of one byte.
    FlipBit(Index, u8),
    /// Keeps only a prefix.
    Truncate(Index),
    /// Removes a range of bytes.
    DeleteRange(Index, Index),
    /// Repeats a range of bytes right after itself.
    DuplicateRange(Index, Index),
}

fn replacement() -> impl Strategy<Value = Replacement> {
    prop_oneof![
        Just(Replacement::Null),
        any::<bool>().prop_map(Replacement::Bool),
        any::<i64>().prop_map(Replacement::Integer),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinities", |f| f.is_finite())
            .prop_map(Replacement::Float),
        ".{0,8}".prop_map(Replacement::Text),
        Just(Replacement::EmptyArray),
        Just(Replacement::EmptyObject),
        prop_oneof![1usize..200, 100_000usize..100_001].prop_map(Replacement::Nested),
        any::<Index>().prop_map(Replacement::Hostile),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<Index>(), replacement()).prop_map(|(at, with)| Mutation::Replace(at, with)),
        2 => any::<Index>().prop_map(Mutation::DeleteKey),
        2 => (any::<Index>(), 0u8..8).prop_map(|(at, bit)| Mutation::FlipBit(at, bit)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::DeleteRange(a, b)),
        1 => (any::<Index>(), any::<Index>()).prop_map(|(a, b)| Mutation::DuplicateRange(a, b)),
    ]
}

/// JSON pointers of every value in `value`, the root included.
fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(members) => {
            for (key, member) in members {
                let key = key.replace('~', "~0").replace('/', "~1");
                pointers(member, format!("{at}/{key}"), out);
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                pointers(item, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// The bytes of `value` with the marker replaced by `splice`.
fn serialize(value: &Value, splice: &[u8]) -> Vec<u8> {
    let text = serde_json::to_vec(value).expect("a Value serializes");
    match text
        .windows(MARK_JSON.len())
        .position(|window| window == MARK_JSON)
    {
        Some(i) => [&text[..i], splice, &text[i + MARK_JSON.len()..]].concat(),
        None => text,
    }
}

/// Applies the JSON-aware mutations to the parsed fixture, then the byte-level ones to its text.
fn mutate(fixture: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut value: Value = serde_json::from_slice(fixture).expect("fixtures are JSON");
    let mut splice = Vec::new();
    for mutation in mutations {
        let mut all = Vec::new();
        pointers(&value, String::new(), &mut all);
        match mutation {
            Mutation::Replace(at, with) => {
                let target = value
                    .pointer_mut(at.get::<String>(&all))
                    .expect("pointer from this value");
                *target = match with {
                    Replacement::Null => Value::Null,
                    Replacement::Bool(b) => Value::Bool(*b),
                    Replacement::Integer(i) => Value::from(*i),
                    Replacement::Float(f) => Value::from(*f),
                    Replacement::Text(s) => Value::String(s.clone()),
                    Replacement::EmptyArray => Value::Array(Vec::new()),
                    Replacement::EmptyObject => Value::Object(Default::default()),
                    // One splice per document: a later one replaces an earlier one.
                    Replacement::Nested(depth) => {
                        splice = [vec![b'['; *depth], vec![b']'; *depth]].concat();
                        Value::String(MARK.into())
                    }
                    Replacement::Hostile(which) => {
                        splice = which.get(HOSTILE_VALUES).to_vec();
                        Value::String(MARK.into())
                    }
                };
            }
            Mutation::DeleteKey(at) => {
                let members: Vec<&String> = all
                    .iter()
                    .filter(|p| value.pointer(p).is_some_and(Value::is_object))
                    .collect();
                if members.is_empty() {
                    continue;
                }
                let parent = at.get(&members).to_string();
                if let Some(Value::Object(object)) = value.pointer_mut(&parent) {
                    if !object.is_empty() {
                        let key = at.get(&object.keys().cloned().collect::<Vec<_>>()).clone();
                        object.remove(&key);
                    }
                }
            }
            _ => {}
        }
    }
    let mut bytes = serialize(&value, &splice);
    for mutation in mutations {
        if bytes.is_empty() {
            break;
        }
        let len = bytes.len();
        match mutation {
            Mutation::FlipBit(at, bit) => bytes[at.index(len)] ^= 1 << bit,
            Mutation::Truncate(at) => bytes.truncate(at.index(len)),
            Mutation::DeleteRange(a, b) => {
                let (start, end) = ordered(a.index(len), b.index(len));
                // Short ranges mostly: a whole-document deletion teaches nothing.
                bytes.drain(start..end.min(start + 64));
            }
            Mutation::DuplicateRange(a, b) => {
                let (start, end) = ordered(a.index(len), b.index(len));
                let range = bytes[start..end.min(start + 64)].to_vec();
                let at = start + range.len();
                bytes.splice(at..at, range);
            }
            Mutation::Replace(..) | Mutation::DeleteKey(_) => {}
        }
    }
    bytes
}

fn ordered(a: usize, b: usize) -> (usize, usize) {
    (a.min(b), a.max(b))
}

/// Decodes `body` and checks the properties; `Err` describes the violation.
fn check(body: &[u8]) -> Result<(), String> {
    match decode::decode(body) {
        Ok(decoded) => {
            decode::validate(&decoded.envelope)
                .map_err(|e| format!("accepted but invalid: {e}"))?;
            if std::str::from_utf8(body).is_err() {
                return Err("accepted a body that is not UTF-8".into());
            }
            Ok(())
        }
        Err(error) if error.path.is_empty() => Err(format!("rejection without a path: {error:?}")),
        Err(error) if error.message.is_empty() => {
            Err(format!("rejection without a message: {error:?}"))
        }
        Err(_) => Ok(()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 1500,
        // A failure prints its minimal input; CI keeps no regression files.
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn mutated_fixtures_decode_or_are_rejected_with_a_path_and_a_message(
        second in any::<bool>(),
        mutations in proptest::collection::vec(mutation(), 1..5),
    ) {
        let fixture = if second { MESSAGE_CREATED } else { CHAT_CLOSED };
        let body = mutate(fixture, &mutations);
        if let Err(violation) = check(&body) {
            prop_assert!(false, "{violation}\nbody: {}", String::from_utf8_lossy(&body));
        }
    }
}

#[test]
fn the_fixtures_themselves_decode() {
    for fixture in [CHAT_CLOSED, MESSAGE_CREATED] {
        decode::decode(fixture).expect("fixture decodes");
    }
}

#[test]
fn every_prefix_of_each_fixture_decodes_or_names_a_path() {
    for fixture in [CHAT_CLOSED, MESSAGE_CREATED] {
        for end in 0..fixture.len() {
            check(&fixture[..end]).unwrap_or_else(|violation| panic!("prefix {end}: {violation}"));
        }
    }
}

#[test]
fn every_hostile_value_at_every_field_decodes_or_names_a_path() {
    for fixture in [CHAT_CLOSED, MESSAGE_CREATED] {
        let value: Value = serde_json::from_slice(fixture).expect("fixtures are JSON");
        let mut all = Vec::new();
        pointers(&value, String::new(), &mut all);
        for pointer in &all {
            for hostile in HOSTILE_VALUES {
                let mut copy = value.clone();
                *copy.pointer_mut(pointer).expect("pointer from this value") =
                    Value::String(MARK.into());
                let body = serialize(&copy, hostile);
                check(&body).unwrap_or_else(|violation| {
                    panic!(
                        "{pointer} = {}: {violation}",
                        String::from_utf8_lossy(hostile)
                    )
                });
                if pointer == "/ChatEvent/Id" && [&b"1e400"[..], b"\"\xff\""].contains(hostile) {
                    let error = decode::decode(&body).expect_err("not an int64");
                    assert_eq!(error.path, "ChatEvent.Id", "{error:?}");
                }
            }
        }
    }
}

#[test]
fn nesting_is_accepted_exactly_as_deep_as_serde_json_reads_it_back() {
    // The envelope is one level, ChatEvent a second; `Extra` (unknown) holds the rest.
    for depth in [
        3,
        decode::MAX_DEPTH - 1,
        decode::MAX_DEPTH,
        decode::MAX_DEPTH + 1,
        100_000,
    ] {
        let nested = "[".repeat(depth - 2) + &"]".repeat(depth - 2);
        let body = format!("{{\"ChatEvent\":{{\"Id\":1,\"Type\":\"t\",\"Extra\":{nested}}}}}");
        let readable = serde_json::from_slice::<Value>(body.as_bytes()).is_ok();
        match decode::decode(body.as_bytes()) {
            Ok(_) => assert!(
                readable && depth <= decode::MAX_DEPTH,
                "depth {depth} accepted"
            ),
            Err(error) => {
                assert!(
                    !readable && depth > decode::MAX_DEPTH,
                    "depth {depth}: {error}"
                );
                assert_eq!(
                    (error.path.as_str(), error.line),
                    (".", Some(1)),
                    "{error:?}"
                );
            }
        }
    }
}

/// Stands in a serialized document (as a string or a key) for an unpaired surrogate escape,
/// which a `Value` cannot hold: [`unpair`] puts it in.
const LONE: &str = "\u{2}lone\u{2}";

/// Replaces each [`LONE`] in serialized JSON with half an emoji, `\ud83d`.
fn unpair(body: Vec<u8>) -> Vec<u8> {
    const SERIALIZED: &[u8] = br"\u0002lone\u0002";
    let mut out = Vec::with_capacity(body.len());
    let mut rest = &body[..];
    while let Some(at) = rest.windows(SERIALIZED.len()).position(|w| w == SERIALIZED) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(br"\ud83d");
        rest = &rest[at + SERIALIZED.len()..];
    }
    out.extend_from_slice(rest);
    out
}

/// Any JSON value, a few levels deep, with the strings and numbers that coercions look at, and
/// strings and keys with an unpaired surrogate.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON has no NaN or infinities", |f| f.is_finite())
            .prop_map(Value::from),
        (-3i64..3).prop_map(|i| Value::from(i as f64)),
        prop_oneof![
            Just("true"),
            Just("false"),
            Just("0"),
            Just("1"),
            Just("-5"),
            Just("84"),
            Just("9223372036854775808"),
            Just("1.5"),
            Just("Привет"),
            Just(""),
        ]
        .prop_map(|s| Value::String(s.to_owned())),
        ".{0,6}".prop_map(Value::String),
        Just(Value::String(LONE.to_owned())),
    ];
    leaf.prop_recursive(4, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::vec(("[A-Za-z]{1,6}|\u{2}lone\u{2}", inner), 0..4)
                .prop_map(|members| Value::Object(members.into_iter().collect())),
        ]
    })
}

/// The gateway's path (`Rels.Chats[0].Id`) of a JSON pointer into `value`.
fn gateway_path(value: &Value, pointer: &str) -> String {
    let mut path = String::new();
    let mut at = value;
    for segment in pointer.split('/').skip(1) {
        let key = segment.replace("~1", "/").replace("~0", "~");
        match at {
            Value::Array(items) => {
                path.push_str(&format!("[{key}]"));
                at = &items[key.parse::<usize>().expect("an index")];
            }
            Value::Object(members) => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key);
                at = &members[&key];
            }
            _ => unreachable!("a pointer from this value"),
        }
    }
    path
}

/// The members the gateway needs (DESIGN invariant 7): a value there may be refused.
const NEEDED: &[&str] = &[
    "",
    "/ChatEvent",
    "/ChatEvent/Type",
    "/ChatEvent/Id",
    "/Rels",
];

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_json_at_any_field_is_stored_with_deviations_only_there(
        second in any::<bool>(),
        at in any::<Index>(),
        replacement in any_json(),
    ) {
        let fixture = if second { MESSAGE_CREATED } else { CHAT_CLOSED };
        let mut value: Value = serde_json::from_slice(fixture).expect("fixtures are JSON");
        let mut all = Vec::new();
        pointers(&value, String::new(), &mut all);
        all.retain(|pointer| !NEEDED.contains(&pointer.as_str()));
        let pointer = at.get(&all).clone();
        let path = gateway_path(&value, &pointer);
        *value.pointer_mut(&pointer).expect("pointer from this value") = replacement.clone();
        let body = unpair(serde_json::to_vec(&value).expect("serializes"));
        let decoded = decode::decode(&body);
        prop_assert!(decoded.is_ok(), "{path} = {replacement}: refused {:?}", decoded.err());
        let decoded = decoded.expect("checked");
        for deviation in &decoded.deviations {
            prop_assert!(
                deviation.path.starts_with(&path),
                "{path} = {replacement}: a deviation elsewhere: {deviation:?}"
            );
            prop_assert!(
                deviation.pattern.len() <= deviation.path.len(),
                "{deviation:?}"
            );
            // Patterns are metric labels: never the sender's keys.
            prop_assert!(!deviation.pattern.contains('\u{FFFD}'), "{deviation:?}");
        }
        let strict = decode::decode_with(&body, decode::Policy::Strict);
        prop_assert_eq!(
            strict.is_ok(),
            decoded.deviations.is_empty(),
            "{} = {}: strict {:?}, tolerant deviations {:?}",
            path, replacement, strict.err(), decoded.deviations
        );
    }
}
