//! The stored record of an event and its pre-encoded gRPC form.
//!
//! An event is encoded to protobuf once, when it is stored ([`StoredEvent`], the log's opaque
//! payload). When it is read back (by the hub, or a subscriber catching up) it becomes an
//! [`EncodedEvent`]: the few bytes of `Event`'s sequence and time, encoded then, in front of the
//! stored envelope, raw JSON and references, which stay in the record's buffer (no copy). Every
//! subscriber stream then sends those same shared bytes ([`WireEvent`]) in the [`Form`] it asked
//! for (each optional field is the stored bytes behind a tag and a length); nothing is re-encoded
//! per subscriber.

use std::sync::Arc;

use bytes::{BufMut, Bytes};
use prost::Message;

pub mod record;

pub use record::{held_len, CorruptRecord, Digests, Identity};

/// An event's stored parts, as a record of an earlier release held them (its payload; the log
/// adds sequence and time), and as a record is read back (see [`record::stored`]): this build
/// writes the compact form ([`record`]), where each event is stored once, compressed, its
/// references pointers into the envelope.
#[derive(Clone, PartialEq, Message)]
pub struct StoredEvent {
    /// The typed `iqchannels.webhook.v1.Envelope`, protobuf-encoded.
    #[prost(bytes = "bytes", tag = "1")]
    pub envelope: Bytes,
    /// The original webhook body, verbatim (empty for a typed gRPC Publish).
    #[prost(bytes = "bytes", tag = "2")]
    pub raw_json: Bytes,
    /// The fields subscribers filter on, so catch-up reads never decode the envelope.
    #[prost(message, optional, tag = "3")]
    pub keys: Option<Keys>,
    /// The deviations found at ingest, already in their `Event` wire form: one `Event` field 5
    /// (`deviations`) after another, written as they are after the envelope. Empty for most.
    #[prost(bytes = "bytes", tag = "4")]
    pub deviations: Bytes,
    /// The entities the event points at (`iqchannels.gateway.v1.References`, protobuf-encoded),
    /// resolved from `Rels` at ingest; empty when none was found.
    #[prost(bytes = "bytes", tag = "5")]
    pub references: Bytes,
}

/// The deviations of an event as `Event` field 5 records (see [`StoredEvent::deviations`]).
pub fn encode_deviations(deviations: &[crate::decode::Deviation]) -> Bytes {
    let mut buf = Vec::new();
    for deviation in deviations {
        let message = crate::pb::gateway::v1::Deviation::from(deviation);
        prost::encoding::message::encode(5, &message, &mut buf);
    }
    buf.into()
}

impl From<&crate::decode::Deviation> for crate::pb::gateway::v1::Deviation {
    fn from(deviation: &crate::decode::Deviation) -> Self {
        use crate::decode::Outcome;
        use crate::pb::gateway::v1::DeviationOutcome;
        let outcome = match deviation.outcome {
            Outcome::Coerced => DeviationOutcome::Coerced,
            Outcome::Dropped => DeviationOutcome::Dropped,
            Outcome::Cut => DeviationOutcome::Cut,
            Outcome::Replaced => DeviationOutcome::Replaced,
            Outcome::Respelled => DeviationOutcome::Respelled,
        };
        Self {
            path: deviation.path.clone(),
            expected: deviation.expected.clone(),
            found: deviation.found.clone(),
            outcome: outcome.into(),
        }
    }
}

/// The fields of an event that subscriber filters look at.
#[derive(Clone, PartialEq, Eq, Message)]
pub struct Keys {
    /// `ChatEvent.Id`, the deduplication key.
    #[prost(int64, tag = "1")]
    pub event_id: i64,
    /// `ChatEvent.Type` wire string.
    #[prost(string, tag = "2")]
    pub event_type: String,
    /// `ChatEvent.Actor` wire string.
    #[prost(string, tag = "3")]
    pub actor: String,
    /// `ChatEvent.ChatId`.
    #[prost(int64, optional, tag = "4")]
    pub chat_id: Option<i64>,
    /// `ChatEvent.ClientId`.
    #[prost(int64, optional, tag = "5")]
    pub client_id: Option<i64>,
    /// `ChatEvent.UserId`.
    #[prost(int64, optional, tag = "6")]
    pub user_id: Option<i64>,
    /// `ProjectId` of the event's chat in `Rels.Chats`.
    #[prost(int64, optional, tag = "7")]
    pub project_id: Option<i64>,
    /// `ChannelId` of the event's chat in `Rels.Chats`.
    #[prost(int64, optional, tag = "8")]
    pub channel_id: Option<i64>,
}

