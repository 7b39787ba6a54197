//! The [`EventLog`] on a NATS JetStream stream, for several gateway replicas sharing one log.
//!
//! JetStream holds the stream and does the replication; every gateway is a stateless front end.
//! - Append: publish to `<prefix>.e.<id mod 16,384>` with `Nats-Msg-Id` = event id (transitive
//!   events: `<prefix>.t.0`) and wait for the ack; the stream sequence is the gateway sequence.
//!   The subjects are bounded whatever the number of events ([`config::BUCKETS`]): nats-server
//!   keeps state per subject.
//! - Stored once within the duplicate window: JetStream answers a redelivery with the original
//!   sequence. A redelivery after the window is stored again (README).
//! - Find by id: the headers of the id's bucket, read by an ephemeral ordered consumer.
//! - Transitive events have a retention of their own (`--nats-transitive-max-age`): every gateway
//!   purges their subject below the first sequence received within it ([`expire_transitive`]).
//!   A read passes over the holes that leaves (below `skip_below`) instead of reporting them.
//! - Tail: an ordered push consumer follows the stream (appends of every replica) into a bounded
//!   cache of recent records and the committed watch; the hub reads from that cache.
//! - Reads further back: direct gets by sequence, a page at a time. A page ends before a
//!   sequence that is not found; a read that starts at one asks the stream leader (a replica
//!   may lag) and otherwise reports [`LogError::Truncated`] with the next sequence retained, so
//!   a record removed by retention (`max_age`) or by hand is never skipped silently, whatever
//!   the cached oldest sequence (refreshed every 2 s) says.
//! - At start, the files the flags name are read before connecting, and a server that refuses
//!   the gateway (credentials, TLS) stops it with [`LogError::Misconfigured`]; only a server that
//!   cannot be reached is retried (and logged as that). Once connected, reconnects never end.
//! - Seek by time: a binary search on the gateway's receive time (the `Iqgw-Received-At` header),
//!   as in the embedded store, not on NATS's publish time.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_trait::async_trait;
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use super::{Appended, Bounds, EventLog, LogError, LogStats, NewRecord, Record};

mod config;
pub mod migrate;

pub use config::{
    event_subject, largest_record, parse_servers, NatsConfig, BUCKETS, DEFAULT_TRANSITIVE_MAX_AGE,
};

/// Header carrying the gateway's receive time (ms since the Unix epoch).
const RECEIVED_AT: &str = "Iqgw-Received-At";
/// Recent records kept for the hub and for subscribers close to the head, at most.
const CACHE: usize = 8192;
/// Default bytes of recent records kept (`--nats-cache-bytes`).
pub const DEFAULT_CACHE_BYTES: usize = 16 << 20;
/// How often the connection to NATS is checked (see `connect_options`).
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// Records of a batch waiting for their acks at once (below the client's permits, 5,000).
const ACKS_IN_FLIGHT: usize = 1024;
/// How often the stream's bounds and identity are checked.
const REFRESH: Duration = Duration::from_secs(2);
/// Direct gets in flight at once during a catch-up read.
const READ_CONCURRENCY: usize = 32;
/// How long a lookup by id may read its bucket's headers.
const FIND_TIMEOUT: Duration = Duration::from_secs(30);
/// Lookups by id at once (each is a consumer on the stream); more wait for one to end.
const FINDS_AT_ONCE: usize = 16;

/// The JetStream-backed log.
pub struct JetStreamLog {
    client: async_nats::Client,
    context: jetstream::Context,
    stream: stream::Stream,
    reader: Reader,
    config: NatsConfig,
    shared: Arc<Shared>,
}

/// Reads from the stream by sequence and subject (cloned into the background tasks).
#[derive(Clone)]
struct Reader {
    client: async_nats::Client,
    stream: stream::Stream,
    /// Subjects of every event in the stream (`<prefix>.*.*`).
    all_subjects: String,
    /// Lookups by id running ([`FINDS_AT_ONCE`]).
    finds: Arc<tokio::sync::Semaphore>,
}

struct Shared {
    /// Publish batches acknowledged, and the records in them.
    syncs: AtomicU64,
    synced_records: AtomicU64,
    /// Stream size in bytes, as of the last refresh.
    bytes: AtomicU64,
    first: AtomicU64,
    next: AtomicU64,
    committed: watch::Sender<u64>,
    /// The newest records seen by the tail, in sequence order; bounded by `CACHE` records and
    /// `cache_bytes` bytes of payload (the newest record stays, whatever its size).
    recent: Mutex<VecDeque<Record>>,
    /// Payload bytes in `recent`.
    cache_held: AtomicU64,
    cache_bytes: usize,
    /// What the stream the gateway opened is ([`Origin`]): its identity.
    origin: Origin,
    /// Every sequence below it that the stream does not hold is a transitive event removed by
    /// their retention, not a loss (0: none is).
    skip_below: AtomicU64,
    /// Whether the sequences before the stream's first are all such removed transitive events
    /// (nothing else removed any: no `max_age` has acted yet), so that a read may start there.
    front_skippable: std::sync::atomic::AtomicBool,
    /// Transitive events below it are purged (by this gateway).
    purged_below: AtomicU64,
    /// When the stream was created (ms since the epoch), the earliest any server said (each
    /// replica of a cluster reports its own).
    created_ms: std::sync::atomic::AtomicI64,
    /// Set when the stream was deleted or created again ([`EventLog::replaced`]).
    replaced: watch::Sender<Option<String>>,
}

