//! Unit tests of the webhook decoder: what it accepts and how it says what it rejects.

use super::*;

const CHAT_CLOSED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/chat_closed.json"
));
const MESSAGE_CREATED_FILE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/message_created_file.json"
));

/// Decodes a body that must fit the protos: no deviation.
fn decode_str(body: &str) -> Result<Envelope, DecodeError> {
    decode(body.as_bytes()).map(|decoded| {
        assert_eq!(decoded.deviations, [], "{body}");
        decoded.envelope
    })
}

#[test]
fn the_2021_chat_closed_fixture_decodes_with_its_relations() {
    let envelope = decode_str(std::str::from_utf8(CHAT_CLOSED).expect("UTF-8")).expect("decodes");
    let event = envelope.chat_event.as_ref().expect("ChatEvent");
    assert_eq!(event.id, 4622);
    assert_eq!(event.r#type, "chat_closed");
    assert_eq!(event.chat_id, Some(13));
    assert_eq!(event.message_id, None, "null MessageId is unset, not 0");
    assert_eq!(event.actor, "user");
    assert_eq!(event.client_id, Some(13));
    assert_eq!(event.user_id, Some(1));
    assert_eq!(event.created_at, 1_632_751_088_427);
    assert!(!event.transitive);

    let rels = envelope.rels.as_ref().expect("Rels");
    assert_eq!(rels.channels.len(), 1);
    assert_eq!(rels.channels[0].title, "Внутренний чат");
    let iqchat = rels.channels[0].iq_chat.as_ref().expect("IQChat block");
    assert_eq!(iqchat.channel_id, 1);
    assert_eq!(iqchat.deleted_at, None);
    assert_eq!(iqchat.apns, None, "APNS: null is unset");
    assert_eq!(rels.chats.len(), 1);
    assert_eq!(rels.chats[0].id, 13);
    assert_eq!(rels.chats[0].ticket_id, Some(403));
    assert_eq!(rels.chats[0].event_id, None);
    assert_eq!(rels.clients.len(), 1);
    let client = &rels.clients[0];
    assert_eq!(client.name, "Альфред Хичкок");
    assert_eq!(client.crm_client_id.as_deref(), Some("4"));
    assert_eq!(client.parent_id, None);
    let details = client.details.as_ref().expect("Details");
    assert_eq!(details.crm_url, "http://ya.ru/");
    assert_eq!(details.birthday, "13.08.1899");
    assert!(!rels.projects.is_empty());
    assert!(!rels.users.is_empty());
    assert!(rels.chat_messages.is_empty());

    let keys = keys(&envelope);
    assert_eq!(keys.event_id, 4622);
    assert_eq!(keys.event_type, "chat_closed");
    assert_eq!(keys.chat_id, Some(13));
    assert_eq!(keys.project_id, Some(1), "project comes from Rels.Chats");
    assert_eq!(keys.channel_id, Some(1));
}

#[test]
fn the_2018_message_created_fixture_decodes_with_its_file() {
    let envelope =
        decode_str(std::str::from_utf8(MESSAGE_CREATED_FILE).expect("UTF-8")).expect("decodes");
    let event = envelope.chat_event.as_ref().expect("ChatEvent");
    assert_eq!(event.id, 608);
    assert_eq!(event.r#type, "message_created");
    assert_eq!(event.message_id, Some(300));
    assert_eq!(event.client_id, None, "null ClientId is unset");
    let rels = envelope.rels.as_ref().expect("Rels");
    let message = &rels.chat_messages[0];
    assert_eq!(message.id, 300);
    assert_eq!(message.payload, "file");
    assert_eq!(message.ticket_message_id, Some(973));
    assert_eq!(
        message.file_id.as_deref(),
        Some("6054cfb4-ee70-11e8-8b35-3fa764e1543e.json")
    );
    assert_eq!(message.received_at, None);
    let file = &rels.files[0];
    assert_eq!(file.id, "6054cfb4-ee70-11e8-8b35-3fa764e1543e.json");
    assert_eq!(file.size, 2493);
    assert_eq!(file.owner_client_id, Some(21));
    assert_eq!(file.image_width, None);
    assert_eq!(rels.projects[0].name, "Физические лица");
    assert_eq!(rels.projects[0].permissions, None);
    assert_eq!(rels.users[0].display_name, "Иван Коробков");
    assert_eq!(
        rels.users[0].avatar_id.as_deref(),
        Some("baac46c4-c475-11e7-999e-fb4e907475d9.jpg")
    );
    assert_eq!(rels.users[0].login, None, "absent Login is unset");
}

#[test]
fn unknown_fields_unknown_rels_kinds_and_unknown_enum_values_are_accepted() {
    let envelope = decode_str(
        r#"{
            "ChatEvent": {"Id": 1, "Type": "brand_new_event", "Actor": "robot",
                          "SomethingNew": {"deep": [1, 2, {"x": null}]}, "Flag": true},
            "Rels": {
                "Chats": [{"Id": 5, "ProjectId": 2, "ChannelId": 3, "Mood": "happy"}],
                "Bots": [{"Id": 1}],
                "RatingPolls": [],
                "Whatever": {"not": "an array"}
            },
            "Signature": "abc"
        }"#,
    )
    .expect("unknown things are skipped, not rejected");
    let event = envelope.chat_event.expect("ChatEvent");
    assert_eq!(event.r#type, "brand_new_event");
    assert_eq!(event.actor, "robot");
    let rels = envelope.rels.expect("Rels");
    assert_eq!(rels.chats.len(), 1);
    assert_eq!(rels.chats[0].project_id, 2);
}

#[test]
fn null_and_absent_optional_fields_are_unset_and_zero_is_kept() {
    let envelope = decode_str(
        r#"{"ChatEvent": {"Id": 1, "Type": "typing", "ChatId": null, "MessageId": 0, "UserId": 7}}"#,
    )
    .expect("decodes");
    let event = envelope.chat_event.expect("ChatEvent");
    assert_eq!(event.chat_id, None, "null");
    assert_eq!(event.client_id, None, "absent");
    assert_eq!(event.message_id, Some(0), "0 is a value, not null");
    assert_eq!(event.user_id, Some(7));
    assert_eq!(envelope.rels, None, "absent Rels");
}

#[test]
fn null_non_nullable_fields_read_as_their_default() {
    let envelope = decode_str(
        r#"{"ChatEvent": {"Id": 1, "Type": "typing", "Actor": null, "Public": null,
                          "CreatedAt": null, "Messages": null},
            "Rels": {"Chats": null, "Users": [{"Id": 2, "Name": null, "Permissions": null}]}}"#,
    )
    .expect("decodes");
    let event = envelope.chat_event.expect("ChatEvent");
    assert_eq!(event.actor, "");
    assert!(!event.public);
    assert_eq!(event.created_at, 0);
    assert!(event.messages.is_empty());
    let rels = envelope.rels.expect("Rels");
    assert!(rels.chats.is_empty());
    assert_eq!(rels.users[0].name, "");
    assert_eq!(rels.users[0].permissions, None);
}

#[test]
fn null_rels_and_null_nested_objects_are_unset() {
    let envelope = decode_str(r#"{"ChatEvent": {"Id": 1, "Type": "chat_changed"}, "Rels": null}"#)
        .expect("decodes");
    assert_eq!(envelope.rels, None);
    let envelope = decode_str(
        r#"{"ChatEvent": {"Id": 1, "Type": "chat_changed"},
            "Rels": {"Clients": [{"Id": 3, "Details": null}]}}"#,
    )
    .expect("decodes");
    assert_eq!(envelope.rels.expect("Rels").clients[0].details, None);
}

