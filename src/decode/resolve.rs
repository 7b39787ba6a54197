//! What an event points at: the entities its `ChatEvent` names, found in `Rels` once, at ingest.

use crate::pb::gateway::v1::References;
use crate::pb::webhook::v1::Envelope;

/// The entities the event's `ChatEvent` points at, copied from `Rels`: chat, message and its
/// file, client, user (operator), the chat's channel and project, the message's rating (the rules
/// are on `References` in gateway.proto). Where several ids are candidates, the first one that
/// `Rels` carries wins. An entity not found is unset; an id of 0 (what the vendor's non-nullable
/// id fields hold for "none") or an empty file id never matches.
pub fn references(envelope: &Envelope) -> References {
    let (Some(event), Some(rels)) = (&envelope.chat_event, &envelope.rels) else {
        return References::default();
    };
    let chat = find(&rels.chats, event.chat_id, |chat| chat.id);
    let message = find(&rels.chat_messages, event.message_id, |message| message.id);
    let file = message
        .and_then(|message| message.file_id.as_deref())
        .filter(|id| !id.is_empty())
        .and_then(|id| rels.files.iter().find(|file| file.id == id));
    let client = first(
        &rels.clients,
        [
            event.client_id,
            message.and_then(|message| message.client_id),
            chat.map(|chat| chat.client_id),
        ],
        |client| client.id,
    );
    let user = first(
        &rels.users,
        [
            event.user_id,
            message.and_then(|message| message.user_id),
            chat.and_then(|chat| chat.assignee_id),
        ],
        |user| user.id,
    );
    let channel = find(
        &rels.channels,
        chat.map(|chat| chat.channel_id),
        |channel| channel.id,
    );
    let project = first(
        &rels.projects,
        [
            chat.map(|chat| chat.project_id),
            channel.map(|channel| channel.project_id),
        ],
        |project| project.id,
    );
    let rating = find(
        &rels.ratings,
        message.and_then(|message| message.rating_id),
        |rating| rating.id,
    );
    References {
        chat: chat.cloned(),
        message: message.cloned(),
        file: file.cloned(),
        client: client.cloned(),
        user: user.cloned(),
        channel: channel.cloned(),
        project: project.cloned(),
        rating: rating.cloned(),
    }
}

/// The first item whose id is `wanted` (never for a missing or 0 id).
fn find<T>(items: &[T], wanted: Option<i64>, id: impl Fn(&T) -> i64) -> Option<&T> {
    let wanted = wanted.filter(|&wanted| wanted != 0)?;
    items.iter().find(|item| id(item) == wanted)
}

/// The item of the first candidate id that `items` carries.
fn first<T>(
    items: &[T],
    candidates: impl IntoIterator<Item = Option<i64>>,
    id: impl Fn(&T) -> i64,
) -> Option<&T> {
    candidates
        .into_iter()
        .find_map(|wanted| find(items, wanted, &id))
}

#[cfg(test)]
mod tests;
