//! What the JetStream store is configured with, the stream it creates, why it refuses an existing
//! stream, and what durability it can promise.

use std::time::Duration;

use std::path::Path;

use async_nats::jetstream::stream;
use async_nats::ServerAddr;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// nats-server's duplicate window when a stream is created without one.
const SERVER_DEFAULT_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Subjects an event with an id may go to (`<prefix>.e.<id mod BUCKETS>`): what bounds the
/// stream's subjects, and nats-server's memory for them (about 400 bytes each), whatever the
/// number of events. A lookup by id reads the headers of one bucket: a 1/16,384th of the
/// stream. Never changed for an existing stream (lookups would miss).
pub const BUCKETS: i64 = 16_384;

/// The subject of an event with an id (`id > 0`).
pub fn event_subject(prefix: &str, id: i64) -> String {
    format!("{prefix}.e.{}", id.rem_euclid(BUCKETS))
}

/// The one subject of every transitive event (typing: no id, or an idempotency key's negative
/// id), which the transitive retention purges.
pub fn transitive_subject(prefix: &str) -> String {
    format!("{prefix}.t.0")
}

/// The subjects of a stream in the layout of releases before the bounded one: a subject per
/// event (`<prefix>.<id>`, `<prefix>.t<nuid>`), one message per subject.
fn old_layout_subjects(prefix: &str) -> Vec<String> {
    vec![format!("{prefix}.*")]
}

/// The servers of a list such as `--store`'s: URLs separated by commas (spaces around them
/// allowed), each `nats://HOST:PORT` or `tls://HOST:PORT`, servers of one cluster (the client
/// connects to any and fails over). The error names the entry that is not one.
pub fn parse_servers(list: &str) -> Result<Vec<ServerAddr>, String> {
    list.split(',')
        .map(str::trim)
        .map(|entry| {
            if entry.is_empty() {
                return Err(format!(
                    "the NATS server list `{}` has an empty entry",
                    redact(list)
                ));
            }
            if !(entry.starts_with("nats://") || entry.starts_with("tls://")) {
                return Err(format!(
                    "NATS server `{}`: expected nats://HOST:PORT or tls://HOST:PORT",
                    redact(entry)
                ));
            }
            entry.parse::<ServerAddr>().map_err(|error| {
                let reason = error.to_string();
                let reason = reason.trim_start_matches("NATS server URL is invalid: ");
                format!("NATS server `{}` is invalid: {reason}", redact(entry))
            })
        })
        .collect()
}

