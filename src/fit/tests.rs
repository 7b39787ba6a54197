//! Every accepted event fits one gRPC message at the default 4 MiB in its largest form, whatever
//! the body within `--max-body-bytes`.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::wire::{EncodedEvent, Form, WireEvent};
use prost::Message;

const MAX_BODY: usize = 1 << 20;

/// A body of `ChatEvent` pointing at chat 1, project 1, client 1, user 1 and message 1, with
/// `rels` (JSON object members) added, padded with `filler` opaque items until it is close to
/// `MAX_BODY` bytes.
fn body(shape: u8, seed: u64) -> Vec<u8> {
    let zeros = |n: usize| vec!["0"; n].join(",");
    // Room left for each shape's bulk, so that the body ends near MAX_BODY.
    let room = MAX_BODY - 2_000;
    let rels = match shape % 7 {
        // Random decimals: incompressible numbers, each kept as text and as a double.
        6 => {
            let mut state = seed | 1;
            let mut items = String::new();
            while items.len() + 8 < room {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                items.push_str(&format!("{}.{},", state % 1000, state / 1000 % 1000));
            }
            items.pop();
            format!(r#""Projects":[{{"Id":1,"Options":[{items}]}}]"#)
        }
        // One huge array of opaque zeros in the referenced project (copied again as a
        // reference): the 5.6x case.
        0 => format!(r#""Projects":[{{"Id":1,"Options":[{}]}}]"#, zeros(room / 2)),
        // Many small opaque values, over many entities.
        1 => {
            let each = r#"{"Id":9,"Options":[0,0,0,0,0,0,0,0],"Permissions":{"a":0,"b":[0,0]}},"#;
            let mut items = String::new();
            while items.len() + each.len() < room {
                items.push_str(each);
            }
            items.pop();
            format!(r#""Projects":[{{"Id":1,"Options":[0]}},{items}]"#)
        }
        // Deep values: arrays nested close to the depth cut, many of them.
        2 => {
            let deep = format!("{}0{}", "[".repeat(30), "]".repeat(30));
            let mut items = String::new();
            while items.len() + deep.len() + 1 < room {
                items.push_str(&deep);
                items.push(',');
            }
            items.pop();
            format!(r#""Clients":[{{"Id":1,"Fields":[{items}]}}]"#)
        }
        // Objects of many keys, split between a user and a client (both referenced).
        3 => {
            let half = |prefix: &str| {
                let mut members = String::new();
                let mut i = 0;
                while members.len() < room / 2 - 100 {
                    members.push_str(&format!(r#""{prefix}{i}":0,"#));
                    i += 1;
                }
                members.pop();
                members
            };
            format!(
                r#""Users":[{{"Id":1,"Permissions":{{{}}}}}],"Clients":[{{"Id":1,"Fields":{{{}}}}}]"#,
                half("u"),
                half("c")
            )
        }
        // Empty strings and nulls: the smallest JSON items.
        4 => {
            let items = vec![r#""""#; room / 3].join(",");
            format!(r#""Projects":[{{"Id":1,"Permissions":[{items}]}}]"#)
        }
        // A mix in sizes chosen by the seed: one big value and many small ones.
        _ => {
            let big = (seed as usize % (room / 3)).max(1);
            let mut rest = String::new();
            while rest.len() + 40 < room - big * 2 {
                rest.push_str(r#"{"Id":7,"Options":[0,0,0]},"#);
            }
            rest.pop();
            format!(
                r#""Projects":[{{"Id":1,"Options":[{}]}}{}{rest}]"#,
                zeros(big),
                if rest.is_empty() { "" } else { "," }
            )
        }
    };
    let body = format!(
        r#"{{"ChatEvent":{{"Id":{},"Type":"message_created","ChatId":1,"ClientId":1,"UserId":1,"MessageId":1}},"Rels":{{"Chats":[{{"Id":1,"ProjectId":1,"ClientId":1}}],"ChatMessages":[{{"Id":1,"ChatId":1,"Text":"hi"}}],{rels}}}}}"#,
        seed.max(1) % 1_000_000_000 + 1
    );
    assert!(
        body.len() <= MAX_BODY,
        "shape {shape}: {} bytes",
        body.len()
    );
    body.into_bytes()
}

/// The event `body` becomes, as a subscriber asking for everything receives it.
fn largest_event(body: &[u8]) -> (Vec<u8>, Vec<Deviation>) {
    let decoded = crate::decode::decode(body).expect("the body decodes");
    let (payload, _, deviations) = crate::gateway::stored_record(
        decoded.envelope,
        bytes::Bytes::copy_from_slice(body),
        decoded.deviations,
        DEFAULT_MAX_EVENT_BYTES,
    )
    .expect("every body within --max-body-bytes is accepted");
    // The record (what the store must take: README's NATS `max_payload` rule) is never larger
    // than the event's largest form plus its outer part (keys, digests).
    let record_len = payload.len();
    let event = EncodedEvent::from_payload(u64::MAX, i64::MIN, payload).expect("it reads back");
    let wire = WireEvent {
        event: Arc::new(event),
        form: Form {
            raw_json: true,
            references: true,
        },
    };
    let largest = wire.encode_to_vec();
    assert!(
        record_len <= largest.len() + 1024,
        "a record of {record_len} bytes for a largest form of {}",
        largest.len()
    );
    (largest, deviations)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn every_accepted_event_fits_4_mib_in_its_largest_form(shape in 0u8..7, seed in any::<u64>()) {
        let body = body(shape, seed);
        let (event, deviations) = largest_event(&body);
        prop_assert!(
            event.len() <= DEFAULT_MAX_EVENT_BYTES,
            "shape {}: {} bytes", shape, event.len()
        );
        // A stock decoder reads it (prost: no size limit of its own, 100 levels of nesting).
        let decoded = crate::pb::client::Event::decode(event.as_slice());
        prop_assert!(decoded.is_ok(), "shape {}: {:?}", shape, decoded.err());
        let decoded = decoded.unwrap();
        prop_assert_eq!(decoded.raw_json.as_slice(), body.as_slice(), "the body is kept whole");
        prop_assert_eq!(decoded.deviations.len(), deviations.len());
        prop_assert!(decoded.deviations.len() <= crate::decode::MAX_DEVIATIONS + 1 + CUTS_REPORTED + 1);
    }
}

#[test]
fn the_largest_opaque_value_is_cut_first_and_reported_and_the_references_agree() {
    let body = body(0, 3);
    let (event, deviations) = largest_event(&body);
    assert!(event.len() <= DEFAULT_MAX_EVENT_BYTES);
    let cut: Vec<&Deviation> = deviations
        .iter()
        .filter(|d| d.outcome == Outcome::Cut)
        .collect();
    assert_eq!(cut.len(), 1, "{deviations:?}");
    assert_eq!(cut[0].path, "Rels.Projects[0].Options");
    assert_eq!(cut[0].pattern, "Rels.Projects[].Options");
    assert_eq!(cut[0].found, "an array");
    let decoded = crate::pb::client::Event::decode(event.as_slice()).unwrap();
    let envelope = decoded.envelope.unwrap();
    let project = &envelope.rels.as_ref().unwrap().projects[0];
    let null = prost_types::Value {
        kind: Some(prost_types::value::Kind::NullValue(0)),
    };
    assert_eq!(project.options, Some(null));
    // The reference is the cut entity, as in the envelope.
    let references = decoded.references.unwrap();
    assert_eq!(references.project.as_ref(), Some(project));
    assert_eq!(references.chat.map(|c| c.id), Some(1));
    assert_eq!(references.message.map(|m| m.text), Some("hi".to_owned()));
}

#[test]
fn an_event_that_fits_is_left_alone() {
    let body = br#"{"ChatEvent":{"Id":5,"Type":"t","ChatId":1},"Rels":{"Chats":[{"Id":1,"ProjectId":2}],"Projects":[{"Id":2,"Options":[0,0,0]}]}}"#;
    let decoded = crate::decode::decode(body).unwrap();
    let encoded = Bytes::from(decoded.envelope.encode_to_vec());
    let indices = crate::decode::indices(&decoded.envelope);
    let mut deviations = Vec::new();
    let (fitted, cut) = fit(
        decoded.envelope,
        encoded.clone(),
        &indices,
        body.len(),
        &mut deviations,
        DEFAULT_MAX_EVENT_BYTES,
    )
    .unwrap();
    assert!(!cut);
    assert!(deviations.is_empty());
    assert_eq!(fitted, encoded);
}

#[test]
fn an_event_that_cannot_fit_even_cut_is_refused_naming_the_flag() {
    // Typed text, not opaque: nothing to cut.
    let text = "x".repeat(300_000);
    let body = format!(
        r#"{{"ChatEvent":{{"Id":5,"Type":"t","MessageId":1}},"Rels":{{"ChatMessages":[{{"Id":1,"Text":"{text}"}}]}}}}"#
    );
    let decoded = crate::decode::decode(body.as_bytes()).unwrap();
    let encoded = Bytes::from(decoded.envelope.encode_to_vec());
    let indices = crate::decode::indices(&decoded.envelope);
    let error = fit(
        decoded.envelope,
        encoded,
        &indices,
        body.len(),
        &mut Vec::new(),
        700_000,
    )
    .unwrap_err();
    assert!(error.to_string().contains("--max-event-bytes"), "{error}");
    assert!(error.to_string().contains("too large"), "{error}");
}

/// The oracle: the opaque values of `envelope` by path, with their kind and encoded length, as
/// reflection over the decoded message sees them (slow and memory-hungry, but plainly right).
fn reflected_values(envelope: &Envelope) -> Vec<(String, &'static str, usize)> {
    use prost_reflect::{DynamicMessage, ReflectMessage, Value};
    fn walk(message: &DynamicMessage, path: &str, out: &mut Vec<(String, &'static str, usize)>) {
        for field in message.descriptor().fields() {
            if field.kind().as_message().is_none() || field.is_map() || !message.has_field(&field) {
                continue;
            }
            let name = if path.is_empty() {
                field.json_name().to_owned()
            } else {
                format!("{path}.{}", field.json_name())
            };
            let mut visit = |item: &DynamicMessage, at: String| {
                if item.descriptor().full_name() == VALUE {
                    let kinds = [
                        (2, "a number"),
                        (3, "a string"),
                        (4, "a boolean"),
                        (5, "an object"),
                        (6, "an array"),
                    ];
                    let kind = kinds
                        .iter()
                        .find(|(number, _)| item.has_field_by_number(*number))
                        .map_or("null", |(_, kind)| kind);
                    out.push((at, kind, item.encoded_len()));
                } else {
                    walk(item, &at, out);
                }
            };
            match &*message.get_field(&field) {
                Value::List(items) => {
                    for (index, item) in items.iter().enumerate() {
                        if let Value::Message(item) = item {
                            visit(item, format!("{name}[{index}]"));
                        }
                    }
                }
                Value::Message(item) => visit(item, name),
                _ => {}
            }
        }
    }
    let descriptor = descriptor("iqchannels.webhook.v1.Envelope").unwrap();
    let message = DynamicMessage::decode(descriptor, envelope.encode_to_vec().as_slice()).unwrap();
    let mut out = Vec::new();
    walk(&message, "", &mut out);
    out.sort();
    out
}

/// A small body with opaque values of every kind in every entity that has them, some entities
/// repeated, chosen by `picks`.
fn small_body(picks: &[u8]) -> String {
    let value = |pick: u8| match pick % 7 {
        0 => "null".to_owned(),
        1 => "12.5".to_owned(),
        2 => r#""text""#.to_owned(),
        3 => "true".to_owned(),
        4 => format!(
            r#"{{"a":[{}],"b":{{}}}}"#,
            "0,".repeat(pick as usize % 5) + "1"
        ),
        5 => format!("[{}]", "0,".repeat(pick as usize) + "0"),
        _ => "[]".to_owned(),
    };
    let mut picks = picks.iter().copied().cycle();
    let mut next = || value(picks.next().unwrap_or(0));
    let projects: Vec<String> = (1..=3)
        .map(|id| {
            format!(
                r#"{{"Id":{id},"Options":{},"Permissions":{}}}"#,
                next(),
                next()
            )
        })
        .collect();
    format!(
        r#"{{"ChatEvent":{{"Id":5,"Type":"message_created","ChatId":1,"ClientId":1,"UserId":1,"MessageId":1}},"Rels":{{"Chats":[{{"Id":1,"ProjectId":2,"ClientId":1,"BotpressPayload":{}}}],"ChatMessages":[{{"Id":1,"ChatId":1,"Text":"hi"}}],"Projects":[{}],"Users":[{{"Id":1,"Permissions":{}}},{{"Id":2,"Permissions":{}}}],"Clients":[{{"Id":1,"Fields":{}}}],"Channels":[{{"Id":3,"APNS":{}}}]}}}}"#,
        next(),
        projects.join(","),
        next(),
        next(),
        next(),
        next()
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The byte walk finds exactly the opaque values reflection finds, with the same paths,
    /// kinds and sizes; cutting any subset of them gives the envelope reflection would give.
    #[test]
    fn the_byte_walk_agrees_with_reflection(
        picks in proptest::collection::vec(any::<u8>(), 1..16),
        cut_mask in any::<u64>(),
    ) {
        let body = small_body(&picks);
        let decoded = crate::decode::decode(body.as_bytes()).expect("the body decodes");
        let encoded = decoded.envelope.encode_to_vec();
        let descriptor = descriptor("iqchannels.webhook.v1.Envelope").unwrap();
        let mut candidates = Vec::new();
        collect(&encoded, 0, &descriptor, &mut String::new(), &mut candidates).unwrap();
        let mut walked: Vec<(String, &'static str, usize)> = candidates
            .iter()
            .map(|c| (c.path.clone(), c.found, c.range.len()))
            .collect();
        walked.sort();
        prop_assert_eq!(&walked, &reflected_values(&decoded.envelope));

        // Cut a subset; every value cut is null, every other is unchanged.
        let ranges: Vec<Range<usize>> = candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| cut_mask >> (i % 64) & 1 == 1)
            .map(|(_, c)| c.range.clone())
            .collect();
        let mut out = Vec::new();
        rewrite(&encoded, 0, &descriptor, &ranges, &mut out).unwrap();
        let cut_envelope = Envelope::decode(out.as_slice()).expect("a valid envelope");
        let cut_paths: Vec<&str> = candidates
            .iter()
            .enumerate()
            .filter(|(i, _)| cut_mask >> (i % 64) & 1 == 1)
            .map(|(_, c)| c.path.as_str())
            .collect();
        let after = reflected_values(&cut_envelope);
        prop_assert_eq!(after.len(), walked.len());
        for ((path, kind, len), (before_path, before_kind, before_len)) in after.iter().zip(&walked) {
            prop_assert_eq!(path, before_path);
            if cut_paths.contains(&path.as_str()) {
                prop_assert_eq!((*kind, *len), ("null", NULL_LEN));
            } else {
                prop_assert_eq!((kind, len), (before_kind, before_len));
            }
        }
        // What is not opaque is untouched.
        prop_assert_eq!(&cut_envelope.chat_event, &decoded.envelope.chat_event);
        let (rels, before) = (cut_envelope.rels.unwrap(), decoded.envelope.rels.unwrap());
        prop_assert_eq!(&rels.chat_messages, &before.chat_messages);
        prop_assert_eq!(
            rels.projects.iter().map(|p| p.id).collect::<Vec<_>>(),
            before.projects.iter().map(|p| p.id).collect::<Vec<_>>()
        );
        // Nothing else changed: with nothing cut the bytes are the same.
        if ranges.is_empty() {
            prop_assert_eq!(out, encoded);
        }
    }
}

/// A number that is not finite wherever it is in an opaque value: top level, in a struct, in a
/// list, nested; each cut to `null` with its path, every other value left as it was.
#[test]
fn numbers_that_are_not_finite_are_cut_wherever_they_are() {
    use prost_types::value::Kind;
    use prost_types::{ListValue, Struct, Value};
    let number = |n: f64| Value {
        kind: Some(Kind::NumberValue(n)),
    };
    let list = |items: Vec<Value>| Value {
        kind: Some(Kind::ListValue(ListValue { values: items })),
    };
    let object = |members: Vec<(&str, Value)>| Value {
        kind: Some(Kind::StructValue(Struct {
            fields: members
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        })),
    };
    let null = Value {
        kind: Some(Kind::NullValue(0)),
    };
    let body = br#"{"ChatEvent":{"Id":5,"Type":"t","ChatId":1},"Rels":{"Projects":[{"Id":1},{"Id":2}],"Clients":[{"Id":3}]}}"#;
    let mut envelope = crate::decode::decode(body).unwrap().envelope;
    let rels = envelope.rels.as_mut().unwrap();
    rels.projects[0].options = Some(number(f64::NAN));
    rels.projects[1].permissions = Some(object(vec![
        ("a", number(1.5)),
        ("b", number(f64::INFINITY)),
        ("c", list(vec![number(2.0), number(f64::NEG_INFINITY)])),
    ]));
    rels.clients[0].details = Some(crate::pb::webhook::v1::ClientDetails {
        fields: Some(list(vec![
            object(vec![("deep", list(vec![number(f64::NAN)]))]),
            number(3.0),
        ])),
        ..Default::default()
    });
    let (cut, deviations) = finite(envelope);
    let rels = cut.rels.unwrap();
    assert_eq!(rels.projects[0].options, Some(null.clone()));
    assert_eq!(
        rels.projects[1].permissions,
        Some(object(vec![
            ("a", number(1.5)),
            ("b", null.clone()),
            ("c", list(vec![number(2.0), null.clone()])),
        ]))
    );
    assert_eq!(
        rels.clients[0].details.as_ref().unwrap().fields,
        Some(list(vec![
            object(vec![("deep", list(vec![null.clone()]))]),
            number(3.0),
        ]))
    );
    let mut paths: Vec<(String, String)> = deviations
        .iter()
        .map(|d| (d.path.clone(), d.found.clone()))
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        vec![
            (
                "Rels.Clients[0].Details.Fields[0].deep[0]".to_owned(),
                "NaN".to_owned()
            ),
            ("Rels.Projects[0].Options".to_owned(), "NaN".to_owned()),
            (
                "Rels.Projects[1].Permissions.b".to_owned(),
                "inf".to_owned()
            ),
            (
                "Rels.Projects[1].Permissions.c[1]".to_owned(),
                "-inf".to_owned()
            ),
        ]
    );
    assert!(deviations.iter().all(|d| d.outcome == Outcome::Cut));

    // Nothing to cut: the same envelope, no deviation.
    let plain = crate::decode::decode(body).unwrap().envelope;
    assert_eq!(finite(plain.clone()), (plain, Vec::new()));
}
