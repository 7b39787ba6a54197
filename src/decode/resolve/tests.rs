//! Unit tests of reference resolution: the two real fixtures and hand-made envelopes for each rule.

use serde_json::json;

use super::*;
use crate::decode::decode;

const CHAT_CLOSED: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/chat_closed.json"
));
const MESSAGE_CREATED_FILE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/fixtures/message_created_file.json"
));

fn envelope(body: serde_json::Value) -> Envelope {
    decode(body.to_string().as_bytes())
        .expect("a valid webhook body")
        .envelope
}

/// The ids of what was resolved, in `References` field order, but for the file (a string id).
fn ids(references: &References) -> [Option<i64>; 7] {
    [
        references.chat.as_ref().map(|e| e.id),
        references.message.as_ref().map(|e| e.id),
        references.client.as_ref().map(|e| e.id),
        references.user.as_ref().map(|e| e.id),
        references.channel.as_ref().map(|e| e.id),
        references.project.as_ref().map(|e| e.id),
        references.rating.as_ref().map(|e| e.id),
    ]
}

#[test]
fn the_2018_message_created_fixture_resolves_its_chat_message_file_user_channel_and_project() {
    let envelope = decode(MESSAGE_CREATED_FILE)
        .expect("fixture decodes")
        .envelope;
    let rels = envelope.rels.clone().expect("Rels");
    let references = references(&envelope);
    assert_eq!(references.chat.as_ref(), Some(&rels.chats[0]), "chat 21");
    assert_eq!(
        references.message.as_ref(),
        Some(&rels.chat_messages[0]),
        "message 300"
    );
    assert_eq!(
        references.file.as_ref(),
        Some(&rels.files[0]),
        "the message's file"
    );
    assert_eq!(
        references.file.as_ref().map(|f| f.name.as_str()),
        Some("example-request.json")
    );
    assert_eq!(
        references.user.as_ref(),
        Some(&rels.users[0]),
        "ChatEvent.UserId 1"
    );
    assert_eq!(
        references.channel.as_ref(),
        Some(&rels.channels[0]),
        "chat's channel 1"
    );
    assert_eq!(
        references.project.as_ref(),
        Some(&rels.projects[0]),
        "chat's project 1"
    );
    assert_eq!(
        references.client, None,
        "the chat's client 21 is not in Rels (no Clients in this body)"
    );
    assert_eq!(references.rating, None);
}

#[test]
fn the_2021_chat_closed_fixture_resolves_its_chat_client_user_channel_and_project() {
    let envelope = decode(CHAT_CLOSED).expect("fixture decodes").envelope;
    let rels = envelope.rels.clone().expect("Rels");
    let references = references(&envelope);
    assert_eq!(references.chat.as_ref(), Some(&rels.chats[0]), "chat 13");
    assert_eq!(
        references.client.as_ref(),
        Some(&rels.clients[0]),
        "client 13"
    );
    assert_eq!(
        references.client.as_ref().map(|c| c.name.as_str()),
        Some("Альфред Хичкок")
    );
    assert_eq!(references.user.as_ref(), Some(&rels.users[0]), "user 1");
    assert_eq!(references.channel.as_ref(), Some(&rels.channels[0]));
    assert_eq!(references.project.as_ref(), Some(&rels.projects[0]));
    assert_eq!(
        (references.message, references.file, references.rating),
        (None, None, None),
        "MessageId is null"
    );
}

#[test]
fn client_comes_from_the_event_else_the_message_else_the_chat() {
    let rels = json!({
        "Chats": [{"Id": 1, "ClientId": 30}],
        "ChatMessages": [{"Id": 5, "ClientId": 20}],
        "Clients": [{"Id": 10}, {"Id": 20}, {"Id": 30}]
    });
    let client = |event: serde_json::Value| {
        let mut body = json!({"ChatEvent": {"Id": 1, "Type": "t", "ChatId": 1}, "Rels": rels});
        for (key, value) in event.as_object().into_iter().flatten() {
            body["ChatEvent"][key] = value.clone();
        }
        references(&envelope(body)).client.map(|client| client.id)
    };
    assert_eq!(client(json!({"ClientId": 10, "MessageId": 5})), Some(10));
    assert_eq!(client(json!({"MessageId": 5})), Some(20), "the message's");
    assert_eq!(client(json!({"ClientId": null})), Some(30), "the chat's");
    assert_eq!(
        client(json!({"ClientId": 99, "MessageId": 5})),
        Some(20),
        "an id Rels does not carry falls through to the next"
    );
    assert_eq!(
        client(json!({"ChatId": 2})),
        None,
        "no chat, no message, no id"
    );
}

