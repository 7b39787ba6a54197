//! The protobuf mirror is complete: for each fixture, decode -> protobuf bytes -> the proto3 JSON
//! mapping (via the descriptor set the gateway serves to grpcurl) gives back the fixture, allowing
//! only what the proto3 JSON rules allow. `tests/data/every_field.json` does the same for a body
//! that carries every field of every webhook message with a real value, and the descriptor pool
//! is walked to keep it so: a field added to the protos without adding it there fails.
//!
//! The rules, checked field by field with the message descriptor:
//! - a fixture `null` is an absent field;
//! - a field without presence (not `optional`, not a message) holding its default (0, false, "",
//!   []) may be absent;
//! - 64-bit integers are JSON strings in the output;
//! - everything else is equal. Every output key must be in the fixture and every fixture key must
//!   be a field of the proto, so a field the proto lacks fails the test.

use std::collections::BTreeSet;

use iqchannels_gateway::pb::webhook::v1::Envelope;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage, FieldDescriptor, Kind, MessageDescriptor};
use serde_json::Value;

const FIXTURES: &[(&str, &[u8])] = &[
    (
        "chat_closed.json",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/chat_closed.json"
        )),
    ),
    (
        "message_created_file.json",
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/fixtures/message_created_file.json"
        )),
    ),
];

/// A body with every field of every webhook message, each at least once with a real value.
const EVERY_FIELD: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/every_field.json"
));

/// Fields whose only value in [`EVERY_FIELD`] is their default, with why a real value cannot be
/// there. `ChatEvent.Transitive`: the body has one event, and a transitive event has no id.
const DEFAULT_ONLY: &[&str] = &["iqchannels.webhook.v1.ChatEvent.transitive"];

const WEBHOOK_PACKAGE: &str = "iqchannels.webhook.v1";

fn pool() -> DescriptorPool {
    DescriptorPool::decode(iqchannels_gateway::pb::FILE_DESCRIPTOR_SET)
        .expect("descriptor set decodes")
}

fn envelope_descriptor() -> MessageDescriptor {
    pool()
        .get_message_by_name("iqchannels.webhook.v1.Envelope")
        .expect("Envelope is in the descriptor set")
}

/// The typed envelope of a body that must decode.
fn decoded(body: &[u8]) -> Envelope {
    let decoded = iqchannels_gateway::decode::decode(body).expect("body decodes");
    assert_eq!(decoded.deviations, [], "every field fits its proto type");
    decoded.envelope
}

/// The proto3 JSON mapping of a webhook body, through the typed decoder and protobuf bytes.
fn proto_json(body: &[u8]) -> Value {
    let bytes = decoded(body).encode_to_vec();
    let dynamic =
        DynamicMessage::decode(envelope_descriptor(), bytes.as_slice()).expect("bytes decode");
    serde_json::to_value(&dynamic).expect("serializes to JSON")
}

/// Every difference between `fixture` and `output` under the rules above.
fn differences(fixture: &Value, output: &Value, message: &MessageDescriptor) -> Vec<String> {
    let mut found = Vec::new();
    compare_message(fixture, output, message, "", &mut found);
    found
}

fn compare_message(
    fixture: &Value,
    output: &Value,
    message: &MessageDescriptor,
    path: &str,
    found: &mut Vec<String>,
) {
    let (Some(fixture), Some(output)) = (fixture.as_object(), output.as_object()) else {
        found.push(format!(
            "{path}: expected objects, fixture {fixture}, output {output}"
        ));
        return;
    };
    for key in output.keys() {
        if !fixture.contains_key(key) {
            found.push(format!(
                "{path}.{key}: in the output but not in the fixture"
            ));
        }
    }
    for (key, expected) in fixture {
        let here = format!("{path}.{key}");
        let Some(field) = message.get_field_by_json_name(key) else {
            found.push(format!(
                "{here}: no field of {} has this json_name",
                message.full_name()
            ));
            continue;
        };
        match output.get(key) {
            None if expected.is_null() => {}
            None if !field.supports_presence() && is_default(expected) => {}
            None => found.push(format!("{here}: {expected} missing from the output")),
            Some(actual) if expected.is_null() => {
                found.push(format!("{here}: fixture null, output {actual}"))
            }
            Some(actual) => compare_field(expected, actual, &field, &here, found),
        }
    }
}