/// The filter keys of a stored payload, read without the rest of it: the other fields are
/// skipped by their length, never copied or decoded (a filtered catch-up looks at every record,
/// see `subscribe`). `None` when the payload does not decode.
pub fn keys_of(payload: &[u8]) -> Option<Keys> {
    /// [`StoredEvent`] with only its field 3.
    #[derive(Clone, PartialEq, Message)]
    struct KeysOnly {
        #[prost(message, optional, tag = "3")]
        keys: Option<Keys>,
    }
    if record::is_compact(payload) {
        return record::keys_of_compact(payload);
    }
    // Not a record (empty, or damaged): a filter keeps it, and the read reports it.
    if !record::may_start_legacy(payload.first()) {
        return None;
    }
    KeysOnly::decode(payload)
        .ok()
        .map(|only| only.keys.unwrap_or_default())
}

/// One stored event in its `iqchannels.gateway.v1.Event` wire form, built once and shared.
///
/// The envelope, the raw JSON and the references are not copied: they are slices of the log
/// record's payload (`Bytes` share the buffer). Only the few bytes before them are encoded here, once.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvent {
    /// The log sequence.
    pub sequence: u64,
    /// When the gateway received it, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Filter fields.
    pub keys: Keys,
    /// Fields 1 and 2 of `Event` (sequence, received_at), then the tag and length of field 3.
    head: Head,
    /// The content of field 3: the typed envelope, shared with the log record.
    pub envelope: Bytes,
    /// The original webhook body (field 4, `raw_json`), shared with the log record; empty when
    /// there is none (a typed gRPC Publish).
    pub raw_json: Bytes,
    /// `Event` field 5 records (the deviations), shared with the log record; always sent.
    pub deviations: Bytes,
    /// The content of field 6, `references` (an encoded `References`), shared with the log
    /// record; empty when nothing was resolved.
    pub references: Bytes,
}

/// Which optional fields of `Event` a stream sends. Every form is the same shared bytes, with
/// each field asked for appended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Form {
    /// Field 4, the original webhook body (when there is one).
    pub raw_json: bool,
    /// Field 6, the resolved references (always present when asked for, empty or not).
    pub references: bool,
}

/// The encoded prefix of an `Event`, inline: no allocation. At most 11 bytes of sequence, 19 of
/// timestamp and 11 of field 3's tag and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    bytes: [u8; HEAD_MAX],
    len: u8,
}

/// The longest head an `Event` has (see `Head`).
pub const HEAD_MAX: usize = 48;

impl Head {
    fn new(sequence: u64, received_at_ms: i64, envelope_len: usize) -> Self {
        let mut bytes = [0u8; HEAD_MAX];
        let mut buf = &mut bytes[..];
        let received_at = timestamp(received_at_ms);
        prost::encoding::uint64::encode(1, &sequence, &mut buf);
        prost::encoding::message::encode(2, &received_at, &mut buf);
        prost::encoding::encode_key(3, prost::encoding::WireType::LengthDelimited, &mut buf);
        prost::encoding::encode_varint(envelope_len as u64, &mut buf);
        let len = (HEAD_MAX - buf.len()) as u8;
        Self { bytes, len }
    }