/// The server URLs without any `user:password@` part, for logs and errors.
pub(super) fn redact(urls: &str) -> String {
    urls.split(',')
        .map(|url| match (url.find("://"), url.rfind('@')) {
            (Some(scheme), Some(at)) if at > scheme => {
                format!("{}://***@{}", &url[..scheme], &url[at + 1..])
            }
            _ => url.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Bytes of a JetStream message beyond its payload, at most: the headers (`Nats-Msg-Id`,
/// `Iqgw-Received-At`) count against the server's `max_payload` too.
pub const HEADERS_BYTES: usize = 256;

/// The largest record (payload) a server with this `max_payload` takes.
pub fn largest_record(max_payload: usize) -> usize {
    max_payload.saturating_sub(HEADERS_BYTES)
}

/// What a refused event is told when its record is over the server's `max_payload`.
pub fn max_payload_advice(max_payload: usize) -> String {
    format!(
        "the NATS server's max_payload is {max_payload} bytes (an event's record, compressed, \
         plus {HEADERS_BYTES} bytes of headers): raise `max_payload` in every NATS server's \
         configuration (README, \"Event size\"), or send smaller events"
    )
}

/// How long transitive events are kept on NATS by default (`--nats-transitive-max-age`).
pub const DEFAULT_TRANSITIVE_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// How to reach and shape the stream.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// Server URL(s), comma separated: `nats://host:4222`.
    pub url: String,
    /// Stream name.
    pub stream: String,
    /// Subject prefix; events go to `<prefix>.e.<id bucket>` and `<prefix>.t.0` ([`BUCKETS`]).
    pub subject_prefix: String,
    /// Stream replicas (`--nats-replicas`); an existing stream must have as many.
    pub replicas: usize,
    /// JetStream duplicate window (`--nats-duplicate-window`); an existing stream must have it.
    pub duplicate_window: Duration,
    /// Retention by age (`--retention-max-age`); zero keeps everything. An existing stream must
    /// have it.
    pub max_age: Duration,
    /// Retention of transitive events by age (`--nats-transitive-max-age`), enforced by the
    /// gateways (a purge of their subject); zero keeps them as long as every other event.
    pub transitive_max_age: Duration,
    /// How long to wait for a JetStream ack before answering 503.
    pub ack_timeout: Duration,
    /// Credentials file (`.creds`), user/password, or token.
    pub credentials_file: Option<std::path::PathBuf>,
    /// User name.
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<String>,
    /// Token.
    pub token: Option<String>,
    /// CA certificate (PEM) for TLS to NATS; implies TLS.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS; implies TLS.
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Require TLS (also implied by `tls_ca` and `tls_client`).
    pub require_tls: bool,
    /// The largest body the gateway accepts (`--max-body-bytes`): at start, compared with the
    /// server's `max_payload`, which bounds what can be stored.
    pub max_body_bytes: usize,
    /// Bytes of recent records the tail cache keeps (`--nats-cache-bytes`).
    pub cache_bytes: usize,
    /// Sequences one purge of expired transitive events covers at most (a purge of millions at
    /// once kept nats-server 2.9 busy past the request's timeout).
    pub purge_step: u64,
}

impl NatsConfig {
    /// Defaults for a server URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream: "IQCHANNELS_EVENTS".into(),
            subject_prefix: "iqchannels.events".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(3600),
            max_age: Duration::ZERO,
            transitive_max_age: DEFAULT_TRANSITIVE_MAX_AGE,
            ack_timeout: Duration::from_secs(5),
            credentials_file: None,
            user: None,
            password: None,
            token: None,
            tls_ca: None,
            tls_client: None,
            require_tls: false,
            max_body_bytes: 1024 * 1024,
            cache_bytes: super::DEFAULT_CACHE_BYTES,
            purge_step: 100_000,
        }
    }

    /// Whether the connection to NATS must be TLS: asked for, or implied by a CA or client
    /// certificate (as NATS's own clients do): a TLS file given and a cleartext connection made
    /// would be a silent downgrade.
    pub fn tls_required(&self) -> bool {
        self.require_tls || self.tls_ca.is_some() || self.tls_client.is_some()
    }

    /// Reads every file the flags name (credentials, CA, client certificate and key), before any
    /// connection: one that is missing or holds nothing usable is an error naming its flag and
    /// path, instead of a file the client would read only if the server asked for TLS.
    pub fn check_files(&self) -> Result<(), String> {
        let read = |flag: &str, path: &Path| {
            std::fs::read(path).map_err(|error| format!("{flag} {}: {error}", path.display()))
        };
        let certificates = |flag: &str, path: &Path| {
            let pem = read(flag, path)?;
            let found = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|error| format!("{flag} {}: {error}", path.display()))?;
            if found.is_empty() {
                return Err(format!(
                    "{flag} {}: no PEM certificate in it",
                    path.display()
                ));
            }
            Ok(())
        };
        if let Some(path) = &self.credentials_file {
            read("--nats-creds", path)?;
        }
        if let Some(path) = &self.tls_ca {
            certificates("--nats-tls-ca", path)?;
        }
        if let Some((cert, key)) = &self.tls_client {
            certificates("--nats-tls-cert", cert)?;
            let pem = read("--nats-tls-key", key)?;
            PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|error| format!("--nats-tls-key {}: {error}", key.display()))?;
        }
        Ok(())
    }

    /// The stream configuration the gateway creates, and checks an existing stream against.
    pub fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![
                format!("{}.e.*", self.subject_prefix),
                format!("{}.t.*", self.subject_prefix),
            ],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.effective_duplicate_window(),
            max_age: self.max_age,
            max_messages_per_subject: -1,
            discard: stream::DiscardPolicy::New,
            allow_direct: true,
            ..stream::Config::default()
        }
    }

    /// The duplicate window the stream gets: nats-server refuses one longer than `max_age`, and
    /// takes zero as its default (2 minutes).
    fn effective_duplicate_window(&self) -> Duration {
        let window = if self.duplicate_window.is_zero() {
            SERVER_DEFAULT_DUPLICATE_WINDOW
        } else {
            self.duplicate_window
        };
        if self.max_age.is_zero() {
            window
        } else {
            window.min(self.max_age)
        }
    }
}