impl Shared {
    /// The first sequence a read may start at: the stream's first, or the very first (1) when
    /// everything before it is expired transitive events.
    fn first(&self) -> u64 {
        let first = self.first.load(Ordering::Acquire);
        if self.expired_hole(1, first) {
            1
        } else {
            first
        }
    }

    /// Whether the sequences `start..end`, none of which the stream holds, are transitive events
    /// removed by their retention (every one below `skip_below`; at the front of the stream only
    /// while nothing else can have removed anything): a hole a read passes over, not a loss.
    fn expired_hole(&self, start: u64, end: u64) -> bool {
        end <= self.skip_below.load(Ordering::Acquire)
            && (start >= self.first.load(Ordering::Acquire)
                || self.front_skippable.load(Ordering::Acquire))
    }
}

fn unavailable(error: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(error.to_string())
}

/// A record that was sent but whose acknowledgement did not come: refused by the stream (its
/// answer says so: not stored), or unknown (no answer in time, or the connection went away
/// after the record left: it may be stored).
fn unacknowledged(error: jetstream::context::PublishError) -> LogError {
    use jetstream::context::PublishErrorKind;
    let answered = std::error::Error::source(&error)
        .is_some_and(|source| source.downcast_ref::<jetstream::Error>().is_some());
    match error.kind() {
        // The stream answered with a refusal, or no stream listens on the subject.
        PublishErrorKind::StreamNotFound
        | PublishErrorKind::WrongLastMessageId
        | PublishErrorKind::WrongLastSequence
        | PublishErrorKind::MaxPayloadExceeded => unavailable(error),
        PublishErrorKind::Other if answered => unavailable(error),
        _ => LogError::Unknown(error.to_string()),
    }
}

impl JetStreamLog {
    /// Connects (retrying while NATS cannot be reached, refusing credentials or TLS that NATS
    /// refuses), creates the stream if it is missing or checks that an existing one is
    /// compatible, and starts the tail.
    pub async fn connect(config: NatsConfig) -> Result<Self, LogError> {
        let servers = config::parse_servers(&config.url).map_err(LogError::Misconfigured)?;
        config.check_files().map_err(LogError::Misconfigured)?;
        let client = connect_at_start(&config, servers).await?;
        let mut context = jetstream::new(client.clone());
        context.set_timeout(config.ack_timeout);
        let stream = open_stream_at_start(&context, &config).await?;
        let replicas = stream.cached_info().config.num_replicas;
        tracing::warn!(
            stream = %config.stream,
            replicas,
            server_version = %client.server_info().version,
            "{}",
            config::durability_warning(replicas, &client.server_info().version)
        );
        let max_payload = client.server_info().max_payload;
        if largest_record(max_payload) < config.max_body_bytes {
            tracing::warn!(
                max_body_bytes = config.max_body_bytes,
                "{}: an event whose compressed record is larger is refused with 413",
                config::max_payload_advice(max_payload)
            );
        }
        let window = stream.cached_info().config.duplicate_window;
        if window != config.duplicate_window {
            tracing::warn!(
                duplicate_window = %humantime::format_duration(window),
                asked = %humantime::format_duration(config.duplicate_window),
                "the stream's duplicate window is not --nats-duplicate-window: nats-server takes \
                 0 for its default (2 minutes), and the window is at most --retention-max-age"
            );
        }
        let info = stream.get_info().await.map_err(unavailable)?;
        let origin = Origin::of(&info);
        let next = info.state.last_sequence + 1;
        let first = first_retained(&info.state);
        let shared = Arc::new(Shared {
            syncs: AtomicU64::new(0),
            synced_records: AtomicU64::new(0),
            bytes: AtomicU64::new(info.state.bytes),
            first: AtomicU64::new(first),
            next: AtomicU64::new(next),
            committed: watch::channel(next - 1).0,
            recent: Mutex::new(VecDeque::new()),
            cache_held: AtomicU64::new(0),
            cache_bytes: config.cache_bytes.max(1),
            origin,
            skip_below: AtomicU64::new(0),
            front_skippable: std::sync::atomic::AtomicBool::new(false),
            created_ms: std::sync::atomic::AtomicI64::new(created_ms(&info)),
            purged_below: AtomicU64::new(0),
            replaced: watch::channel(None).0,
        });
        let reader = Reader {
            client: client.clone(),
            stream: stream.clone(),
            all_subjects: format!("{}.*.*", config.subject_prefix),
            finds: Arc::new(tokio::sync::Semaphore::new(FINDS_AT_ONCE)),
        };
        tokio::spawn(tail(client.clone(), stream.clone(), shared.clone(), next));
        if !config.transitive_max_age.is_zero() {
            // Once before the first read, so that a hole left before the gateway started is
            // passed over from the start.
            if let Err(error) = expire_once(&reader, &config, &shared).await {
                tracing::warn!(%error, "cannot look for expired transitive events; retrying");
            }
            tokio::spawn(expire_transitive(
                reader.clone(),
                config.clone(),
                Arc::downgrade(&shared),
            ));
        }
        tokio::spawn(refresh_first(
            context.clone(),
            config.stream.clone(),
            Arc::downgrade(&shared),
        ));
        tracing::info!(stream = %config.stream, first, next, "JetStream store connected");
        Ok(Self {
            client,
            context,
            stream,
            reader,
            config,
            shared,
        })
    }

