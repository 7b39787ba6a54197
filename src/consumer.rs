//! Consumer groups (issue 20, in progress): named, durable subscriptions whose cursor and
//! acknowledgements the gateway keeps.
//!
//! - [`schedule`]: the rules of one group (per-chat order through retries, backoff on every
//!   failed attempt, fenced acknowledgements, parking and replay), pure and model-tested. Not
//!   yet wired to a store or to the API.

pub mod schedule;