#[test]
fn user_comes_from_the_event_else_the_message_else_the_chat_assignee() {
    let body = |event: serde_json::Value| {
        let mut chat_event = json!({"Id": 1, "Type": "t", "ChatId": 1});
        for (key, value) in event.as_object().into_iter().flatten() {
            chat_event[key] = value.clone();
        }
        json!({
            "ChatEvent": chat_event,
            "Rels": {
                "Chats": [{"Id": 1, "AssigneeId": 3}],
                "ChatMessages": [{"Id": 5, "UserId": 2}],
                "Users": [{"Id": 1}, {"Id": 2}, {"Id": 3}]
            }
        })
    };
    let user = |event| references(&envelope(body(event))).user.map(|user| user.id);
    assert_eq!(user(json!({"UserId": 1, "MessageId": 5})), Some(1));
    assert_eq!(
        user(json!({"MessageId": 5})),
        Some(2),
        "the message's author"
    );
    assert_eq!(user(json!({})), Some(3), "the chat's assignee");
}

#[test]
fn project_comes_from_the_chat_else_its_channel_and_rating_from_the_message() {
    let references = references(&envelope(json!({
        "ChatEvent": {"Id": 1, "Type": "message_created", "ChatId": 1, "MessageId": 5},
        "Rels": {
            "Chats": [{"Id": 1, "ProjectId": 0, "ChannelId": 4}],
            "Channels": [{"Id": 4, "ProjectId": 8}],
            "Projects": [{"Id": 7}, {"Id": 8}],
            "ChatMessages": [{"Id": 5, "Text": "Спасибо!", "RatingId": 6, "FileId": ""}],
            "Ratings": [{"Id": 6, "Value": 5}],
            "Files": [{"Id": ""}]
        }
    })));
    assert_eq!(
        ids(&references),
        [Some(1), Some(5), None, None, Some(4), Some(8), Some(6)],
        "project 0 means none: the channel's"
    );
    assert_eq!(references.file, None, "an empty FileId matches no file");
    assert_eq!(
        references.message.map(|m| m.text),
        Some("Спасибо!".to_owned())
    );
    assert_eq!(references.rating.and_then(|r| r.value), Some(5));
}

#[test]
fn nothing_named_or_nothing_carried_resolves_nothing() {
    let transitive = envelope(json!({
        "ChatEvent": {"Id": 0, "Type": "typing", "Transitive": true, "ChatId": 1}
    }));
    assert_eq!(references(&transitive), References::default(), "no Rels");
    let unmatched = envelope(json!({
        "ChatEvent": {"Id": 2, "Type": "message_created", "ChatId": 1, "MessageId": 5,
                      "ClientId": 3, "UserId": 4},
        "Rels": {"Chats": [{"Id": 9}], "ChatMessages": [{"Id": 6}], "Clients": [{"Id": 7}],
                 "Users": [{"Id": 8}]}
    }));
    assert_eq!(
        references(&unmatched),
        References::default(),
        "ids Rels lacks"
    );
    assert_eq!(
        references(&Envelope::default()),
        References::default(),
        "no ChatEvent"
    );
}

#[test]
fn the_first_of_duplicate_entries_wins_and_ids_beyond_2_pow_53_match_exactly() {
    let big = (1_i64 << 53) + 1;
    let references = references(&envelope(json!({
        "ChatEvent": {"Id": 1, "Type": "chat_changed", "ChatId": big},
        "Rels": {"Chats": [{"Id": big - 1, "TicketId": 0}, {"Id": big, "TicketId": 1},
                           {"Id": big, "TicketId": 2}]}
    })));
    let chat = references.chat.expect("chat");
    assert_eq!((chat.id, chat.ticket_id), (big, Some(1)));
}
