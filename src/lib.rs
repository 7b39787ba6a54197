//! iqchannels-gateway: receives iQChannels webhook events over HTTP and gRPC, stores each durably
//! and once, and streams them as typed protobuf to gRPC subscribers.
//!
//! # Layout
//! - [`auth`]: ingest credentials (token, Standard Webhooks signatures) and gRPC token scopes.
//! - [`decode`]: webhook JSON bytes -> typed [`pb::webhook::v1::Envelope`], with clear errors.
//! - [`wire`]: the stored record and the pre-encoded gRPC `Event` every stream shares.
//! - [`fit`]: the typed form bounded at ingest, so every event fits one gRPC message.
//! - [`log`]: the seam where events get sequences and become durable ([`log::EventLog`]).
//! - [`hub`]: the bounded live tail, fed from the log.
//! - [`subscribe`]: a subscriber's cursor over the log and the live tail, with its filter.
//! - [`budget`]: the bytes held for subscribers, carried by the frames that send them.
//! - [`gateway`]: ingest, subscriptions and lookups, shared by the edges.
//! - [`http`], [`grpc`]: the edges (axum, tonic).
//! - [`metrics`]: Prometheus metrics.
//! - [`request_budget`]: the byte budget of request bodies held before they are checked.
//! - [`tls`]: rustls for the shared port, with certificate reload.
//! - [`client`]: the `subscribe`, `publish` and `get` commands over gRPC.
//! - [`consumer`]: consumer groups (in progress: the schedule).
//! - [`server`]: one port for both, graceful shutdown.
//! - [`admin`]: `verify` and `export` over a stopped gateway's embedded store.
//! - [`pb`]: generated code and the descriptor set.

pub mod admin;
pub mod auth;
pub mod budget;
pub mod client;
pub mod consumer;
pub mod decode;
pub mod fit;
pub mod gateway;
pub mod grpc;
pub mod http;
pub mod hub;
pub mod log;
pub mod metrics;
pub mod pb;
pub mod request_budget;
pub mod server;
pub mod subscribe;
pub mod tls;
pub mod wire;