    /// Sends `record` to the stream (the server assigns sequences in the order records are
    /// sent); the ack is awaited by [`JetStreamLog::confirm`].
    async fn send(
        &self,
        record: NewRecord,
    ) -> Result<jetstream::context::PublishAckFuture, LogError> {
        let message = jetstream::message::PublishMessage::build()
            .payload(record.payload)
            .header(RECEIVED_AT, record.received_at_ms.to_string().as_str());
        let prefix = &self.config.subject_prefix;
        let (message, subject) = match record.event_id {
            Some(id) if id > 0 => (
                message.message_id(id.to_string()),
                config::event_subject(prefix, id),
            ),
            // A transitive event sent with an idempotency key: deduplicated by its key's id.
            Some(key) => (
                message.message_id(key.to_string()),
                config::transitive_subject(prefix),
            ),
            // Never deduplicated: no message id.
            None => (message, config::transitive_subject(prefix)),
        };
        self.context
            .send_publish(subject, message)
            .await
            .map_err(|error| self.publish_error(error))
    }

    /// The outcome of a record [`JetStreamLog::send`] sent, once the stream has answered.
    async fn confirm(
        &self,
        ack: jetstream::context::PublishAckFuture,
    ) -> Result<Appended, LogError> {
        match ack.await {
            Ok(ack) => Ok(Appended {
                sequence: ack.sequence,
                duplicate: ack.duplicate,
            }),
            Err(error) => Err(unacknowledged(error)),
        }
    }

    /// A publish that did not leave: over the server's `max_payload` (checked at ingest, but
    /// the server may have changed since) is refused for good, with what to change, never
    /// answered 503 for the sender to retry forever.
    fn publish_error(&self, error: jetstream::context::PublishError) -> LogError {
        if error.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded {
            let advice = config::max_payload_advice(self.client.server_info().max_payload);
            tracing::warn!("an event was not stored: {error}; {advice}");
            return LogError::TooLarge(format!("the event is too large to store: {advice}"));
        }
        unavailable(error)
    }

    fn cached(&self, from: u64, limit: usize) -> Option<Vec<Record>> {
        let recent = self.shared.recent.lock().unwrap_or_else(|p| p.into_inner());
        from_cache(&recent, from, limit)
    }

    /// The record at `from` when a direct get did not find it, asked of the stream leader (a
    /// direct get may be answered by a replica that is behind). If the leader has no such record
    /// either, it was removed (retention, or deleted by hand): the error says where reading can
    /// go on, the first record after it. A hole that expired transitive events left is passed
    /// over: the next record (`None` at the end of the log).
    async fn read_at_leader(&self, from: u64) -> Result<Option<Record>, LogError> {
        match self.stream.get_raw_message(from).await {
            Ok(message) => return Ok(Some(record_of(message))),
            Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => {}
            Err(error) => return Err(unavailable(error)),
        }
        let info = self.stream.get_info().await.map_err(unavailable)?;
        let first = first_retained(&info.state);
        self.shared.first.fetch_max(first, Ordering::AcqRel);
        let after = self.reader.next_record(from).await?;
        let oldest = after
            .as_ref()
            .map_or(info.state.last_sequence + 1, |record| record.sequence);
        // Holes that expired transitive events left: passed over, not reported. At the front
        // only while nothing else (a `max_age`) has removed anything.
        let mut explained = self.shared.expired_hole(from, oldest);
        if !explained && !self.config.transitive_max_age.is_zero() {
            // Another gateway may have purged since this one last looked.
            let now = crate::gateway::now_ms();
            learn_skippable(&self.reader, &self.config, &self.shared, now).await?;
            explained = self.shared.expired_hole(from, oldest);
        }
        if explained {
            // The next record, or none yet: the end of the log, the hole passed over.
            return Ok(after);
        }
        Err(LogError::Truncated {
            requested: from,
            oldest: oldest.max(from + 1),
        })
    }
}

impl Reader {
    /// The first record at or after `sequence`, from the leader. A lookup filtered by subject:
    /// only for gaps, where a lookup by sequence finds nothing.
    async fn next_record(&self, sequence: u64) -> Result<Option<Record>, LogError> {
        match self
            .stream
            .get_first_raw_message_by_subject(self.all_subjects.clone(), sequence)
            .await
        {
            Ok(message) => Ok(Some(record_of(message))),
            Err(error) if error.kind() == stream::RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(error) => Err(unavailable(error)),
        }
    }

