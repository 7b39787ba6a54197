//! What an event points at: the entities its `ChatEvent` names, found in `Rels` once, at ingest.

use prost::Message;

use crate::pb::gateway::v1::References;
use crate::pb::webhook::v1::Envelope;

/// Each `References` field and the `Rels` field its entity comes from (field numbers), in
/// `References` order: chat, message, file, client, user, channel, project, rating.
pub const REFERENCE_FIELDS: [(u32, u32); 8] = [
    (1, 2),
    (2, 3),
    (3, 4),
    (4, 7),
    (5, 6),
    (6, 1),
    (7, 5),
    (8, 12),
];

/// Where each referenced entity is in its `Rels` list (in [`REFERENCE_FIELDS`] order): the
/// references kept as pointers into the envelope rather than copies.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Indices(pub [Option<usize>; 8]);

/// The entities the event's `ChatEvent` points at, copied from `Rels`: chat, message and its
/// file, client, user (operator), the chat's channel and project, the message's rating (the rules
/// are on `References` in gateway.proto). Where several ids are candidates, the first one that
/// `Rels` carries wins. An entity not found is unset; an id of 0 (what the vendor's non-nullable
/// id fields hold for "none") or an empty file id never matches.
pub fn references(envelope: &Envelope) -> References {
    let Indices([chat, message, file, client, user, channel, project, rating]) = indices(envelope);
    let Some(rels) = &envelope.rels else {
        return References::default();
    };
    References {
        chat: chat.map(|i| rels.chats[i]),
        message: message.map(|i| rels.chat_messages[i].clone()),
        file: file.map(|i| rels.files[i].clone()),
        client: client.map(|i| rels.clients[i].clone()),
        user: user.map(|i| rels.users[i].clone()),
        channel: channel.map(|i| rels.channels[i].clone()),
        project: project.map(|i| rels.projects[i].clone()),
        rating: rating.map(|i| rels.ratings[i].clone()),
    }
}

/// The encoded length of [`references`] of `envelope`, from its [`indices`], without copying.
pub fn references_len(envelope: &Envelope, indices: &Indices) -> usize {
    let Some(rels) = &envelope.rels else {
        return 0;
    };
    let Indices([chat, message, file, client, user, channel, project, rating]) = *indices;
    let field = |len: Option<usize>| {
        len.map_or(0, |len| {
            1 + prost::encoding::encoded_len_varint(len as u64) + len
        })
    };
    field(chat.map(|i| rels.chats[i].encoded_len()))
        + field(message.map(|i| rels.chat_messages[i].encoded_len()))
        + field(file.map(|i| rels.files[i].encoded_len()))
        + field(client.map(|i| rels.clients[i].encoded_len()))
        + field(user.map(|i| rels.users[i].encoded_len()))
        + field(channel.map(|i| rels.channels[i].encoded_len()))
        + field(project.map(|i| rels.projects[i].encoded_len()))
        + field(rating.map(|i| rels.ratings[i].encoded_len()))
}

/// Where the entities [`references`] copies are in `Rels`.
pub fn indices(envelope: &Envelope) -> Indices {
    let (Some(event), Some(rels)) = (&envelope.chat_event, &envelope.rels) else {
        return Indices::default();
    };
    let chat = find(&rels.chats, event.chat_id, |chat| chat.id);
    let chat_item = chat.map(|i| &rels.chats[i]);
    let message = find(&rels.chat_messages, event.message_id, |message| message.id);
    let message_item = message.map(|i| &rels.chat_messages[i]);
    let file = message_item
        .and_then(|message| message.file_id.as_deref())
        .filter(|id| !id.is_empty())
        .and_then(|id| rels.files.iter().position(|file| file.id == id));
    let client = first(
        &rels.clients,
        [
            event.client_id,
            message_item.and_then(|message| message.client_id),
            chat_item.map(|chat| chat.client_id),
        ],
        |client| client.id,
    );
    let user = first(
        &rels.users,
        [
            event.user_id,
            message_item.and_then(|message| message.user_id),
            chat_item.and_then(|chat| chat.assignee_id),
        ],
        |user| user.id,
    );
    let channel = find(
        &rels.channels,
        chat_item.map(|chat| chat.channel_id),
        |channel| channel.id,
    );
    let channel_item = channel.map(|i| &rels.channels[i]);
    let project = first(
        &rels.projects,
        [
            chat_item.map(|chat| chat.project_id),
            channel_item.map(|channel| channel.project_id),
        ],
        |project| project.id,
    );
    let rating = find(
        &rels.ratings,
        message_item.and_then(|message| message.rating_id),
        |rating| rating.id,
    );
    Indices([chat, message, file, client, user, channel, project, rating])
}

/// The index of the first item whose id is `wanted` (never for a missing or 0 id).
fn find<T>(items: &[T], wanted: Option<i64>, id: impl Fn(&T) -> i64) -> Option<usize> {
    let wanted = wanted.filter(|&wanted| wanted != 0)?;
    items.iter().position(|item| id(item) == wanted)
}

/// The index of the item of the first candidate id that `items` carries.
fn first<T>(
    items: &[T],
    candidates: impl IntoIterator<Item = Option<i64>>,
    id: impl Fn(&T) -> i64,
) -> Option<usize> {
    candidates
        .into_iter()
        .find_map(|wanted| find(items, wanted, &id))
}

#[cfg(test)]
mod tests;
