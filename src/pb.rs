//! Generated protobuf code (prost + tonic), the descriptor set served by reflection, and the
//! protobuf JSON mapping of encoded messages built from it.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};

/// The encoded `FileDescriptorSet` of every proto in `proto/`, for gRPC reflection and for tools
/// that need the protobuf JSON mapping.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

/// Why an encoded message could not be shown as JSON.
#[derive(Debug, thiserror::Error)]
pub enum JsonError {
    /// The built-in descriptor set does not decode (a build defect).
    #[error("descriptor set: {0}")]
    Descriptors(String),
    /// No message of that name in the descriptor set (a caller defect).
    #[error("{0} is not in the descriptor set")]
    UnknownMessage(String),
    /// The bytes are not an encoding of that message.
    #[error("decoding {0}: {1}")]
    Decode(String, prost::DecodeError),
    /// The JSON serializer failed.
    #[error("encoding JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The descriptors of [`FILE_DESCRIPTOR_SET`], decoded once on first use.
pub fn descriptor_pool() -> Result<&'static DescriptorPool, JsonError> {
    static POOL: OnceLock<Result<DescriptorPool, String>> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(FILE_DESCRIPTOR_SET).map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|error| JsonError::Descriptors(error.clone()))
}

/// The encoded message `name` (e.g. `iqchannels.gateway.v1.References`) in the protobuf JSON
/// mapping as the gateway prints it beside webhook bodies: the wire names (`json_name`), 64-bit
/// integers as JSON numbers like the webhook's own, fields holding their default value left out.
pub fn to_json(name: &str, bytes: &[u8]) -> Result<serde_json::Value, JsonError> {
    let descriptor = descriptor_pool()?
        .get_message_by_name(name)
        .ok_or_else(|| JsonError::UnknownMessage(name.to_owned()))?;
    let message = DynamicMessage::decode(descriptor, bytes)
        .map_err(|error| JsonError::Decode(name.to_owned(), error))?;
    let options = SerializeOptions::new().stringify_64_bit_integers(false);
    Ok(message.serialize_with_options(serde_json::value::Serializer, &options)?)
}

/// The mirror of the iQChannels webhook body.
pub mod webhook {
    /// Version 1 of the mirror.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/iqchannels.webhook.v1.rs"));
    }
}

/// The gateway's gRPC API, server side. `Event` is [`crate::wire::WireEvent`] here: the server
/// sends pre-encoded bytes. Clients use [`client`], whose `Event` decodes.
pub mod gateway {
    /// Version 1 of the API.
    pub mod v1 {
        #![allow(missing_docs, clippy::all)]
        include!(concat!(env!("OUT_DIR"), "/iqchannels.gateway.v1.rs"));
    }
}

/// The gateway's gRPC API, client side: a decoding `Event` and the `EventGateway` client. Every
/// other message is shared with [`gateway::v1`].
pub mod client {
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/client/iqchannels.gateway.v1.rs"));
    pub use super::gateway::v1::{
        get_event_request, publish_request, subscribe_request, Filter, GetEventRequest,
        PublishRequest, PublishResponse, References, SubscribeRequest,
    };
}
