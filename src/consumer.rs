//! Consumer groups (issue 20, in progress): named, durable subscriptions whose cursor and
//! acknowledgements the gateway keeps.
//!
//! - [`group`]: one group over the log: admission through its filter, pulls that wait, acks.
//! - [`schedule`]: the rules of one group (per-chat order through retries, backoff on every
//!   failed attempt, fenced acknowledgements, parking and replay), pure and model-tested. Not
//!   yet kept in a store or served by the API.

pub mod group;
pub mod schedule;