/// Whether an existing stream has the layout of releases before the bounded one (a subject per
/// event), which [`super::migrate`] copies into a stream of today's.
pub fn is_old_layout(existing: &stream::Config, prefix: &str) -> bool {
    existing.subjects == old_layout_subjects(prefix) && existing.max_messages_per_subject == 1
}

/// Why a stream of the old layout is refused, and the command that migrates it.
pub fn old_layout_advice(stream: &str) -> String {
    format!(
        "stream {stream} has the layout of earlier releases (a subject per event, one message \
         each: nats-server's memory grows with every event). Copy it into a stream of today's \
         layout with `iqchannels-gateway migrate-stream --to {stream}_2` and the same --store and \
         --nats-* flags as the gateway (it can run again after an interruption), then start the \
         gateways with `--nats-stream {stream}_2`; cursors of the old stream are refused by the \
         new one (it is another store: README, \"Migrating a stream\")"
    )
}

/// What in an existing stream's configuration differs from what the gateway needs (`wanted`,
/// from [`NatsConfig::stream_config`]): each difference named with both values and why it
/// matters. Empty when the stream is usable.
pub fn incompatibilities(existing: &stream::Config, wanted: &stream::Config) -> Vec<String> {
    let mut problems = Vec::new();
    let mut differ = |what: &str, has: String, needs: String, why: &str| {
        problems.push(format!("{what} is {has}, must be {needs} ({why})"));
    };
    if existing.subjects != wanted.subjects {
        differ(
            "subjects",
            format!("{:?}", existing.subjects),
            format!("{:?}", wanted.subjects),
            "events go to <prefix>.e.<id bucket> and <prefix>.t.0; other subjects would put \
             foreign messages in the log",
        );
    }
    if existing.storage != stream::StorageType::File {
        differ(
            "storage",
            format!("{:?}", existing.storage).to_lowercase(),
            "file".into(),
            "a memory stream loses every acknowledged event when nats-server stops",
        );
    }
    if existing.retention != stream::RetentionPolicy::Limits {
        differ(
            "retention",
            format!("{:?}", existing.retention).to_lowercase(),
            "limits".into(),
            "work-queue and interest streams delete delivered events",
        );
    }
    let unlimited = "unlimited (-1)";
    for (what, value) in [
        ("max_msgs", existing.max_messages),
        ("max_bytes", existing.max_bytes),
        ("max_msg_size", i64::from(existing.max_message_size)),
    ] {
        if value > 0 {
            differ(
                what,
                value.to_string(),
                unlimited.into(),
                "with discard new, JetStream refuses events past a limit, and every retry too; \
                 retention on NATS is by age only",
            );
        }
    }
    if existing.max_messages_per_subject > 0 {
        differ(
            "max_msgs_per_subject",
            existing.max_messages_per_subject.to_string(),
            unlimited.into(),
            "a subject holds many events (an id bucket, or every transitive event): a limit \
             would remove or refuse events",
        );
    }
    if !existing.allow_direct {
        differ(
            "allow_direct",
            "false".into(),
            "true".into(),
            "reads by sequence",
        );
    }
    for (what, set, why) in [
        (
            "no_ack",
            existing.no_ack,
            "the gateway answers only after JetStream's ack",
        ),
        ("sealed", existing.sealed, "a sealed stream takes no events"),
        (
            "mirror",
            existing.mirror.is_some(),
            "a mirror takes no publishes",
        ),
    ] {
        if set {
            differ(what, "set".into(), "unset".into(), why);
        }
    }
    if existing.persist_mode == Some(stream::PersistenceMode::Async) {
        differ(
            "persist_mode",
            "async".into(),
            "default".into(),
            "async acknowledges before the event is stored",
        );
    }
    if existing.num_replicas != wanted.num_replicas {
        differ(
            "replicas",
            existing.num_replicas.to_string(),
            format!("{} as configured (--nats-replicas)", wanted.num_replicas),
            "the gateway promises what it is configured for",
        );
    }
    if existing.max_age != wanted.max_age {
        differ(
            "max_age",
            age(existing.max_age),
            format!(
                "{} as configured (--retention-max-age)",
                age(wanted.max_age)
            ),
            "retention must be what the gateway is configured for",
        );
    }
    if existing.duplicate_window != wanted.duplicate_window {
        differ(
            "duplicate_window",
            humantime::format_duration(existing.duplicate_window).to_string(),
            format!(
                "{} as configured (--nats-duplicate-window, at most the max age)",
                humantime::format_duration(wanted.duplicate_window)
            ),
            "dedup must be what the gateway is configured for",
        );
    }
    problems
}