    /// The record at `sequence` or, when that one is gone, the next one; `None` unless it is
    /// before `end`.
    async fn record_at_or_after(
        &self,
        sequence: u64,
        end: u64,
    ) -> Result<Option<Record>, LogError> {
        let record = match self.stream.direct_get(sequence).await {
            Ok(message) => Some(record_of(message)),
            Err(error) if error.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                self.next_record(sequence).await?
            }
            Err(error) => return Err(unavailable(error)),
        };
        Ok(record.filter(|record| record.sequence < end))
    }

    /// The first sequence in `first..next` received at or after `at_ms` (`next` if none). The
    /// gateway's receive time (the RECEIVED_AT header), as in every store, not NATS's publish
    /// time. Receive times follow the sequence, up to the disorder of publishes from several
    /// replicas (README): a binary search over the sequences, a direct get each step.
    async fn seek(&self, Bounds { first, next }: Bounds, at_ms: i64) -> Result<u64, LogError> {
        let (mut low, mut high) = (first, next);
        while low < high {
            let mid = low + (high - low) / 2;
            match self.record_at_or_after(mid, high).await? {
                Some(record) if record.received_at_ms < at_ms => low = record.sequence + 1,
                _ => high = mid,
            }
        }
        // `low` may have been removed since: the record retained there or after it.
        Ok(self
            .record_at_or_after(low, next)
            .await?
            .map_or(next, |record| record.sequence))
    }

    /// The sequence of the first event stored under `event_id` (its bucket's headers, read from
    /// the oldest to the bucket's last message), or `None`.
    async fn find(&self, prefix: &str, event_id: i64) -> Result<Option<u64>, LogError> {
        let subject = config::event_subject(prefix, event_id);
        let last = match self.stream.direct_get_last_for_subject(&subject).await {
            Ok(message) => message.sequence,
            Err(error) if error.kind() == jetstream::stream::DirectGetErrorKind::NotFound => {
                return Ok(None)
            }
            Err(error) => return Err(unavailable(error)),
        };
        let wanted = event_id.to_string();
        let _slot = self.finds.acquire().await.map_err(unavailable)?;
        let consumer = self
            .stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: subject,
                headers_only: true,
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let mut messages = consumer.messages().await.map_err(unavailable)?;
        let scan = async {
            while let Some(message) = messages.next().await {
                let message = message.map_err(unavailable)?;
                let info = message.info().map_err(unavailable)?;
                let (sequence, rest) = (info.stream_sequence, info.pending);
                let id = message
                    .headers
                    .as_ref()
                    .and_then(|headers| headers.get(async_nats::header::NATS_MESSAGE_ID));
                if id.is_some_and(|id| id.as_str() == wanted) {
                    return Ok(Some(sequence));
                }
                // The bucket's last message, or none left after this one (the last one was
                // removed since).
                if sequence >= last || rest == 0 {
                    return Ok(None);
                }
            }
            Err(unavailable("the lookup by id was interrupted"))
        };
        tokio::time::timeout(FIND_TIMEOUT, scan)
            .await
            .map_err(|_| unavailable("the lookup by id took too long"))?
    }
}

/// The cached records from `from` on, up to `limit` and up to the first gap (a record removed
/// before the tail saw it); `None` when the cache does not hold `from` (older than the cache, or
/// in a gap), so that the stream is asked. `Some` and empty past the newest cached record.
fn from_cache(recent: &VecDeque<Record>, from: u64, limit: usize) -> Option<Vec<Record>> {
    let start = recent.partition_point(|r| r.sequence < from);
    match recent.get(start) {
        Some(record) if record.sequence == from => {}
        None if !recent.is_empty() => return Some(Vec::new()),
        _ => return None,
    }
    Some(
        recent
            .range(start..)
            .zip(from..)
            .take_while(|(record, sequence)| record.sequence == *sequence)
            .take(limit)
            .map(|(record, _)| record.clone())
            .collect(),
    )
}