#[test]
fn int64_ids_above_2_pow_53_are_exact() {
    let envelope = decode_str(
        r#"{"ChatEvent": {"Id": 9007199254740993, "Type": "chat_closed", "ChatId": 9223372036854775807,
                          "UserId": -9223372036854775808}}"#,
    )
    .expect("decodes");
    let event = envelope.chat_event.expect("ChatEvent");
    assert_eq!(event.id, 9_007_199_254_740_993);
    assert_eq!(event.chat_id, Some(i64::MAX));
    assert_eq!(event.user_id, Some(i64::MIN));
}

#[test]
fn opaque_objects_keep_their_shape() {
    let envelope = decode_str(
        r#"{"ChatEvent": {"Id": 1, "Type": "chat_changed"},
            "Rels": {"Projects": [{"Id": 1, "Options": {"a": [1, "b", true, null]}}]}}"#,
    )
    .expect("decodes");
    use prost_types::value::Kind;
    let options = envelope.rels.expect("Rels").projects[0]
        .options
        .clone()
        .expect("Options kept");
    let Some(Kind::StructValue(fields)) = options.kind else {
        panic!("Options should be a struct, got {options:?}");
    };
    let Some(Kind::ListValue(list)) = fields.fields["a"].kind.clone() else {
        panic!("Options.a should be a list");
    };
    assert_eq!(list.values.len(), 4);
}

#[test]
fn cyrillic_and_emoji_round_trip_exactly() {
    let envelope = decode_str(
        r#"{"ChatEvent": {"Id": 1, "Type": "message_created"},
            "Rels": {"ChatMessages": [{"Id": 2, "Text": "Привет, мир! 👋🏽 \u0436 \ud83d\ude00"}]}}"#,
    )
    .expect("decodes");
    assert_eq!(
        envelope.rels.expect("Rels").chat_messages[0].text,
        "Привет, мир! 👋🏽 ж 😀"
    );
}

#[test]
fn leading_whitespace_and_a_trailing_newline_are_fine() {
    decode_str("\n\t {\"ChatEvent\": {\"Id\": 1, \"Type\": \"typing\"}}\r\n").expect("decodes");
}

#[test]
fn an_envelope_without_an_event_type_fails_validation() {
    let envelope = Envelope {
        chat_event: Some(crate::pb::webhook::v1::ChatEvent {
            id: 1,
            ..Default::default()
        }),
        rels: None,
    };
    let error = validate(&envelope).expect_err("empty type");
    assert_eq!(error.path, "ChatEvent.Type");
    let error = validate(&Envelope::default()).expect_err("no event");
    assert_eq!(error.path, "ChatEvent");
}

/// One rejected body: where the error must point and words the message must contain.
struct Rejection {
    name: &'static str,
    body: &'static [u8],
    path: &'static str,
    message_contains: &'static [&'static str],
    has_position: bool,
}

const REJECTIONS: &[Rejection] = &[
    Rejection {
        name: "malformed JSON: missing colon",
        body: b"{\"ChatEvent\" {\"Id\": 1}}",
        path: ".",
        message_contains: &["malformed JSON", "expected `:`"],
        has_position: true,
    },
    Rejection {
        name: "malformed JSON inside the event",
        body: b"{\"ChatEvent\": {\"Id\": 1,, \"Type\": \"x\"}}",
        path: "ChatEvent",
        message_contains: &["malformed JSON"],
        has_position: true,
    },
    Rejection {
        name: "truncated JSON",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"",
        path: "ChatEvent",
        message_contains: &["JSON"],
        has_position: true,
    },
    Rejection {
        name: "an array body",
        body: b"[{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}}]",
        path: ".",
        message_contains: &["expected a JSON object", "an array"],
        has_position: false,
    },
    Rejection {
        name: "a string body",
        body: b"\"hello\"",
        path: ".",
        message_contains: &["expected a JSON object", "a string"],
        has_position: false,
    },
    Rejection {
        name: "a number body",
        body: b"42",
        path: ".",
        message_contains: &["expected a JSON object", "a number"],
        has_position: false,
    },
    Rejection {
        name: "a null body",
        body: b"null",
        path: ".",
        message_contains: &["expected a JSON object", "null"],
        has_position: false,
    },
    Rejection {
        name: "an empty body",
        body: b"",
        path: ".",
        message_contains: &["empty body", "expected a JSON object"],
        has_position: false,
    },
    Rejection {
        name: "a whitespace-only body",
        body: b"  \n ",
        path: ".",
        message_contains: &["empty body"],
        has_position: false,
    },
    Rejection {
        name: "no ChatEvent",
        body: b"{\"Rels\": {}}",
        path: "ChatEvent",
        message_contains: &["missing field `ChatEvent`", "expected an object"],
        has_position: false,
    },
    Rejection {
        name: "ChatEvent is null",
        body: b"{\"ChatEvent\": null}",
        path: "ChatEvent",
        message_contains: &["ChatEvent", "expected an object"],
        has_position: false,
    },
    Rejection {
        name: "ChatEvent is a string",
        body: b"{\"ChatEvent\": \"chat_closed\"}",
        path: "ChatEvent",
        message_contains: &["invalid type", "string"],
        has_position: true,
    },
    Rejection {
        name: "no Id",
        body: b"{\"ChatEvent\": {\"Type\": \"chat_closed\"}}",
        path: "ChatEvent.Id",
        message_contains: &["missing field `Id`", "only a transitive event"],
        has_position: false,
    },
    Rejection {
        name: "no Type",
        body: b"{\"ChatEvent\": {\"Id\": 1}}",
        path: "ChatEvent.Type",
        message_contains: &["missing field `Type`"],
        has_position: true,
    },
    Rejection {
        name: "empty Type",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"\"}}",
        path: "ChatEvent.Type",
        message_contains: &["empty event type"],
        has_position: false,
    },
    Rejection {
        name: "Id as a string",
        body: b"{\"ChatEvent\": {\"Id\": \"4622\", \"Type\": \"chat_closed\"}}",
        path: "ChatEvent.Id",
        message_contains: &["invalid type", "string \"4622\"", "i64"],
        has_position: true,
    },
    Rejection {
        name: "Id null",
        body: b"{\"ChatEvent\": {\"Id\": null, \"Type\": \"chat_closed\"}}",
        path: "ChatEvent.Id",
        message_contains: &["missing field `Id` or id 0", "positive integer"],
        has_position: false,
    },
    Rejection {
        name: "Id as a float",
        body: b"{\"ChatEvent\": {\"Id\": 1.5, \"Type\": \"chat_closed\"}}",
        path: "ChatEvent.Id",
        message_contains: &["invalid type", "1.5"],
        has_position: true,
    },
    Rejection {
        name: "Id beyond int64",
        body: b"{\"ChatEvent\": {\"Id\": 9223372036854775808, \"Type\": \"chat_closed\"}}",
        path: "ChatEvent.Id",
        message_contains: &["9223372036854775808"],
        has_position: true,
    },
    Rejection {
        name: "Type as a number",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": 5}}",
        path: "ChatEvent.Type",
        message_contains: &["invalid type", "integer `5`", "string"],
        has_position: true,
    },
    Rejection {
        name: "Transitive as a string",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\", \"Transitive\": \"no\"}}",
        path: "ChatEvent.Transitive",
        message_contains: &["invalid type", "boolean"],
        has_position: true,
    },
    Rejection {
        name: "Rels.Chats as an object",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}, \"Rels\": {\"Chats\": {\"Id\": 1}}}",
        path: "Rels.Chats",
        message_contains: &["invalid type", "map", "sequence"],
        has_position: true,
    },
    Rejection {
        name: "ChatEvent as an array (serde would read it positionally)",
        body: b"{\"ChatEvent\": [1, \"chat_closed\"]}",
        path: "ChatEvent",
        message_contains: &["invalid type", "sequence", "expected a JSON object"],
        has_position: true,
    },
    Rejection {
        name: "a Rels item as an array",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}, \"Rels\": {\"Chats\": [[13, 1]]}}",
        path: "Rels.Chats[0]",
        message_contains: &["invalid type", "sequence", "expected a JSON object"],
        has_position: true,
    },
    Rejection {
        name: "Rels as an array",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}, \"Rels\": []}",
        path: "Rels",
        message_contains: &["invalid type", "sequence", "expected a JSON object"],
        has_position: true,
    },
    Rejection {
        name: "a nested id as a string",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}, \"Rels\": {\"Chats\": [{\"Id\": 1, \"ProjectId\": \"1\"}]}}",
        path: "Rels.Chats[0].ProjectId",
        message_contains: &["invalid type", "string \"1\"", "i64"],
        has_position: true,
    },
    Rejection {
        name: "the second item of an array",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}, \"Rels\": {\"Users\": [{\"Id\": 1}, {\"Id\": 2, \"Online\": 1}]}}",
        path: "Rels.Users[1].Online",
        message_contains: &["invalid type", "boolean"],
        has_position: true,
    },
    Rejection {
        name: "File.Id as a number",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}, \"Rels\": {\"Files\": [{\"Id\": 7}]}}",
        path: "Rels.Files[0].Id",
        message_contains: &["invalid type", "string"],
        has_position: true,
    },
    Rejection {
        name: "invalid UTF-8 inside a string",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"chat\xff\xfe\"}}",
        path: "ChatEvent.Type",
        message_contains: &["malformed JSON", "unicode"],
        has_position: true,
    },
    Rejection {
        name: "invalid UTF-8 in an unknown field",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\", \"Note\": \"\xc3\x28\"}}",
        path: ".",
        message_contains: &["malformed JSON", "invalid UTF-8 at byte 46"],
        has_position: true,
    },
    Rejection {
        name: "trailing garbage",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}} xyz",
        path: ".",
        message_contains: &["malformed JSON", "trailing characters"],
        has_position: true,
    },
    Rejection {
        name: "two objects",
        body: b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}}{\"ChatEvent\": {\"Id\": 2, \"Type\": \"x\"}}",
        path: ".",
        message_contains: &["trailing characters"],
        has_position: true,
    },
];

