//! The stored record of an event and its pre-encoded gRPC form.
//!
//! An event is encoded to protobuf once, when it is stored ([`StoredEvent`], the log's opaque
//! payload) and once more when it is read back from the log or the hub turns it into an
//! [`EncodedEvent`]: the exact bytes of an `iqchannels.gateway.v1.Event`. Every subscriber stream
//! then sends those same shared bytes ([`WireEvent`]); nothing is re-encoded per subscriber.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message;

/// What the log stores for one event (its payload; the log adds sequence and time).
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

/// One stored event, encoded once as `iqchannels.gateway.v1.Event` bytes and shared.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedEvent {
    /// The log sequence.
    pub sequence: u64,
    /// When the gateway received it, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Filter fields.
    pub keys: Keys,
    /// Fields 1-3 of `Event` (sequence, received_at, envelope).
    pub base: Bytes,
    /// Field 4 of `Event` (raw_json), tag and length included; empty when there is no raw body.
    pub raw_field: Bytes,
}

impl EncodedEvent {
    /// Builds the wire form from a log record's parts.
    pub fn new(sequence: u64, received_at_ms: i64, stored: StoredEvent) -> Self {
        let received_at = timestamp(received_at_ms);
        let mut base = BytesMut::with_capacity(stored.envelope.len() + 32);
        prost::encoding::uint64::encode(1, &sequence, &mut base);
        prost::encoding::message::encode(2, &received_at, &mut base);
        prost::encoding::bytes::encode(3, &stored.envelope, &mut base);
        let mut raw_field = BytesMut::new();
        if !stored.raw_json.is_empty() {
            raw_field.reserve(stored.raw_json.len() + 8);
            prost::encoding::bytes::encode(4, &stored.raw_json, &mut raw_field);
        }
        Self {
            sequence,
            received_at_ms,
            keys: stored.keys.unwrap_or_default(),
            base: base.freeze(),
            raw_field: raw_field.freeze(),
        }
    }

    /// Decodes a log payload into the wire form.
    pub fn from_payload(
        sequence: u64,
        received_at_ms: i64,
        payload: Bytes,
    ) -> Result<Self, prost::DecodeError> {
        Ok(Self::new(
            sequence,
            received_at_ms,
            StoredEvent::decode(payload)?,
        ))
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
/// the gRPC codec. With `include_raw` it also carries field 4, the original body.
#[derive(Debug, Clone)]
pub struct WireEvent {
    /// The encoded event, shared with every other stream sending it.
    pub event: Arc<EncodedEvent>,
    /// Whether this stream asked for `raw_json`.
    pub include_raw: bool,
}

impl Default for WireEvent {
    fn default() -> Self {
        let empty = EncodedEvent {
            sequence: 0,
            received_at_ms: 0,
            keys: Keys::default(),
            base: Bytes::new(),
            raw_field: Bytes::new(),
        };
        Self {
            event: Arc::new(empty),
            include_raw: false,
        }
    }
}

impl Message for WireEvent {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.event.base);
        if self.include_raw {
            buf.put_slice(&self.event.raw_field);
        }
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
        self.event.base.len()
            + if self.include_raw {
                self.event.raw_field.len()
            } else {
                0
            }
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_event_bytes_decode_as_the_client_event() {
        let stored = StoredEvent {
            envelope: Bytes::new(),
            raw_json: Bytes::from_static(b"{\"ChatEvent\":{}}"),
            keys: Some(Keys {
                event_id: 7,
                ..Keys::default()
            }),
        };
        let event = Arc::new(EncodedEvent::new(42, 1_632_751_088_427, stored));
        let with_raw = WireEvent {
            event: event.clone(),
            include_raw: true,
        }
        .encode_to_vec();
        let decoded =
            crate::pb::client::Event::decode(with_raw.as_slice()).expect("valid protobuf");
        assert_eq!(decoded.sequence, 42);
        assert_eq!(
            decoded.received_at,
            Some(prost_types::Timestamp {
                seconds: 1_632_751_088,
                nanos: 427_000_000
            })
        );
        assert_eq!(decoded.raw_json, b"{\"ChatEvent\":{}}".to_vec());
        let without = WireEvent {
            event,
            include_raw: false,
        }
        .encode_to_vec();
        let decoded = crate::pb::client::Event::decode(without.as_slice()).expect("valid protobuf");
        assert!(decoded.raw_json.is_empty());
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