fn created_ms(info: &stream::Info) -> i64 {
    (info.created.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The oldest sequence the stream retains (`last + 1` when it is empty).
fn first_retained(state: &stream::State) -> u64 {
    if state.messages == 0 {
        state.last_sequence + 1
    } else {
        state.first_sequence
    }
}

fn record_of(message: jetstream::message::StreamMessage) -> Record {
    Record {
        sequence: message.sequence,
        received_at_ms: received_at(Some(&message.headers), message.time.unix_timestamp_nanos()),
        // A copy of its own: the payload is a slice of the connection's read buffer, which a
        // record held by a subscriber would keep whole.
        payload: bytes::Bytes::copy_from_slice(&message.payload),
    }
}

/// The first connection. A server that cannot be reached (down, starting, a network fault) is
/// retried with a growing delay, each attempt logged as that; a refusal that retrying cannot
/// change (the server refuses the credentials, TLS fails or the server does not offer it) is an
/// error naming what to fix.
async fn connect_at_start(
    config: &NatsConfig,
    servers: Vec<async_nats::ServerAddr>,
) -> Result<async_nats::Client, LogError> {
    let where_ = config::redact(&config.url);
    let mut delay = Duration::from_millis(250);
    loop {
        let error = match connect_options(config)
            .await?
            .connect(servers.clone())
            .await
        {
            Ok(client) => return Ok(client),
            Err(error) => error,
        };
        if let Some(refusal) = refusal(&error, config) {
            return Err(LogError::Misconfigured(format!(
                "cannot use NATS at {where_}: {refusal}"
            )));
        }
        tracing::warn!(
            servers = %where_,
            %error,
            retry_in_ms = delay.as_millis() as u64,
            "NATS is unreachable at start; retrying"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

/// What to fix when a connection error is a refusal rather than an unreachable server.
fn refusal(error: &async_nats::ConnectError, config: &NatsConfig) -> Option<String> {
    use async_nats::ConnectErrorKind as Kind;
    match error.kind() {
        Kind::AuthorizationViolation | Kind::Authentication => Some(format!(
            "the server refused the credentials ({error}): check --nats-token, --nats-user and \
             --nats-password, or --nats-creds"
        )),
        Kind::Tls => Some(format!(
            "TLS failed ({error}): check --nats-tls-ca, --nats-tls-cert and --nats-tls-key"
        )),
        Kind::ServerParse => Some(error.to_string()),
        // TLS asked for from a server that does not offer it: the handshake meets plain NATS
        // protocol bytes, which rustls reports as invalid data (an unreachable server is a
        // refused or reset connection, a timeout, or a DNS failure instead).
        Kind::Io if wants_tls(config) && is_invalid_data(error) => Some(format!(
            "TLS is required (--nats-require-tls, a --nats-tls-* file or a tls:// server) and \
             the TLS handshake failed ({error}): does the server offer TLS?"
        )),
        _ => None,
    }
}

/// Whether the gateway asks for TLS: by a flag, a TLS file, or a `tls://` server URL.
fn wants_tls(config: &NatsConfig) -> bool {
    config.tls_required()
        || config
            .url
            .split(',')
            .any(|url| url.trim().starts_with("tls://"))
}

fn is_invalid_data(error: &async_nats::ConnectError) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::InvalidData {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

async fn connect_options(config: &NatsConfig) -> Result<async_nats::ConnectOptions, LogError> {
    let mut options = async_nats::ConnectOptions::new()
        .name("iqchannels-gateway")
        .max_reconnects(None)
        // A server that stops answering (frozen, or cut off without a FIN) is left after three
        // unanswered pings, about 6 s, for another server of the list; the default (a ping a
        // minute) would hold every append on it for minutes.
        .ping_interval(PING_INTERVAL)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Disconnected => {
                    tracing::warn!("NATS disconnected; reconnecting")
                }
                async_nats::Event::Connected => tracing::info!("NATS connected"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if let Some(path) = &config.credentials_file {
        options = options.credentials_file(path).await.map_err(|e| {
            LogError::Misconfigured(format!("--nats-creds {}: {e}", path.display()))
        })?;
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.clone());
    }
    if let Some(token) = &config.token {
        options = options.token(token.clone());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let Some((cert, key)) = &config.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options.require_tls(config.tls_required()))
}

/// How long the start retries what a JetStream server answers while it is not ready.
const OPEN_RETRY: Duration = Duration::from_secs(60);

/// [`open_stream`], retried with a growing delay for up to [`OPEN_RETRY`] while the server's
/// answers say it is not ready (a request timeout, a cluster without a stream leader yet, a
/// storage error), each attempt logged; any other refusal at once.
async fn open_stream_at_start(
    context: &jetstream::Context,
    config: &NatsConfig,
) -> Result<stream::Stream, LogError> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(250);
    loop {
        match open_stream(context, config).await {
            Ok(stream) => return Ok(stream),
            Err(Opening::NotReady(error)) if started.elapsed() < OPEN_RETRY => {
                tracing::warn!(
                    stream = %config.stream,
                    %error,
                    retry_in_ms = delay.as_millis() as u64,
                    "JetStream cannot open the stream yet; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(Opening::NotReady(error)) => {
                return Err(unavailable(format!(
                    "{error} (still after {}s of retrying)",
                    OPEN_RETRY.as_secs()
                )))
            }
            Err(Opening::Refused(error)) => return Err(error),
        }
    }
}

/// Why the stream could not be opened.
enum Opening {
    /// An answer that may change (a timeout, a server-side error): worth retrying.
    NotReady(String),
    /// Retrying cannot change it (the stream's shape, a refused request).
    Refused(LogError),
}

/// Whether a JetStream API error is the server's (5xx: storage, no leader yet), not the request's.
fn server_side(error: &jetstream::Error) -> bool {
    error.code() >= 500
}

/// Gets the stream, creating it if missing; refuses one whose shape would break the guarantees.
async fn open_stream(
    context: &jetstream::Context,
    config: &NatsConfig,
) -> Result<stream::Stream, Opening> {
    use jetstream::context::{CreateStreamErrorKind, GetStreamErrorKind};
    let wanted = config.stream_config();
    let mut stream = match context.get_stream(&config.stream).await {
        Ok(stream) => stream,
        Err(error) if is_stream_not_found(&error.kind()) => {
            tracing::info!(stream = %config.stream, "creating the JetStream stream");
            match context.create_stream(wanted.clone()).await {
                Ok(stream) => stream,
                Err(error) => {
                    let message = format!("cannot create stream {}: {error}", config.stream);
                    return Err(match error.kind() {
                        CreateStreamErrorKind::TimedOut
                        | CreateStreamErrorKind::JetStreamUnavailable => Opening::NotReady(message),
                        CreateStreamErrorKind::JetStream(error) if server_side(&error) => {
                            Opening::NotReady(message)
                        }
                        _ => Opening::Refused(unavailable(message)),
                    });
                }
            }
        }
        Err(error) => {
            let message = format!("cannot read stream {}: {error}", config.stream);
            return Err(match error.kind() {
                GetStreamErrorKind::Request => Opening::NotReady(message),
                GetStreamErrorKind::JetStream(error) if server_side(&error) => {
                    Opening::NotReady(message)
                }
                _ => Opening::Refused(unavailable(message)),
            });
        }
    };
    let existing = &stream
        .info()
        .await
        .map_err(|error| {
            Opening::NotReady(format!("cannot read stream {}: {error}", config.stream))
        })?
        .config;
    if config::is_old_layout(existing, &config.subject_prefix) {
        return Err(Opening::Refused(LogError::Misconfigured(
            config::old_layout_advice(&config.stream),
        )));
    }
    let problems = config::incompatibilities(existing, &wanted);
    if !problems.is_empty() {
        return Err(Opening::Refused(LogError::Unavailable(format!(
            "stream {} is not usable by the gateway: {}. Change the stream (`nats stream edit`) \
             or the gateway's flags so that they agree",
            config.stream,
            problems.join("; ")
        ))));
    }
    Ok(stream)
}

fn is_stream_not_found(kind: &jetstream::context::GetStreamErrorKind) -> bool {
    matches!(kind, jetstream::context::GetStreamErrorKind::JetStream(error)
        if error.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// Follows the stream from `next` with an ordered consumer (it recreates itself after reconnects
/// and gaps), caching records and publishing the committed sequence.
async fn tail(
    client: async_nats::Client,
    stream: stream::Stream,
    shared: Arc<Shared>,
    mut next: u64,
) {
    loop {
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            })
            .await;
        let messages = match consumer {
            Ok(consumer) => consumer.messages().await,
            Err(error) => {
                tracing::warn!(%error, "JetStream tail: cannot create consumer; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut messages = match messages {
            Ok(messages) => messages,
            Err(error) => {
                tracing::warn!(%error, "JetStream tail: cannot subscribe; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        while let Some(message) = messages.next().await {
            let message = match message {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(%error, "JetStream tail interrupted; resuming");
                    break;
                }
            };
            let Ok(info) = message.info() else { continue };
            let sequence = info.stream_sequence;
            if sequence < next {
                continue;
            }
            let received_at_ms = received_at(
                message.headers.as_ref(),
                info.published.unix_timestamp_nanos(),
            );
            // A copy of its own: the message's payload is a slice of the connection's read
            // buffer, which it would keep whole.
            let payload = bytes::Bytes::copy_from_slice(&message.payload);
            drop(message);
            let record = Record {
                sequence,
                received_at_ms,
                payload,
            };
            {
                let mut recent = shared.recent.lock().unwrap_or_else(|p| p.into_inner());
                let mut held = shared.cache_held.load(Ordering::Relaxed) as usize;
                held += record.payload.len();
                recent.push_back(record);
                while recent.len() > 1 && (recent.len() > CACHE || held > shared.cache_bytes) {
                    if let Some(old) = recent.pop_front() {
                        held -= old.payload.len();
                    }
                }
                shared.cache_held.store(held as u64, Ordering::Relaxed);
            }
            next = sequence + 1;
            shared.next.fetch_max(next, Ordering::AcqRel);
            shared.committed.send_replace(sequence);
        }
        if shared.committed.is_closed() && Arc::strong_count(&shared) == 1 {
            return;
        }
    }
}

/// What a stream is, beyond its name: on a cluster, its Raft group (named by the meta layer
/// when the stream is created, the same on every replica and across elections and restarts); on
/// a single server, its creation time. A stream created again gets another.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Origin {
    Raft(String),
    Created(i128),
}

impl Origin {
    fn of(info: &stream::Info) -> Self {
        match info.cluster.as_ref().and_then(|c| c.raft_group.clone()) {
            Some(group) => Origin::Raft(group),
            None => Origin::Created(info.created.unix_timestamp_nanos()),
        }
    }

    /// Whether `self` shows another stream than `opened`. Only like with like: an answer
    /// without the cluster's part (a server catching up) says nothing.
    fn other_than(&self, opened: &Origin) -> bool {
        match (self, opened) {
            (Origin::Raft(now), Origin::Raft(then)) => now != then,
            (Origin::Created(now), Origin::Created(then)) => now != then,
            _ => false,
        }
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Raft(group) => write!(f, "raft-{group}"),
            Origin::Created(nanos) => write!(f, "created-{nanos}"),
        }
    }
}

/// Keeps `first` current as JetStream's retention removes old events, and notices a stream
/// that is no longer the one the gateway opened (deleted, or deleted and created again: another
/// [`Origin`]).
async fn refresh_first(context: jetstream::Context, name: String, shared: std::sync::Weak<Shared>) {
    // A reset is taken for one only when seen twice in a row (2 s apart): a single answer may
    // come from a server catching up after a restart or an election.
    let mut seen = 0;
    loop {
        tokio::time::sleep(REFRESH).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let replaced = match context.get_stream(&name).await {
            Ok(stream) => {
                let info = stream.cached_info();
                let origin = Origin::of(info);
                let last = info.state.last_sequence;
                if origin.other_than(&shared.origin) {
                    Some(format!(
                        "the stream {name} was deleted and created again (it is {origin}, not \
                         {} as when the gateway opened it)",
                        shared.origin
                    ))
                } else {
                    shared
                        .first
                        .fetch_max(first_retained(&info.state), Ordering::AcqRel);
                    shared.next.fetch_max(last + 1, Ordering::AcqRel);
                    shared
                        .created_ms
                        .fetch_min(created_ms(info), Ordering::AcqRel);
                    None
                }
            }
            Err(error) if is_stream_not_found(&error.kind()) => {
                Some(format!("the stream {name} was deleted"))
            }
            // Not an answer about the stream (NATS away, an election): nothing seen.
            Err(_) => continue,
        };
        seen = if replaced.is_some() { seen + 1 } else { 0 };
        if let Some(reason) = replaced.filter(|_| seen >= 2) {
            tracing::error!(
                stream = %name,
                "{reason}: every sequence and cursor into it is void; the gateway stops and \
                 must start again to serve the stream as it is now"
            );
            shared.replaced.send_replace(Some(reason));
            return;
        }
    }
}

/// Applies the transitive events' own retention (`--nats-transitive-max-age`), on every gateway
/// (a purge is idempotent): their subject is purged below the first sequence received within the
/// age. `skip_below` is set to the first sequence received within the age less a margin (half
/// the age, at most a minute: room for the clocks of several gateways and for a purge another
/// ran since this one's last look), so that a read passes over the holes left: a hole there
/// follows a record received before it, or is at the front of a stream created before it. A
/// stream created since holds no expired transitive event, and no hole in it is passed over.
async fn expire_transitive(reader: Reader, config: NatsConfig, shared: std::sync::Weak<Shared>) {
    let every =
        (config.transitive_max_age / 4).clamp(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        tokio::time::sleep(every).await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(error) = expire_once(&reader, &config, &shared).await {
            tracing::warn!(%error, "cannot look for expired transitive events; retrying");
        }
    }
}

/// One pass of [`expire_transitive`].
async fn expire_once(
    reader: &Reader,
    config: &NatsConfig,
    shared: &Shared,
) -> Result<(), LogError> {
    let age_ms = config.transitive_max_age.as_millis().min(i64::MAX as u128) as i64;
    let now = crate::gateway::now_ms();
    let bounds = Bounds {
        first: shared.first.load(Ordering::Acquire),
        next: shared.next.load(Ordering::Acquire),
    };
    let purge_cutoff = now.saturating_sub(age_ms);
    let created_ms = shared.created_ms.load(Ordering::Acquire);
    // Only in a stream created before the cutoff (a migrated stream holds old receive times):
    // what [`JetStreamLog::read_at_leader`] passes over relies on it.
    let below = if created_ms < purge_cutoff {
        reader.seek(bounds, purge_cutoff).await?
    } else {
        0
    };
    // In steps of at most `purge_step` sequences: a purge of millions at once kept nats-server
    // 2.9 busy past the request's timeout (and its pings: the connection dropped).
    let mut done = shared
        .purged_below
        .load(Ordering::Acquire)
        .max(bounds.first);
    let subject = config::transitive_subject(&config.subject_prefix);
    while done < below {
        let step = below.min(done.saturating_add(config.purge_step.max(1)));
        match reader
            .stream
            .purge()
            .filter(subject.clone())
            .sequence(step)
            .await
        {
            Ok(purged) => {
                if purged.purged > 0 {
                    tracing::debug!(
                        purged = purged.purged,
                        below = step,
                        "transitive events expired"
                    );
                }
                done = step;
                shared.purged_below.fetch_max(step, Ordering::AcqRel);
            }
            Err(error) => {
                tracing::warn!(%error, "cannot remove expired transitive events; retrying");
                break;
            }
        }
    }
    learn_skippable(reader, config, shared, now).await
}

/// Sets `skip_below` and `front_skippable` from what the stream holds now (see
/// [`expire_transitive`]).
async fn learn_skippable(
    reader: &Reader,
    config: &NatsConfig,
    shared: &Shared,
    now: i64,
) -> Result<(), LogError> {
    let ms = |age: Duration| age.as_millis().min(i64::MAX as u128) as i64;
    let age_ms = ms(config.transitive_max_age);
    let max_age_ms = ms(config.max_age);
    let margin_ms = (age_ms / 2).min(60_000);
    let bounds = Bounds {
        first: shared.first.load(Ordering::Acquire),
        next: shared.next.load(Ordering::Acquire),
    };
    let skip_cutoff = now.saturating_sub(age_ms).saturating_add(margin_ms);
    let created_ms = shared.created_ms.load(Ordering::Acquire);
    if created_ms < skip_cutoff {
        let skippable = reader.seek(bounds, skip_cutoff).await?;
        shared.skip_below.fetch_max(skippable, Ordering::AcqRel);
    }
    // Before the stream's first sequence, only expired transitive events are gone while no
    // `max_age` can have removed anything: the stream is younger than it (NATS's clock, with a
    // minute's room).
    let young = now.saturating_sub(created_ms) < max_age_ms.saturating_sub(60_000);
    shared
        .front_skippable
        .store(max_age_ms == 0 || young, Ordering::Release);
    Ok(())
}

fn received_at(headers: Option<&async_nats::HeaderMap>, published_nanos: i128) -> i64 {
    headers
        .and_then(|h| h.get(RECEIVED_AT))
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or((published_nanos / 1_000_000) as i64)
}

#[async_trait]
impl EventLog for JetStreamLog {
    async fn append(&self, records: Vec<NewRecord>) -> Vec<Result<Appended, LogError>> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            let error = LogError::Unavailable("not connected to NATS".into());
            return vec![Err(error); records.len()];
        }
        // Sent one after the other, so that the stream stores them in the batch's order (sent
        // concurrently, a batch of more than 64 was stored out of order: tests/catch_up_cost.rs),
        // and the acks awaited together: one round trip for the batch. Each record is stored or
        // not on its own (NATS may go away, or the stream refuse one, mid-batch). Once a send
        // fails for want of NATS, the rest are not sent (each would wait for its own timeout,
        // and a later one stored before an earlier one would break the order): they fail the
        // same way. A record refused for its size fails alone.
        //
        // At most `ACKS_IN_FLIGHT` records wait for their acks at once: the client holds a
        // permit for each (5,000 by default) until its ack is awaited, so a larger batch sent
        // whole would wait for ever for a permit (found from outside: 5,001 items hung).
        let mut results = Vec::with_capacity(records.len());
        let mut failed: Option<LogError> = None;
        let mut records = records.into_iter().peekable();
        while records.peek().is_some() {
            let mut sent = Vec::with_capacity(ACKS_IN_FLIGHT);
            for record in records.by_ref().take(ACKS_IN_FLIGHT) {
                if let Some(error) = &failed {
                    sent.push(Err(error.clone()));
                    continue;
                }
                let result = self.send(record).await;
                if let Err(error) = &result {
                    if !matches!(error, LogError::TooLarge(_)) {
                        failed = Some(error.clone());
                    }
                }
                sent.push(result);
            }
            results.extend(
                futures_util::future::join_all(
                    sent.into_iter()
                        .map(|sent| async move { self.confirm(sent?).await }),
                )
                .await,
            );
        }
        let stored = results.iter().filter_map(|r| r.as_ref().ok());
        if let Some(last) = stored.clone().map(|a| a.sequence).max() {
            self.shared.next.fetch_max(last + 1, Ordering::AcqRel);
            self.shared.syncs.fetch_add(1, Ordering::Relaxed);
            self.shared
                .synced_records
                .fetch_add(stored.count() as u64, Ordering::Relaxed);
        }
        results
    }

    async fn read(&self, from: u64, limit: usize) -> Result<Vec<Record>, LogError> {
        let first = self.bounds().first;
        if from < first {
            return Err(LogError::Truncated {
                requested: from,
                oldest: first,
            });
        }
        if let Some(records) = self.cached(from, limit) {
            // An empty page from the cache means the end of the log only if nothing was
            // acknowledged past it: an append bumps `next` before the tail caches the record.
            if !records.is_empty() || from >= self.shared.next.load(Ordering::Acquire) {
                return Ok(records);
            }
        }
        let end = self
            .shared
            .next
            .load(Ordering::Acquire)
            .min(from.saturating_add(limit as u64));
        if from >= end {
            return Ok(Vec::new());
        }
        let fetched: Vec<Option<Record>> = futures_util::stream::iter(from..end)
            .map(|sequence| async move {
                match self.stream.direct_get(sequence).await {
                    Ok(message) => Ok(Some(record_of(message))),
                    Err(error)
                        if error.kind() == jetstream::stream::DirectGetErrorKind::NotFound =>
                    {
                        Ok(None)
                    }
                    Err(error) => Err(unavailable(error)),
                }
            })
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        // The page ends before the first record not found: the next read starts there and is
        // told whether it was removed. A later record is never returned as if it followed. A
        // hole expired transitive events left is passed over (a region of typing events read
        // page by page, not one record per lookup).
        let mut records = Vec::with_capacity(fetched.len());
        for (sequence, record) in (from..).zip(fetched) {
            match record {
                Some(record) => records.push(record),
                None if self.shared.expired_hole(sequence, sequence + 1) => {}
                None => break,
            }
        }
        if records.is_empty() {
            records.extend(self.read_at_leader(from).await?);
        }
        Ok(records)
    }

    async fn find_event(&self, event_id: i64) -> Result<Option<u64>, LogError> {
        if event_id <= 0 {
            return Ok(None);
        }
        self.reader
            .find(&self.config.subject_prefix, event_id)
            .await
    }

    async fn seek_time(&self, at_ms: i64) -> Result<u64, LogError> {
        self.reader.seek(self.bounds(), at_ms).await
    }

    fn bounds(&self) -> Bounds {
        Bounds {
            first: self.shared.first(),
            next: self.shared.next.load(Ordering::Acquire),
        }
    }

    fn committed(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    fn healthy(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
            && self.shared.replaced.borrow().is_none()
    }

    fn identity(&self) -> String {
        format!("jetstream:{}:{}", self.config.stream, self.shared.origin)
    }

    fn replaced(&self) -> watch::Receiver<Option<String>> {
        self.shared.replaced.subscribe()
    }

    fn max_payload(&self) -> Option<super::PayloadLimit> {
        let max_payload = self.client.server_info().max_payload;
        if max_payload == 0 {
            // Not known yet (never connected): the publish says.
            return None;
        }
        Some(super::PayloadLimit {
            bytes: largest_record(max_payload),
            advice: config::max_payload_advice(max_payload),
        })
    }

    fn stats(&self) -> LogStats {
        LogStats {
            syncs: self.shared.syncs.load(Ordering::Relaxed),
            synced_records: self.shared.synced_records.load(Ordering::Relaxed),
            size_bytes: self.shared.bytes.load(Ordering::Relaxed),
            damaged_reads: 0,
            cache_bytes: self.shared.cache_held.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn the_cache_serves_a_read_only_from_the_sequence_asked_and_up_to_a_gap() {
        let cache: VecDeque<Record> = [3, 4, 5, 7, 8]
            .into_iter()
            .map(|sequence| Record {
                sequence,
                received_at_ms: 0,
                payload: Bytes::new(),
            })
            .collect();
        let read = |from, limit| {
            from_cache(&cache, from, limit)
                .map(|records| records.iter().map(|r| r.sequence).collect::<Vec<_>>())
        };
        assert_eq!(read(4, 10), Some(vec![4, 5]), "stops before the gap");
        assert_eq!(read(3, 2), Some(vec![3, 4]));
        assert_eq!(read(7, 10), Some(vec![7, 8]));
        assert_eq!(read(6, 10), None, "in the gap: ask the stream");
        assert_eq!(read(2, 10), None, "older than the cache: ask the stream");
        assert_eq!(read(9, 10), Some(vec![]), "past the newest record");
        assert!(from_cache(&VecDeque::new(), 1, 10).is_none());
    }
}