fn compare_field(
    expected: &Value,
    actual: &Value,
    field: &FieldDescriptor,
    path: &str,
    found: &mut Vec<String>,
) {
    if field.is_map() {
        found.push(format!("{path}: map fields are not expected in the mirror"));
        return;
    }
    if field.is_list() {
        let (Some(expected), Some(actual)) = (expected.as_array(), actual.as_array()) else {
            found.push(format!(
                "{path}: expected arrays, fixture {expected}, output {actual}"
            ));
            return;
        };
        if expected.len() != actual.len() {
            found.push(format!(
                "{path}: {} items in the fixture, {} in the output",
                expected.len(),
                actual.len()
            ));
            return;
        }
        for (i, (expected, actual)) in expected.iter().zip(actual).enumerate() {
            compare_value(
                expected,
                actual,
                &field.kind(),
                &format!("{path}[{i}]"),
                found,
            );
        }
        return;
    }
    compare_value(expected, actual, &field.kind(), path, found);
}

fn compare_value(
    expected: &Value,
    actual: &Value,
    kind: &Kind,
    path: &str,
    found: &mut Vec<String>,
) {
    let equal = match kind {
        Kind::Message(message) if message.full_name() == "google.protobuf.Value" => {
            same_json(expected, actual)
        }
        Kind::Message(message) => {
            compare_message(expected, actual, message, path, found);
            return;
        }
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
            // proto3 JSON: 64-bit integers are strings, exactly the fixture's digits.
            (expected.is_i64() || expected.is_u64())
                && actual.as_str() == Some(expected.to_string().as_str())
        }
        Kind::Double | Kind::Float => expected.as_f64() == actual.as_f64() && actual.is_number(),
        _ => expected == actual,
    };
    if !equal {
        found.push(format!(
            "{path}: fixture {expected}, output {actual} ({kind:?})"
        ));
    }
}

/// JSON equality, numbers compared as doubles (`google.protobuf.Value` holds doubles).
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(a, b)| same_json(a, b))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

fn is_default(value: &Value) -> bool {
    match value {
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(items) => items.is_empty(),
        _ => false,
    }
}

#[test]
fn both_fixtures_survive_protobuf_and_come_back_as_the_same_json() {
    let descriptor = envelope_descriptor();
    for (name, body) in FIXTURES {
        let fixture: Value = serde_json::from_slice(body).expect("fixture is JSON");
        let output = proto_json(body);
        let found = differences(&fixture, &output, &descriptor);
        assert!(
            found.is_empty(),
            "{name}: the proto3 JSON mapping differs from the fixture:\n{}\n\noutput:\n{}",
            found.join("\n"),
            serde_json::to_string_pretty(&output).unwrap_or_default()
        );
    }
}