#[test]
fn every_rejection_names_the_field_path_and_what_was_expected() {
    let mut failures = Vec::new();
    for case in REJECTIONS {
        let error = match decode_with(case.body, Policy::Strict) {
            Ok(envelope) => {
                failures.push(format!("{}: accepted as {envelope:?}", case.name));
                continue;
            }
            Err(error) => error,
        };
        if error.path != case.path {
            failures.push(format!(
                "{}: path {:?}, want {:?} ({error})",
                case.name, error.path, case.path
            ));
        }
        for needle in case.message_contains {
            if !error.message.contains(needle) {
                failures.push(format!(
                    "{}: message {:?} lacks {needle:?}",
                    case.name, error.message
                ));
            }
        }
        if error.message.contains(" at line ") {
            failures.push(format!(
                "{}: position left inside the message {:?}",
                case.name, error.message
            ));
        }
        let has_position = error.line.is_some() && error.column.is_some();
        if has_position != case.has_position {
            failures.push(format!(
                "{}: line/column {:?}/{:?}, want them {}",
                case.name,
                error.line,
                error.column,
                if case.has_position { "set" } else { "unset" }
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn syntax_errors_report_the_line_and_column_of_the_offending_byte() {
    let body = "{\n  \"ChatEvent\": {\n    \"Id\": 1,\n    \"Type\": \"x\",,\n  }\n}";
    let error = decode_str(body).expect_err("malformed");
    assert_eq!(error.path, "ChatEvent");
    assert_eq!(error.line, Some(4));
    assert_eq!(error.column, Some(17));
    assert!(error.message.starts_with("malformed JSON"), "{error}");
}

#[test]
fn the_error_display_puts_the_path_first() {
    let error = decode_with(
        br#"{"ChatEvent": {"Id": "1", "Type": "x"}}"#,
        Policy::Strict,
    )
    .expect_err("wrong type");
    assert!(
        error.to_string().starts_with("ChatEvent.Id: invalid type"),
        "{error}"
    );
}

/// Every item `decode_array` hands over, or its error.
fn array_items(body: &[u8], policy: Policy) -> Result<Vec<BatchItem>, DecodeError> {
    let mut items = Vec::new();
    decode_array(body, policy, |item| items.push(item)).map(|()| items)
}

/// The items of the careful path alone: split the array, decode each item alone.
fn split_items(body: &[u8]) -> Result<Vec<BatchItem>, DecodeError> {
    let mut items = Vec::new();
    decode_array_split(
        body,
        Policy::Tolerant,
        0,
        &mut Lines::new(body),
        &mut |item| items.push(item),
    )
    .map(|()| items)
}

/// `decode_array` against the plain path: split the array, decode each item alone.
fn assert_same_as_split(body: &[u8]) {
    let fast = array_items(body, Policy::Tolerant);
    let split = split_items(body);
    match (&fast, &split) {
        (Ok(fast), Ok(split)) => {
            assert_eq!(fast.len(), split.len());
            for (fast, split) in fast.iter().zip(split) {
                assert_eq!(fast.range, split.range);
                assert_eq!(fast.decoded, split.decoded);
            }
        }
        (Err(fast), Err(split)) => assert_eq!(fast, split),
        _ => panic!("one path accepted what the other rejected: {fast:?} vs {split:?}"),
    }
}

#[test]
fn a_batch_decodes_each_item_from_its_exact_bytes() {
    let mut body = b" [\n".to_vec();
    body.extend_from_slice(CHAT_CLOSED);
    body.extend_from_slice(b" ,\t");
    body.extend_from_slice(MESSAGE_CREATED_FILE);
    body.extend_from_slice(b"]\n");
    let mut items = Vec::new();
    decode_array_fast(
        std::str::from_utf8(&body).expect("UTF-8"),
        Policy::Tolerant,
        &mut Lines::new(&body),
        &mut |item| items.push(item),
    )
    .expect("a well-formed array takes the one-pass path");
    assert_eq!(items.len(), 2);
    let trimmed = |bytes: &[u8]| bytes.trim_ascii().to_vec();
    assert_eq!(body[items[0].range.clone()].to_vec(), trimmed(CHAT_CLOSED));
    assert_eq!(
        body[items[1].range.clone()].to_vec(),
        trimmed(MESSAGE_CREATED_FILE)
    );
    assert_eq!(items[0].decoded, decode(CHAT_CLOSED));
    assert_eq!(items[1].decoded, decode(MESSAGE_CREATED_FILE));
    assert_same_as_split(&body);
}

#[test]
fn a_bad_batch_item_gets_the_error_it_would_get_alone() {
    let good = r#"{"ChatEvent": {"Id": 1, "Type": "chat_closed"}}"#;
    let cases: &[&[u8]] = &[
        b"[]",
        b" [ ] ",
        // No Id; an empty Type; too deep; not an object; a wrong type; invalid UTF-8.
        br#"[{"ChatEvent": {"Type": "chat_closed"}}, GOOD]"#,
        br#"[GOOD, {"ChatEvent": {"Id": 2, "Type": ""}}]"#,
        br#"[GOOD, {"ChatEvent": {"Id": 2, "Type": "x"}, "Deep": DEEP}]"#,
        br#"[1, "two", null, [], GOOD]"#,
        br#"[{"ChatEvent": {"Id": "x", "Type": "x"}}, GOOD]"#,
        b"[GOOD, {\"ChatEvent\": {\"Id\": 3, \"Type\": \"\xff\"}}]",
        // Not an array at all, or broken between or after items: the whole batch is refused.
        b"",
        b"{}",
        b"[GOOD,]",
        b"[GOOD GOOD]",
        b"[GOOD",
        b"[GOOD] x",
        b"[GOOD, {\"ChatEvent\": ",
    ];
    let deep = format!("{}{}", "[".repeat(130), "]".repeat(130));
    for case in cases {
        let body = String::from_utf8_lossy(case)
            .replace("GOOD", good)
            .replace("DEEP", &deep);
        let mut bytes = body.into_bytes();
        // Keep the invalid byte invalid (from_utf8_lossy replaced it).
        if case.contains(&0xff) {
            let at = bytes
                .windows(3)
                .position(|w| w == "\u{fffd}".as_bytes())
                .expect("the replacement character");
            bytes.splice(at..at + 3, [0xff]);
        }
        assert_same_as_split(&bytes);
    }
    let items =
        array_items(format!("[{good}, {{}}]").as_bytes(), Policy::Tolerant).expect("an array");
    assert!(items[0].decoded.is_ok());
    assert_eq!(
        items[1].decoded.as_ref().map_err(|e| e.path.as_str()),
        Err("ChatEvent")
    );
    let error =
        array_items(format!("[{good},]").as_bytes(), Policy::Tolerant).expect_err("trailing comma");
    assert!(error
        .message
        .starts_with("expected a JSON array of events: malformed JSON"));
    assert_eq!((error.line, error.column), (Some(1), Some(good.len() + 3)));
}

/// A body the tolerant decode accepts with one deviation: where, what happened, and a check of
/// the typed result.
struct Tolerated {
    name: &'static str,
    /// Members of `ChatEvent` after `"Id": 1, "Type": "t"` (may override them).
    event: &'static str,
    /// The `Rels` object.
    rels: &'static str,
    path: &'static str,
    outcome: Outcome,
    expected: &'static str,
    found: &'static str,
    typed: fn(&Envelope) -> bool,
}

fn rels(envelope: &Envelope) -> &crate::pb::webhook::v1::Rels {
    envelope.rels.as_ref().expect("Rels")
}

fn event(envelope: &Envelope) -> &crate::pb::webhook::v1::ChatEvent {
    envelope.chat_event.as_ref().expect("ChatEvent")
}

const TOLERATED: &[Tolerated] = &[
    Tolerated {
        name: "a text ending in half an emoji (an unpaired leading surrogate)",
        event: "",
        rels: r#"{"ChatMessages": [{"Id": 1, "Text": "Привет \ud83d"}]}"#,
        path: "Rels.ChatMessages[0].Text",
        outcome: Outcome::Replaced,
        expected: "a string",
        found: "a string with an unpaired surrogate",
        typed: |e| rels(e).chat_messages[0].text == "Привет \u{FFFD}",
    },
    Tolerated {
        name: "unpaired surrogates of both kinds, one after the other and before an escape",
        event: "",
        rels: r#"{"Clients": [{"Id": 1, "Name": "\udc00\ud800\ud800\n\ud83d\ude00"}]}"#,
        path: "Rels.Clients[0].Name",
        outcome: Outcome::Replaced,
        expected: "a string",
        found: "a string with an unpaired surrogate",
        typed: |e| rels(e).clients[0].name == "\u{FFFD}\u{FFFD}\u{FFFD}\n😀",
    },
    Tolerated {
        name: "an unpaired surrogate where an id goes",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "RoleId": "\ud800"}]}"#,
        path: "Rels.Users[0].RoleId",
        outcome: Outcome::Dropped,
        expected: "int64",
        found: "a string with an unpaired surrogate",
        typed: |e| rels(e).users[0].role_id == 0 && rels(e).users[0].id == 1,
    },
    Tolerated {
        name: "an integer-valued float to an int64",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "RoleId": 1.0}]}"#,
        path: "Rels.Users[0].RoleId",
        outcome: Outcome::Coerced,
        expected: "int64",
        found: "a number",
        typed: |e| rels(e).users[0].role_id == 1,
    },
    Tolerated {
        name: "an exponent to an int64, exactly",
        event: r#""CreatedAt": 1.632751088427e12"#,
        rels: "{}",
        path: "ChatEvent.CreatedAt",
        outcome: Outcome::Coerced,
        expected: "int64",
        found: "a number",
        typed: |e| event(e).created_at == 1_632_751_088_427,
    },
    Tolerated {
        name: "a decimal string to an optional int64 (TicketId)",
        event: "",
        rels: r#"{"Chats": [{"Id": 1, "TicketId": "84"}]}"#,
        path: "Rels.Chats[0].TicketId",
        outcome: Outcome::Coerced,
        expected: "int64",
        found: "a string",
        typed: |e| rels(e).chats[0].ticket_id == Some(84),
    },
    Tolerated {
        name: "NoticeId as a string (the Kotlin SDK)",
        event: "",
        rels: r#"{"ChatMessages": [{"Id": 1}, {"Id": 2, "NoticeId": "9007199254740993"}]}"#,
        path: "Rels.ChatMessages[1].NoticeId",
        outcome: Outcome::Coerced,
        expected: "int64",
        found: "a string",
        typed: |e| rels(e).chat_messages[1].notice_id == Some(9_007_199_254_740_993),
    },
    Tolerated {
        name: "a negative decimal string to a counter",
        event: "",
        rels: r#"{"Chats": [{"Id": 1, "TotalMembers": "-5"}]}"#,
        path: "Rels.Chats[0].TotalMembers",
        outcome: Outcome::Coerced,
        expected: "int64",
        found: "a string",
        typed: |e| rels(e).chats[0].total_members == -5,
    },
    Tolerated {
        name: "1 to a bool",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "Online": 1}]}"#,
        path: "Rels.Users[0].Online",
        outcome: Outcome::Coerced,
        expected: "bool",
        found: "a number",
        typed: |e| rels(e).users[0].online,
    },
    Tolerated {
        name: "0 to a bool",
        event: r#""Public": 0"#,
        rels: "{}",
        path: "ChatEvent.Public",
        outcome: Outcome::Coerced,
        expected: "bool",
        found: "a number",
        typed: |e| !event(e).public,
    },
    Tolerated {
        name: "\"true\" to a bool",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "Active": "true"}]}"#,
        path: "Rels.Users[0].Active",
        outcome: Outcome::Coerced,
        expected: "bool",
        found: "a string",
        typed: |e| rels(e).users[0].active,
    },
    Tolerated {
        name: "\"false\" to a bool",
        event: "",
        rels: r#"{"Chats": [{"Id": 1, "Open": "false"}]}"#,
        path: "Rels.Chats[0].Open",
        outcome: Outcome::Coerced,
        expected: "bool",
        found: "a string",
        typed: |e| !rels(e).chats[0].open,
    },
    Tolerated {
        name: "a number to a string, as its JSON text",
        event: "",
        rels: r#"{"ChatMessages": [{"Id": 1, "Text": 1.50e3}]}"#,
        path: "Rels.ChatMessages[0].Text",
        outcome: Outcome::Coerced,
        expected: "string",
        found: "a number",
        typed: |e| rels(e).chat_messages[0].text == "1.50e3",
    },
    Tolerated {
        name: "an integer to a string id (File.Id)",
        event: "",
        rels: r#"{"Files": [{"Id": 7}]}"#,
        path: "Rels.Files[0].Id",
        outcome: Outcome::Coerced,
        expected: "string",
        found: "a number",
        typed: |e| rels(e).files[0].id == "7",
    },
    Tolerated {
        name: "the event id as a decimal string",
        event: r#""Id": "84""#,
        rels: "{}",
        path: "ChatEvent.Id",
        outcome: Outcome::Coerced,
        expected: "int64",
        found: "a string",
        typed: |e| event(e).id == 84,
    },
    Tolerated {
        name: "Transitive as 1, without an id",
        event: r#""Id": null, "Transitive": 1"#,
        rels: "{}",
        path: "ChatEvent.Transitive",
        outcome: Outcome::Coerced,
        expected: "bool",
        found: "a number",
        typed: |e| event(e).transitive && event(e).id == 0,
    },
    Tolerated {
        name: "a word where an int64 goes",
        event: "",
        rels: r#"{"ChatMessages": [{"Id": 1, "NoticeId": "n-15", "Text": "kept"}]}"#,
        path: "Rels.ChatMessages[0].NoticeId",
        outcome: Outcome::Dropped,
        expected: "int64",
        found: "a string",
        typed: |e| {
            rels(e).chat_messages[0].notice_id.is_none() && rels(e).chat_messages[0].text == "kept"
        },
    },
    Tolerated {
        name: "a fraction where an int64 goes",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "RoleId": 1.5}]}"#,
        path: "Rels.Users[0].RoleId",
        outcome: Outcome::Dropped,
        expected: "int64",
        found: "a number",
        typed: |e| rels(e).users[0].role_id == 0 && rels(e).users[0].id == 1,
    },
    Tolerated {
        name: "an integer beyond int64",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "RoleId": 9223372036854775808}]}"#,
        path: "Rels.Users[0].RoleId",
        outcome: Outcome::Dropped,
        expected: "int64",
        found: "a number",
        typed: |e| rels(e).users[0].role_id == 0,
    },
    Tolerated {
        name: "a number beyond a double",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "RoleId": 1e400}]}"#,
        path: "Rels.Users[0].RoleId",
        outcome: Outcome::Dropped,
        expected: "int64",
        found: "a number",
        typed: |e| rels(e).users.len() == 1,
    },
    Tolerated {
        name: "an object where a list goes",
        event: "",
        rels: r#"{"Chats": {"Id": 1}, "Users": [{"Id": 2}]}"#,
        path: "Rels.Chats",
        outcome: Outcome::Dropped,
        expected: "a list",
        found: "an object",
        typed: |e| rels(e).chats.is_empty() && rels(e).users.len() == 1,
    },
    Tolerated {
        name: "an entity kind that is not a list",
        event: "",
        rels: r#"{"Users": "nobody", "Chats": [{"Id": 3}]}"#,
        path: "Rels.Users",
        outcome: Outcome::Dropped,
        expected: "a list",
        found: "a string",
        typed: |e| rels(e).users.is_empty() && rels(e).chats[0].id == 3,
    },
    Tolerated {
        name: "a list item that is not an object",
        event: "",
        rels: r#"{"Chats": [{"Id": 1}, [13, 1], {"Id": 2}]}"#,
        path: "Rels.Chats[1]",
        outcome: Outcome::Dropped,
        expected: "an object",
        found: "an array",
        typed: |e| rels(e).chats.iter().map(|c| c.id).eq([1, 2]),
    },
    Tolerated {
        name: "a null list item",
        event: "",
        rels: r#"{"Chats": [null, {"Id": 2}]}"#,
        path: "Rels.Chats[0]",
        outcome: Outcome::Dropped,
        expected: "an object",
        found: "null",
        typed: |e| rels(e).chats.iter().map(|c| c.id).eq([2]),
    },
    Tolerated {
        name: "an object where a string goes",
        event: "",
        rels: r#"{"ChatMessages": [{"Id": 1, "Text": {"ru": "Привет"}}]}"#,
        path: "Rels.ChatMessages[0].Text",
        outcome: Outcome::Dropped,
        expected: "string",
        found: "an object",
        typed: |e| rels(e).chat_messages[0].text.is_empty(),
    },
    Tolerated {
        name: "a word where a bool goes",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "Online": "yes"}]}"#,
        path: "Rels.Users[0].Online",
        outcome: Outcome::Dropped,
        expected: "bool",
        found: "a string",
        typed: |e| !rels(e).users[0].online,
    },
    Tolerated {
        name: "2 where a bool goes",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "Online": 2}]}"#,
        path: "Rels.Users[0].Online",
        outcome: Outcome::Dropped,
        expected: "bool",
        found: "a number",
        typed: |e| !rels(e).users[0].online,
    },
    Tolerated {
        name: "a bool where a string goes",
        event: "",
        rels: r#"{"Users": [{"Id": 1, "Name": true}]}"#,
        path: "Rels.Users[0].Name",
        outcome: Outcome::Dropped,
        expected: "string",
        found: "a boolean",
        typed: |e| rels(e).users[0].name.is_empty(),
    },
    Tolerated {
        name: "a number where an object goes",
        event: "",
        rels: r#"{"Clients": [{"Id": 1, "Details": 5}]}"#,
        path: "Rels.Clients[0].Details",
        outcome: Outcome::Dropped,
        expected: "an object",
        found: "a number",
        typed: |e| rels(e).clients[0].details.is_none(),
    },
    Tolerated {
        name: "a key given twice: the last one is kept",
        event: "",
        rels: r#"{"Chats": [{"Id": 1, "Id": 2}]}"#,
        path: "Rels.Chats[0].Id",
        outcome: Outcome::Dropped,
        expected: "the key once",
        found: "a duplicate key (the last one is kept)",
        typed: |e| rels(e).chats[0].id == 2,
    },
    Tolerated {
        name: "an id that is not a number, on a transitive event",
        event: r#""Id": "none", "Transitive": true, "Type": "typing""#,
        rels: "{}",
        path: "ChatEvent.Id",
        outcome: Outcome::Dropped,
        expected: "int64",
        found: "a string",
        typed: |e| event(e).id == 0 && event(e).transitive,
    },
];

