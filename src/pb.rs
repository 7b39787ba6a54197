//! Generated protobuf code (prost + tonic) and the descriptor set served by reflection.

/// The encoded `FileDescriptorSet` of every proto in `proto/`, for gRPC reflection and for tools
/// that need the protobuf JSON mapping.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/descriptor.bin"));

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
        PublishRequest, PublishResponse, SubscribeRequest,
    };
}