#[test]
fn int64_beyond_2_pow_53_is_an_exact_string_in_the_json_mapping() {
    let output = proto_json(br#"{"ChatEvent": {"Id": 9007199254740993, "Type": "chat_closed"}}"#);
    assert_eq!(output["ChatEvent"]["Id"], "9007199254740993");
}

#[test]
fn the_comparison_catches_a_field_the_proto_lacks() {
    let descriptor = envelope_descriptor();
    let mut fixture: Value = serde_json::from_slice(FIXTURES[0].1).expect("fixture is JSON");
    fixture["Rels"]["Chats"][0]["Unmodelled"] = Value::from(1);
    let found = differences(&fixture, &proto_json(FIXTURES[0].1), &descriptor);
    assert_eq!(found.len(), 1, "{found:?}");
    assert!(
        found[0].starts_with(".Rels.Chats[0].Unmodelled"),
        "{found:?}"
    );
}

#[test]
fn the_comparison_catches_a_changed_value_and_a_lost_null() {
    let descriptor = envelope_descriptor();
    let body = FIXTURES[1].1;
    let output = proto_json(body);
    let mut changed: Value = serde_json::from_slice(body).expect("fixture is JSON");
    changed["ChatEvent"]["UserId"] = Value::from(2);
    // Non-null where the output has nothing: a present-but-unset optional must not pass.
    changed["ChatEvent"]["ClientId"] = Value::from(0);
    let found = differences(&changed, &output, &descriptor);
    assert_eq!(found.len(), 2, "{found:?}");
}

/// The full names of the fields that hold a real value (not null, not the default) somewhere in
/// `body`, read as `message`.
fn covered(body: &Value, message: &MessageDescriptor) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    cover_message(body, message, &mut found);
    found
}

fn cover_message(body: &Value, message: &MessageDescriptor, found: &mut BTreeSet<String>) {
    let Some(object) = body.as_object() else {
        return;
    };
    for (key, value) in object {
        let Some(field) = message.get_field_by_json_name(key) else {
            continue;
        };
        if !value.is_null() && !is_default(value) {
            found.insert(field.full_name().to_owned());
        }
        match field.kind() {
            Kind::Message(inner) if inner.full_name() != "google.protobuf.Value" => {
                match value.as_array() {
                    Some(items) => items
                        .iter()
                        .for_each(|item| cover_message(item, &inner, found)),
                    None => cover_message(value, &inner, found),
                }
            }
            _ => {}
        }
    }
}

/// The fields of the webhook messages in the descriptor set that `body` lacks a real value for.
fn uncovered(body: &Value) -> Vec<String> {
    let found = covered(body, &envelope_descriptor());
    pool()
        .all_messages()
        .filter(|message| message.package_name() == WEBHOOK_PACKAGE)
        .flat_map(|message| message.fields().collect::<Vec<_>>())
        .map(|field| field.full_name().to_owned())
        .filter(|name| !found.contains(name) && !DEFAULT_ONLY.contains(&name.as_str()))
        .collect()
}

#[test]
fn a_body_with_every_known_field_survives_protobuf_and_comes_back_as_the_same_json() {
    let body: Value = serde_json::from_slice(EVERY_FIELD).expect("every_field.json is JSON");
    let output = proto_json(EVERY_FIELD);
    let found = differences(&body, &output, &envelope_descriptor());
    assert!(
        found.is_empty(),
        "every_field.json: the proto3 JSON mapping differs from the body:\n{}\n\noutput:\n{}",
        found.join("\n"),
        serde_json::to_string_pretty(&output).unwrap_or_default()
    );
}

#[test]
fn every_field_of_every_webhook_message_has_a_real_value_in_the_every_field_body() {
    let body: Value = serde_json::from_slice(EVERY_FIELD).expect("every_field.json is JSON");
    let missing = uncovered(&body);
    assert!(
        missing.is_empty(),
        "tests/data/every_field.json has no real (non-null, non-default) value for:\n{}",
        missing.join("\n")
    );
}

#[test]
fn the_coverage_check_catches_a_field_missing_from_the_body() {
    let mut body: Value = serde_json::from_slice(EVERY_FIELD).expect("every_field.json is JSON");
    let users = body["Rels"]["Users"]
        .as_array_mut()
        .expect("Rels.Users is an array");
    for user in users {
        user.as_object_mut()
            .expect("a user is an object")
            .remove("Pseudonym");
    }
    assert_eq!(
        uncovered(&body),
        ["iqchannels.webhook.v1.User.pseudonym"],
        "only the removed field is reported"
    );
}