#[test]
fn every_coercion_and_every_drop_is_one_deviation_and_the_rest_stays_typed() {
    let mut failures = Vec::new();
    for case in TOLERATED {
        // The case's members replace the default id and type where they name them.
        let mut members = Vec::new();
        if !case.event.contains("\"Id\"") {
            members.push(r#""Id": 1"#);
        }
        if !case.event.contains("\"Type\"") {
            members.push(r#""Type": "t""#);
        }
        if !case.event.is_empty() {
            members.push(case.event);
        }
        let body = format!(
            r#"{{"ChatEvent": {{{}}}, "Rels": {}}}"#,
            members.join(", "),
            case.rels
        );
        let decoded = match decode(body.as_bytes()) {
            Ok(decoded) => decoded,
            Err(error) => {
                failures.push(format!("{}: refused: {error}", case.name));
                continue;
            }
        };
        let want = Deviation {
            path: case.path.to_owned(),
            expected: case.expected.to_owned(),
            found: case.found.to_owned(),
            outcome: case.outcome,
            pattern: path_pattern(case.path),
        };
        if decoded.deviations != [want] {
            failures.push(format!(
                "{}: deviations {:?}",
                case.name, decoded.deviations
            ));
        }
        if !(case.typed)(&decoded.envelope) {
            failures.push(format!("{}: typed {:?}", case.name, decoded.envelope));
        }
        // Strict: the same body is refused, naming the path.
        match decode_with(body.as_bytes(), Policy::Strict) {
            Ok(_) => failures.push(format!("{}: strict accepted it", case.name)),
            // serde names a duplicate key at its object.
            Err(error) if !case.path.starts_with(&error.path) => {
                failures.push(format!("{}: strict refused at {error}", case.name))
            }
            Err(_) => {}
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn what_the_gateway_needs_stays_strict_under_the_tolerant_policy() {
    let cases: &[(&str, &str, &str)] = &[
        (r#"{"ChatEvent": "chat_closed"}"#, "ChatEvent", "an object"),
        (r#"{"ChatEvent": [1, "x"]}"#, "ChatEvent", "an object"),
        (
            r#"{"ChatEvent": {"Id": 1, "Type": "x"}, "Rels": []}"#,
            "Rels",
            "an object or null",
        ),
        (
            r#"{"ChatEvent": {"Id": 1, "Type": "x"}, "Rels": "x"}"#,
            "Rels",
            "an object or null",
        ),
        (
            r#"{"ChatEvent": {"Id": 1, "Type": 5}}"#,
            "ChatEvent.Type",
            "a string",
        ),
        (
            r#"{"ChatEvent": {"Id": 1, "Type": {"a": 1}}}"#,
            "ChatEvent.Type",
            "a string",
        ),
        (
            r#"{"ChatEvent": {"Id": 1, "Type": "x", "Type": "y"}}"#,
            "ChatEvent.Type",
            "a string",
        ),
        (
            r#"{"ChatEvent": {"Id": 1, "Type": "message_\udfffcreated"}}"#,
            "ChatEvent.Type",
            "a string",
        ),
        (
            r#"{"ChatEvent": {"Id": 1}}"#,
            "ChatEvent.Type",
            "missing field `Type`",
        ),
        (
            r#"{"ChatEvent": {"Id": "abc", "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Id": 1.5, "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Id": -3, "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Id": -0, "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Id": 0, "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Id": null, "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Type": "x"}}"#,
            "ChatEvent.Id",
            "missing field `Id`",
        ),
        (
            r#"{"ChatEvent": {"Id": 9223372036854775808, "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Id": 1e400, "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Type": "x", "Transitive": "yes"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (
            r#"{"ChatEvent": {"Id": 1, "Id": 2, "Type": "x"}}"#,
            "ChatEvent.Id",
            "positive integer",
        ),
        (r#"{"Rels": {}}"#, "ChatEvent", "missing field `ChatEvent`"),
    ];
    for (body, path, words) in cases {
        let error = decode(body.as_bytes()).expect_err(body);
        assert_eq!(error.path, *path, "{body}: {error}");
        assert!(error.message.contains(words), "{body}: {error}");
    }
}

#[test]
fn transitive_events_need_no_id() {
    for body in [
        r#"{"ChatEvent": {"Type": "typing", "Transitive": true, "ChatId": 5}}"#,
        r#"{"ChatEvent": {"Id": 0, "Type": "typing", "Transitive": true}}"#,
        r#"{"ChatEvent": {"Id": null, "Type": "typing", "Transitive": true}}"#,
    ] {
        let decoded = decode(body.as_bytes()).expect(body);
        assert_eq!(decoded.deviations, [], "{body}");
        assert_eq!(dedup_id(&decoded.envelope), None, "{body}");
        // Also under the strict policy: an absent id is no deviation for a transitive event.
        decode_with(body.as_bytes(), Policy::Strict).expect(body);
    }
    let stored = decode(br#"{"ChatEvent": {"Id": 7, "Type": "typing", "Transitive": true}}"#)
        .expect("a transitive event with an id");
    assert_eq!(dedup_id(&stored.envelope), None, "never deduplicated by id");
    let regular = decode(br#"{"ChatEvent": {"Id": 7, "Type": "chat_closed"}}"#).expect("decodes");
    assert_eq!(dedup_id(&regular.envelope), Some(7));
}

/// `depth` nested arrays around `1`.
fn nested_arrays(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

#[test]
fn an_opaque_value_nested_past_the_protobuf_limit_is_cut_there_and_reported() {
    // Each JSON array in a google.protobuf.Value costs two protobuf levels.
    let fits = (MAX_VALUE_DEPTH - 1) / 2;
    let body = format!(
        r#"{{"ChatEvent": {{"Id": 1, "Type": "t"}}, "Rels": {{"Projects": [{{"Id": 5, "Options": {}, "Name": "Проект"}}, {{"Id": 6, "Options": {}}}]}}}}"#,
        nested_arrays(fits),
        nested_arrays(50)
    );
    let decoded = decode(body.as_bytes()).expect("stored, not refused");
    let projects = &rels(&decoded.envelope).projects;
    assert_eq!(projects[0].name, "Проект");
    assert_eq!(decoded.deviations.len(), 1, "{:?}", decoded.deviations);
    let cut = &decoded.deviations[0];
    assert_eq!(cut.outcome, Outcome::Cut);
    assert_eq!(
        cut.path,
        format!("Rels.Projects[1].Options{}", "[0]".repeat(fits))
    );
    assert_eq!(
        cut.pattern, "Rels.Projects[].Options",
        "labels keep no sender keys"
    );
    // The typed form encodes and decodes with prost's default limit, wrapped as a streamed
    // Event (Event > Envelope) and then some.
    let event = crate::pb::client::Event {
        envelope: Some(decoded.envelope.clone()),
        ..Default::default()
    };
    let bytes = prost::Message::encode_to_vec(&event);
    <crate::pb::client::Event as prost::Message>::decode(bytes.as_slice())
        .expect("prost reads what is stored");
    // Strict: refused, naming the field.
    let error = decode_with(body.as_bytes(), Policy::Strict).expect_err("too deep");
    assert_eq!(error.path, "Rels.Projects[1].Options");
}

#[test]
fn deviations_inside_an_opaque_value_are_labelled_by_the_field() {
    let body = format!(
        r#"{{"ChatEvent": {{"Id": 1, "Type": "t"}}, "Rels": {{"Clients": [{{"Id": 1, "Details": {{"Fields": {{"Паспорт": {}}}}}}}]}}}}"#,
        nested_arrays(40)
    );
    let decoded = decode(body.as_bytes()).expect("decodes");
    assert_eq!(decoded.deviations.len(), 1);
    assert!(decoded.deviations[0]
        .path
        .starts_with("Rels.Clients[0].Details.Fields.Паспорт["));
    assert_eq!(
        decoded.deviations[0].pattern,
        "Rels.Clients[].Details.Fields"
    );
}

#[test]
fn unpaired_surrogates_in_keys_and_opaque_values_are_replaced_and_reported() {
    let body = r#"{"ChatEvent": {"Id": 1, "Type": "t", "Unknown\ud800": "\udc00"},
        "Rels": {"Clients": [{"Id": 1, "Details": {"Fields": {"Имя\ud800": "x", "b": ["\udbff"]}}}]}}"#;
    let decoded = decode(body.as_bytes()).expect("never refused over a surrogate");
    let found: Vec<(&str, &str, Outcome)> = decoded
        .deviations
        .iter()
        .map(|d| (d.path.as_str(), d.found.as_str(), d.outcome))
        .collect();
    assert_eq!(
        found,
        [
            (
                "ChatEvent.Unknown\u{FFFD}",
                "a key with an unpaired surrogate",
                Outcome::Replaced
            ),
            (
                "Rels.Clients[0].Details.Fields.Имя\u{FFFD}",
                "a key with an unpaired surrogate",
                Outcome::Replaced
            ),
            (
                "Rels.Clients[0].Details.Fields.b[0]",
                "a string with an unpaired surrogate",
                Outcome::Replaced
            ),
        ]
    );
    // Labels never hold the sender's keys.
    assert_eq!(decoded.deviations[0].pattern, "ChatEvent.*");
    assert!(decoded.deviations[1..]
        .iter()
        .all(|d| d.pattern == "Rels.Clients[].Details.Fields"));
    // The strict decode refuses each of them.
    assert!(decode_with(body.as_bytes(), Policy::Strict).is_err());
    let client = &rels(&decoded.envelope).clients[0];
    let fields = client
        .details
        .as_ref()
        .and_then(|d| d.fields.as_ref())
        .and_then(|v| v.kind.as_ref());
    let Some(prost_types::value::Kind::StructValue(fields)) = fields else {
        panic!("Fields is an object: {fields:?}");
    };
    let keys: Vec<&String> = fields.fields.keys().collect();
    assert_eq!(keys, ["b", "Имя\u{FFFD}"]);
    assert_eq!(
        format!("{:?}", fields.fields["b"])
            .matches('\u{FFFD}')
            .count(),
        1
    );
}

#[test]
fn only_an_unpaired_surrogate_is_replaced_in_wtf8() {
    for (wtf8, want, replaced) in [
        (&b"plain"[..], "plain", false),
        (b"a\xED\xA0\x80b", "a\u{FFFD}b", true),
        (b"\xED\xBF\xBF\xED\xA0\x80", "\u{FFFD}\u{FFFD}", true),
        ("ж😀".as_bytes(), "ж😀", false),
        (b"\xFF", "\u{FFFD}", true),
    ] {
        let text = tolerant::from_wtf8(wtf8);
        assert_eq!(
            (text.text.as_str(), text.replaced),
            (want, replaced),
            "{wtf8:?}"
        );
    }
}

#[test]
fn deviations_are_bounded_per_event() {
    let users: Vec<String> = (0..150)
        .map(|i| format!(r#"{{"Id": {i}, "Online": "x"}}"#))
        .collect();
    let body = format!(
        r#"{{"ChatEvent": {{"Id": 1, "Type": "t"}}, "Rels": {{"Users": [{}]}}}}"#,
        users.join(",")
    );
    let decoded = decode(body.as_bytes()).expect("decodes");
    assert_eq!(decoded.deviations.len(), MAX_DEVIATIONS + 1);
    let last = decoded.deviations.last().expect("a summary");
    assert_eq!((last.path.as_str(), last.found.as_str()), (".", "50 more"));
    assert_eq!(rels(&decoded.envelope).users.len(), 150);
}

#[test]
fn paths_lose_their_indices_in_patterns() {
    assert_eq!(
        path_pattern("Rels.ChatMessages[10].SingleChoices[2].title"),
        "Rels.ChatMessages[].SingleChoices[].title"
    );
    assert_eq!(path_pattern("ChatEvent.Id"), "ChatEvent.Id");
}

#[test]
fn one_leading_byte_order_mark_is_stripped() {
    assert_eq!(strip_bom(b"\xef\xbb\xbf{}"), b"{}");
    assert_eq!(
        strip_bom(b"\xef\xbb\xbf\xef\xbb\xbf{}"),
        b"\xef\xbb\xbf{}",
        "one mark only"
    );
    assert_eq!(strip_bom(b" \xef\xbb\xbf{}"), b" \xef\xbb\xbf{}");
    assert_eq!(strip_bom(b"\xef\xbb"), b"\xef\xbb");
}

#[test]
fn error_text_quoting_the_body_is_cut() {
    let long = "é".repeat(1000);
    let body = format!(r#"{{"ChatEvent": {{"Id": "{long}", "Type": "x"}}}}"#);
    let error = decode_with(body.as_bytes(), Policy::Strict).expect_err("a string id");
    assert!(
        error.message.len() <= MAX_ERROR_TEXT + '…'.len_utf8(),
        "{error}"
    );
    assert!(error.message.ends_with('…'), "{error}");
}

#[test]
fn ndjson_errors_are_placed_on_the_body_s_lines() {
    let body = b"{\"ChatEvent\": {\"Id\": 1, \"Type\": \"x\"}}\n\n  {\n{\"ChatEvent\": {}}\r\n";
    let mut items = Vec::new();
    decode_lines(body, Policy::Tolerant, |item| items.push(item));
    assert_eq!(items.len(), 3, "blank lines are not items");
    assert!(items[0].decoded.is_ok());
    let truncated = items[1].decoded.as_ref().expect_err("truncated");
    assert_eq!((truncated.line, truncated.column), (Some(3), Some(3)));
    assert_eq!(&body[items[1].range.clone()], b"  {");
    let no_type = items[2].decoded.as_ref().expect_err("no Type");
    assert_eq!(
        (no_type.line, no_type.column),
        (Some(4), Some(1)),
        "an error the parser does not place is at the item's start"
    );
}

/// A body with every key that has another spelling, each spelled as `spell` says (the usual
/// spelling, or the other one), with the values `values`.
fn respelled_body(spell: &dyn Fn(&str, &str) -> String, values: &[i64; 6]) -> String {
    let [a, b, c, d, e, f] = values;
    format!(
        r#"{{"ChatEvent": {{"Id": 7, "Type": "message_created", "{public}": true}},
            "Rels": {{
              "Chats": [{{"Id": 3, "{open}": true}}],
              "Clients": [{{"Id": 4, "{manager}": {a}, "Details": {{"{birthday}": "13.08.1899"}}}}],
              "ChatMessages": [{{"Id": 5, "SingleChoices": [{{
                "{id}": {b}, "{message}": {c}, "{client}": {d}, "{deleted}": true,
                "{created}": {e}, "{updated}": {f}, "title": "Yes"}}]}}]}}}}"#,
        public = spell("ChatEvent", "IsPublic"),
        open = spell("Chat", "IsOpen"),
        manager = spell("Client", "PersonalManagerID"),
        birthday = spell("ClientDetails", "BirthDay"),
        id = spell("SingleChoice", "id"),
        message = spell("SingleChoice", "chatMessageId"),
        client = spell("SingleChoice", "clientId"),
        deleted = spell("SingleChoice", "deleted"),
        created = spell("SingleChoice", "createdAt"),
        updated = spell("SingleChoice", "updatedAt"),
    )
}

fn usual(message: &str, other: &str) -> String {
    respelling(&format!("iqchannels.webhook.v1.{message}"), other)
        .unwrap_or_else(|| panic!("{message}.{other} is not a known spelling"))
        .to_owned()
}

#[test]
fn every_spelling_of_the_vendors_sdks_is_typed_into_the_usual_field_and_named() {
    let values = [11, 12, 13, 14, 15, 16];
    let expected = decode_str(&respelled_body(&usual, &values)).unwrap();
    let details = &expected.rels.as_ref().unwrap().clients[0].details;
    assert_eq!(details.as_ref().unwrap().birthday, "13.08.1899");
    let body = respelled_body(&|_, other| other.to_owned(), &values);
    let decoded = decode(body.as_bytes()).unwrap();
    assert_eq!(
        decoded.envelope, expected,
        "the same event, whatever the spelling"
    );
    let seen: Vec<(&str, &str, &str, Outcome)> = decoded
        .deviations
        .iter()
        .map(|d| {
            (
                d.path.as_str(),
                d.expected.as_str(),
                d.found.as_str(),
                d.outcome,
            )
        })
        .collect();
    let respelled = |path, usual, other| (path, usual, other, Outcome::Respelled);
    assert_eq!(
        seen,
        [
            respelled(
                "ChatEvent.IsPublic",
                "the key \"Public\"",
                "the key \"IsPublic\""
            ),
            respelled(
                "Rels.Chats[0].IsOpen",
                "the key \"Open\"",
                "the key \"IsOpen\""
            ),
            respelled(
                "Rels.Clients[0].PersonalManagerID",
                "the key \"PersonalManagerId\"",
                "the key \"PersonalManagerID\""
            ),
            respelled(
                "Rels.Clients[0].Details.BirthDay",
                "the key \"Birthday\"",
                "the key \"BirthDay\""
            ),
            respelled(
                "Rels.ChatMessages[0].SingleChoices[0].id",
                "the key \"Id\"",
                "the key \"id\""
            ),
            respelled(
                "Rels.ChatMessages[0].SingleChoices[0].chatMessageId",
                "the key \"ChatMessageId\"",
                "the key \"chatMessageId\""
            ),
            respelled(
                "Rels.ChatMessages[0].SingleChoices[0].clientId",
                "the key \"ClientId\"",
                "the key \"clientId\""
            ),
            respelled(
                "Rels.ChatMessages[0].SingleChoices[0].deleted",
                "the key \"Deleted\"",
                "the key \"deleted\""
            ),
            respelled(
                "Rels.ChatMessages[0].SingleChoices[0].createdAt",
                "the key \"CreatedAt\"",
                "the key \"createdAt\""
            ),
            respelled(
                "Rels.ChatMessages[0].SingleChoices[0].updatedAt",
                "the key \"UpdatedAt\"",
                "the key \"updatedAt\""
            ),
        ]
    );
    // A batch reads each item as a single body would.
    let mut items = Vec::new();
    decode_array(
        format!("[{}, {}]", respelled_body(&usual, &values), body).as_bytes(),
        Policy::Tolerant,
        |item| items.push(item.decoded.unwrap()),
    )
    .unwrap();
    assert_eq!(items[0].envelope, expected);
    assert_eq!(items[0].deviations, []);
    assert_eq!(items[1].envelope, expected);
    assert_eq!(items[1].deviations, decoded.deviations);
}

#[test]
fn a_respelled_key_is_typed_only_in_its_own_message_and_escapes_do_not_hide_it() {
    // `id` is a spelling in SingleChoice only: elsewhere it is an unknown key.
    let decoded =
        decode(br#"{"ChatEvent": {"Id": 7, "id": 9, "Type": "typing"}, "Rels": null}"#).unwrap();
    assert_eq!(decoded.envelope.chat_event.unwrap().id, 7);
    assert_eq!(decoded.deviations, []);
    // A key written with escaped letters is the same key.
    let decoded = decode(
        br#"{"ChatEvent": {"Id": 7, "Type": "typing"}, "Rels": {"Clients": [{"Id": 1,
             "Details": {"Birth\u0044ay": "01.01.2000"}}]}}"#,
    )
    .unwrap();
    let rels = decoded.envelope.rels.unwrap();
    assert_eq!(
        rels.clients[0].details.as_ref().unwrap().birthday,
        "01.01.2000"
    );
    assert_eq!(
        decoded.deviations[0].path,
        "Rels.Clients[0].Details.BirthDay"
    );
    assert_eq!(decoded.deviations[0].outcome, Outcome::Respelled);
    // Both spellings: the last one is kept, as for a key given twice.
    let decoded = decode(
        br#"{"ChatEvent": {"Id": 7, "Type": "typing"}, "Rels": {"Clients": [{"Id": 1,
             "Details": {"Birthday": "01.01.2000", "BirthDay": "02.02.2002"}}]}}"#,
    )
    .unwrap();
    let rels = decoded.envelope.rels.unwrap();
    assert_eq!(
        rels.clients[0].details.as_ref().unwrap().birthday,
        "02.02.2002"
    );
    let outcomes: Vec<Outcome> = decoded.deviations.iter().map(|d| d.outcome).collect();
    assert_eq!(outcomes, [Outcome::Respelled, Outcome::Dropped]);
}

#[test]
fn the_strict_decode_refuses_a_respelled_key_by_its_path() {
    let body = br#"{"ChatEvent": {"Id": 7, "Type": "typing", "IsPublic": true}, "Rels": null}"#;
    let error = decode_with(body, Policy::Strict).unwrap_err();
    assert_eq!(error.path, "ChatEvent.IsPublic");
    assert!(error.message.contains("\"Public\""), "{}", error.message);
    // A body that only mentions a spelling inside a value is read as usual.
    let body = br#"{"ChatEvent": {"Id": 7, "Type": "typing", "Text": "\"id\" \u0041"}}"#;
    let decoded = decode_with(body, Policy::Strict).unwrap();
    assert_eq!(decoded.deviations, []);
}

proptest::proptest! {
    /// Whatever mix of spellings and values: the typed event is the usually spelled one's, and
    /// each respelled key is one deviation.
    #[test]
    fn any_mix_of_spellings_types_the_same_event(
        respell in proptest::collection::vec(proptest::bool::ANY, 10),
        values in proptest::array::uniform6(proptest::num::i64::ANY),
    ) {
        let others = [
            "IsPublic", "IsOpen", "PersonalManagerID", "BirthDay", "id", "chatMessageId",
            "clientId", "deleted", "createdAt", "updatedAt",
        ];
        let spell = |message: &str, other: &str| {
            let index = others.iter().position(|o| *o == other).unwrap();
            if respell[index] { other.to_owned() } else { usual(message, other) }
        };
        let expected = decode_str(&respelled_body(&usual, &values)).unwrap();
        let decoded = decode(respelled_body(&spell, &values).as_bytes()).unwrap();
        proptest::prop_assert_eq!(&decoded.envelope, &expected);
        let respelled = respell.iter().filter(|r| **r).count();
        proptest::prop_assert_eq!(decoded.deviations.len(), respelled);
        proptest::prop_assert!(decoded.deviations.iter().all(|d| d.outcome == Outcome::Respelled));
    }
}