fn age(max_age: Duration) -> String {
    if max_age.is_zero() {
        "0 (keep everything)".into()
    } else {
        humantime::format_duration(max_age).to_string()
    }
}

/// What an acknowledgement from JetStream really guarantees for a stream of `replicas`, on a
/// server of `version`: logged as a warning at start, because the gateway cannot check the
/// setting that decides it.
pub fn durability_warning(replicas: usize, version: &str) -> String {
    let stored = if replicas <= 1 {
        "an acknowledged event is on one NATS node. That node fsyncs only every `sync_interval` \
         (2 minutes by default), so a crash of its machine or a power cut loses acknowledged \
         events unless its JetStream configuration has `sync_interval: always` \
         (`jetstream { store_dir: ..., sync_interval: always }`); a replicated stream \
         (--nats-replicas 3 on a cluster) also survives losing a node"
            .to_owned()
    } else {
        format!(
            "an acknowledged event is on a majority of the stream's {replicas} NATS nodes, each \
             of which fsyncs only every `sync_interval` (2 minutes by default): a crash of a \
             majority at once (a power cut) loses acknowledged events unless every node has \
             `sync_interval: always` in its JetStream configuration"
        )
    };
    let old = if server_lacks_sync_interval(version) {
        format!(
            "; nats-server {version} has no `sync_interval` setting (added in 2.10) and cannot \
             fsync every write"
        )
    } else {
        String::new()
    };
    format!(
        "JetStream durability: {stored}{old}. The gateway cannot check the server's setting: \
         neither the server's INFO nor the JetStream account info carries it, only the \
         monitoring endpoint (/varz) and the system account do (Jepsen's NATS 2.12.1 analysis, \
         nats-server issue 7564)"
    )
}