    fn as_slice(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

impl EncodedEvent {
    /// Builds the wire form from a log record's parts.
    pub fn new(sequence: u64, received_at_ms: i64, stored: StoredEvent) -> Self {
        Self {
            sequence,
            received_at_ms,
            keys: stored.keys.unwrap_or_default(),
            head: Head::new(sequence, received_at_ms, stored.envelope.len()),
            envelope: stored.envelope,
            raw_json: stored.raw_json,
            deviations: stored.deviations,
            references: stored.references,
        }
    }

    /// The deviations found at ingest (decoded from their stored wire form).
    pub fn deviations(&self) -> Vec<crate::pb::gateway::v1::Deviation> {
        /// `Event` with only its field 5.
        #[derive(Clone, PartialEq, Message)]
        struct Deviations {
            #[prost(message, repeated, tag = "5")]
            deviations: Vec<crate::pb::gateway::v1::Deviation>,
        }
        Deviations::decode(self.deviations.clone())
            .map(|d| d.deviations)
            .unwrap_or_default()
    }

    /// Decodes a log payload into the wire form, once per record read: a compact record is
    /// decompressed (the envelope and raw JSON are slices of that one buffer) and its references
    /// rebuilt from the envelope; a record of an earlier release is sliced as it is.
    pub fn from_payload(
        sequence: u64,
        received_at_ms: i64,
        payload: Bytes,
    ) -> Result<Self, CorruptRecord> {
        Ok(Self::new(
            sequence,
            received_at_ms,
            record::stored(payload)?,
        ))
    }

    /// The length of the encoded `Event` in `form`.
    pub fn encoded_len(&self, form: Form) -> usize {
        let raw = if form.raw_json && !self.raw_json.is_empty() {
            prost::encoding::bytes::encoded_len(4, &self.raw_json)
        } else {
            0
        };
        let references = if form.references {
            prost::encoding::bytes::encoded_len(6, &self.references)
        } else {
            0
        };
        self.head.as_slice().len() + self.envelope.len() + self.deviations.len() + raw + references
    }

    /// Writes the encoded `Event` in `form`. Field 6 is a message; its stored bytes are its
    /// encoding, so it is written as they are behind its tag and length (as `bytes` would be).
    pub fn write(&self, form: Form, buf: &mut impl BufMut) {
        buf.put_slice(self.head.as_slice());
        buf.put_slice(&self.envelope);
        buf.put_slice(&self.deviations);
        if form.raw_json && !self.raw_json.is_empty() {
            prost::encoding::bytes::encode(4, &self.raw_json, buf);
        }
        if form.references {
            prost::encoding::bytes::encode(6, &self.references, buf);
        }
    }
}

/// `google.protobuf.Timestamp` from milliseconds since the Unix epoch.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// The server's `iqchannels.gateway.v1.Event`: shared pre-encoded bytes, written as they are by
/// the gRPC codec, in the [`Form`] the stream asked for.
#[derive(Debug, Clone)]
pub struct WireEvent {
    /// The encoded event, shared with every other stream sending it.
    pub event: Arc<EncodedEvent>,
    /// The optional fields this stream asked for.
    pub form: Form,
}

impl Default for WireEvent {
    fn default() -> Self {
        Self {
            event: Arc::new(EncodedEvent::new(0, 0, StoredEvent::default())),
            form: Form::default(),
        }
    }
}

impl Message for WireEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        self.event.write(self.form, buf);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // The server only sends events; decoding is the client's `Event`.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.event.encoded_len(self.form)
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::gateway::v1::References;
    use crate::pb::webhook::v1::{Chat, ChatEvent, ChatMessage, Envelope};

    const FORMS: [Form; 4] = [
        Form {
            raw_json: false,
            references: false,
        },
        Form {
            raw_json: true,
            references: false,
        },
        Form {
            raw_json: false,
            references: true,
        },
        Form {
            raw_json: true,
            references: true,
        },
    ];

    fn references() -> References {
        References {
            chat: Some(Chat {
                id: 21,
                project_id: 1,
                ..Default::default()
            }),
            message: Some(ChatMessage {
                id: 300,
                text: "Привет".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn wire_event_bytes_decode_as_the_client_event() {
        let stored = StoredEvent {
            envelope: Bytes::new(),
            raw_json: Bytes::from_static(b"{\"ChatEvent\":{}}"),
            keys: Some(Keys {
                event_id: 7,
                ..Keys::default()
            }),
            deviations: Bytes::new(),
            references: references().encode_to_vec().into(),
        };
        let event = Arc::new(EncodedEvent::new(42, 1_632_751_088_427, stored));
        let everything = WireEvent {
            event: event.clone(),
            form: Form {
                raw_json: true,
                references: true,
            },
        }
        .encode_to_vec();
        let decoded =
            crate::pb::client::Event::decode(everything.as_slice()).expect("valid protobuf");
        assert_eq!(decoded.sequence, 42);
        assert_eq!(
            decoded.received_at,
            Some(prost_types::Timestamp {
                seconds: 1_632_751_088,
                nanos: 427_000_000
            })
        );
        assert_eq!(decoded.raw_json, b"{\"ChatEvent\":{}}".to_vec());
        assert_eq!(decoded.references, Some(references()));
        let plain = WireEvent {
            event,
            form: Form::default(),
        }
        .encode_to_vec();
        let decoded = crate::pb::client::Event::decode(plain.as_slice()).expect("valid protobuf");
        assert!(decoded.raw_json.is_empty());
        assert_eq!(decoded.references, None, "references only when asked for");
    }

    #[test]
    fn encoded_event_shares_the_payload_and_encodes_extremes() {
        let envelope = Envelope {
            chat_event: Some(ChatEvent {
                id: 1 << 40,
                ..Default::default()
            }),
            ..Default::default()
        };
        let stored = StoredEvent {
            envelope: envelope.encode_to_vec().into(),
            raw_json: Bytes::from_static(b"{}"),
            keys: None,
            deviations: Bytes::new(),
            references: references().encode_to_vec().into(),
        };
        let payload = Bytes::from(stored.encode_to_vec());
        for (sequence, at) in [(u64::MAX, i64::MIN), (1, 0), (300, i64::MAX)] {
            let event =
                EncodedEvent::from_payload(sequence, at, payload.clone()).expect("valid payload");
            // The envelope and the references are views into the payload, not copies.
            let inside = payload.as_ptr_range();
            assert!(inside.contains(&event.envelope.as_ptr()));
            assert!(inside.contains(&event.references.as_ptr()));
            for form in FORMS {
                let wire = WireEvent {
                    event: Arc::new(event.clone()),
                    form,
                };
                let bytes = wire.encode_to_vec();
                assert_eq!(bytes.len(), wire.encoded_len());
                let decoded =
                    crate::pb::client::Event::decode(bytes.as_slice()).expect("valid protobuf");
                assert_eq!(decoded.sequence, sequence);
                assert_eq!(decoded.received_at, Some(timestamp(at)));
                assert_eq!(decoded.raw_json.is_empty(), !form.raw_json);
                assert_eq!(decoded.envelope.as_ref(), Some(&envelope));
                assert_eq!(
                    decoded.references,
                    form.references.then(references),
                    "{form:?}"
                );
            }
        }
    }

    #[test]
    fn every_form_is_the_shared_bytes_with_its_fields_appended() {
        let stored = StoredEvent {
            envelope: Envelope::default().encode_to_vec().into(),
            raw_json: Bytes::from_static(b"{\"ChatEvent\":{\"Id\":1}}"),
            keys: None,
            deviations: Bytes::new(),
            references: references().encode_to_vec().into(),
        };
        let event = Arc::new(EncodedEvent::new(9, 1000, stored.clone()));
        let bytes = |form| {
            WireEvent {
                event: event.clone(),
                form,
            }
            .encode_to_vec()
        };
        let plain = bytes(Form::default());
        let field = |tag, value: &Bytes| {
            let mut out = Vec::new();
            prost::encoding::bytes::encode(tag, value, &mut out);
            out
        };
        let (raw_field, references_field) =
            (field(4, &stored.raw_json), field(6, &stored.references));
        for form in FORMS {
            let mut expected = plain.clone();
            if form.raw_json {
                expected.extend_from_slice(&raw_field);
            }
            if form.references {
                expected.extend_from_slice(&references_field);
            }
            assert_eq!(bytes(form), expected, "{form:?}");
        }

        // Nothing resolved: asked for, the field is there and empty.
        let bare = Arc::new(EncodedEvent::new(10, 1000, StoredEvent::default()));
        let asked = WireEvent {
            event: bare,
            form: Form {
                raw_json: true,
                references: true,
            },
        }
        .encode_to_vec();
        let decoded = crate::pb::client::Event::decode(asked.as_slice()).expect("valid protobuf");
        assert_eq!(decoded.references, Some(References::default()));
        assert!(decoded.raw_json.is_empty(), "no body, no field 4");
    }

    #[test]
    fn timestamps_before_the_epoch_keep_positive_nanos() {
        assert_eq!(
            timestamp(-1),
            prost_types::Timestamp {
                seconds: -1,
                nanos: 999_000_000
            }
        );
    }
}