/// Whether a server version predates `sync_interval` (nats-server 2.10).
fn server_lacks_sync_interval(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (2, 10),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> stream::Config {
        NatsConfig::new("nats://127.0.0.1:4222").stream_config()
    }

    #[test]
    fn credentials_in_server_urls_are_redacted() {
        assert_eq!(
            redact("nats://u:p@h:4222,nats://h2:4222"),
            "nats://***@h:4222,nats://h2:4222"
        );
    }

    #[test]
    fn a_server_list_takes_commas_with_spaces_and_names_a_bad_entry() {
        let servers = parse_servers("nats://a:4222, nats://b:4222 ,tls://c:4223").unwrap();
        let hosts: Vec<(String, u16)> = servers
            .iter()
            .map(|s| (s.host().to_owned(), s.port()))
            .collect();
        assert_eq!(
            hosts,
            [("a".into(), 4222), ("b".into(), 4222), ("c".into(), 4223)]
        );
        let error = parse_servers("nats://a:4222, nats://u:p@b:42x2").unwrap_err();
        assert_eq!(
            error,
            "NATS server `nats://***@b:42x2` is invalid: invalid port number"
        );
        let error = parse_servers("nats://a:4222,b:4222").unwrap_err();
        assert!(
            error.contains("`b:4222`: expected nats://HOST:PORT"),
            "{error}"
        );
        let error = parse_servers("nats://a:4222,").unwrap_err();
        assert!(error.contains("empty entry"), "{error}");
    }

    #[test]
    fn the_created_stream_passes_its_own_compatibility_check() {
        let config = wanted();
        assert!(incompatibilities(&config, &config).is_empty());
    }

    #[test]
    fn a_work_queue_stream_with_per_subject_limits_is_refused() {
        let existing = stream::Config {
            retention: stream::RetentionPolicy::WorkQueue,
            max_messages_per_subject: 5,
            ..wanted()
        };
        let problems = incompatibilities(&existing, &wanted());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].starts_with("retention is workqueue, must be limits"));
        assert!(problems[1].starts_with("max_msgs_per_subject is 5, must be unlimited"));
    }

    #[test]
    fn subjects_are_bounded_whatever_the_ids() {
        let prefix = "p";
        let mut seen = std::collections::HashSet::new();
        for id in (1..100_000).chain([i64::MAX, i64::MAX - 1, BUCKETS, 2 * BUCKETS + 7]) {
            let subject = event_subject(prefix, id);
            assert!(subject.starts_with("p.e."), "{subject}");
            seen.insert(subject);
        }
        assert_eq!(seen.len(), BUCKETS as usize);
        assert_eq!(event_subject(prefix, 2 * BUCKETS + 7), "p.e.7");
        assert_eq!(event_subject(prefix, -3), format!("p.e.{}", BUCKETS - 3));
        assert_eq!(transitive_subject(prefix), "p.t.0");
    }

    #[test]
    fn a_stream_of_the_old_layout_is_recognised() {
        let old = stream::Config {
            subjects: vec!["iqchannels.events.*".into()],
            max_messages_per_subject: 1,
            discard_new_per_subject: true,
            ..wanted()
        };
        assert!(is_old_layout(&old, "iqchannels.events"));
        assert!(!is_old_layout(&wanted(), "iqchannels.events"));
        assert!(!is_old_layout(&old, "other"));
        let advice = old_layout_advice("S");
        assert!(advice.contains("migrate-stream --to S_2"), "{advice}");
    }

    #[test]
    fn every_difference_is_named() {
        let existing = stream::Config {
            subjects: vec!["other.>".into()],
            storage: stream::StorageType::Memory,
            max_messages: 1000,
            max_bytes: 1 << 20,
            max_message_size: 4096,
            discard: stream::DiscardPolicy::Old,
            allow_direct: false,
            no_ack: true,
            sealed: true,
            persist_mode: Some(stream::PersistenceMode::Async),
            num_replicas: 3,
            max_age: Duration::from_secs(3600),
            duplicate_window: Duration::from_secs(60),
            ..wanted()
        };
        let problems = incompatibilities(&existing, &wanted()).join("\n");
        for named in [
            "subjects is [\"other.>\"]",
            "storage is memory, must be file",
            "max_msgs is 1000",
            "max_bytes is 1048576",
            "max_msg_size is 4096",
            "allow_direct is false",
            "no_ack is set",
            "sealed is set",
            "persist_mode is async",
            "replicas is 3, must be 1 as configured",
            "max_age is 1h, must be 0 (keep everything) as configured",
            "duplicate_window is 1m, must be 1h as configured",
        ] {
            assert!(problems.contains(named), "{named:?} not in:\n{problems}");
        }
    }

    #[test]
    fn the_duplicate_window_is_at_most_the_max_age() {
        let config = NatsConfig {
            max_age: Duration::from_secs(600),
            ..NatsConfig::new("nats://127.0.0.1:4222")
        };
        assert_eq!(
            config.stream_config().duplicate_window,
            Duration::from_secs(600)
        );
    }

    #[test]
    fn the_durability_warning_says_what_one_replica_needs() {
        let one = durability_warning(1, "2.11.0");
        assert!(one.contains("sync_interval: always"), "{one}");
        assert!(one.contains("cannot check"), "{one}");
        assert!(!one.contains("added in 2.10"), "{one}");
        let old = durability_warning(3, "2.9.10");
        assert!(old.contains("majority of the stream's 3"), "{old}");
        assert!(
            old.contains("nats-server 2.9.10 has no `sync_interval`"),
            "{old}"
        );
    }
}
