//! Who may do what: the ingest credentials (a shared token and/or Standard Webhooks signatures)
//! and the gRPC bearer tokens with scopes. Tokens are kept as SHA-256 digests and compared in
//! constant time whatever their length; failures say nothing about which part was wrong.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a request is refused. Deliberately vague towards the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Missing or wrong credentials.
    #[error("missing or invalid credentials")]
    Unauthenticated,
    /// Valid credentials without the needed scope.
    #[error("the credentials do not allow this")]
    Forbidden,
}

/// A configuration value that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A webhook secret that is not `whsec_<base64>` (or plain base64).
    #[error("webhook secret is not `whsec_` followed by base64")]
    BadSecret,
    /// A gRPC token spec that is not `SCOPES:TOKEN`.
    #[error("gRPC token must be `SCOPES:TOKEN` with scopes from subscribe,publish (e.g. `subscribe:abc`)")]
    BadToken,
}

/// A secret token, kept as its SHA-256 digest. A presented token is hashed and the two digests
/// compared in constant time: how long that takes does not depend on where they differ, nor on
/// the secret's length (comparing the tokens themselves stops at once when the lengths differ).
#[derive(Clone)]
struct TokenDigest([u8; 32]);

impl TokenDigest {
    fn of(token: &[u8]) -> Self {
        Self(Sha256::digest(token).into())
    }

    fn matches(&self, presented: &str) -> bool {
        bool::from(Self::of(presented.as_bytes()).0.ct_eq(&self.0))
    }
}

/// What the headers and query string of an ingest request establish before its body is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadCheck {
    /// The sender is authenticated (the shared token), or no credential is required. A
    /// signature, when configured, is still checked on the body ([`IngestAuth::check_body`]).
    Authenticated,
    /// Only a signature can authenticate the sender, and it is computed over the body: the
    /// headers are in order (present, timestamp within tolerance), nothing more is known yet.
    AwaitingSignature,
}

/// How webhook senders prove who they are. Every configured mechanism must pass.
#[derive(Clone, Default)]
pub struct IngestAuth {
    /// Shared token, accepted as `Authorization: Bearer` or `?token=`.
    token: Option<TokenDigest>,
    /// Standard Webhooks keys (several during a rotation); empty = signatures not required.
    keys: Vec<Vec<u8>>,
    /// How far `webhook-timestamp` may be from now.
    tolerance: Duration,
}

impl std::fmt::Debug for IngestAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print secrets.
        f.debug_struct("IngestAuth")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("keys", &self.keys.len())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

type HmacSha256 = Hmac<Sha256>;

impl IngestAuth {
    /// From a token and `whsec_` secrets; `tolerance` for webhook timestamps.
    pub fn new(
        token: Option<String>,
        secrets: &[String],
        tolerance: Duration,
    ) -> Result<Self, ConfigError> {
        let keys = secrets
            .iter()
            .map(|secret| {
                BASE64
                    .decode(secret.trim().trim_start_matches("whsec_"))
                    .map_err(|_| ConfigError::BadSecret)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            token: token
                .filter(|t| !t.is_empty())
                .map(|t| TokenDigest::of(t.as_bytes())),
            keys,
            tolerance,
        })
    }

    /// Whether any credential is required.
    pub fn enabled(&self) -> bool {
        self.token.is_some() || !self.keys.is_empty()
    }

    /// Checks one request: `query` is the raw query string, `body` the raw body (signatures are
    /// verified on the bytes as received, before any parsing).
    pub fn check(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
        body: &[u8],
    ) -> Result<(), AuthError> {
        self.check_head(headers, query)?;
        self.check_body(headers, body)
    }

    /// Checks what can be checked before the body is read: the shared token (`Authorization:
    /// Bearer` or the `token` query parameter, see [`query_token`]) and the form of the
    /// signature headers. A request refused here need not be read at all.
    pub fn check_head(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<HeadCheck, AuthError> {
        if let Some(token) = &self.token {
            let ok = match bearer(headers) {
                Some(presented) => token.matches(presented),
                None => query
                    .and_then(query_token)
                    .is_some_and(|presented| token.matches(&presented)),
            };
            if !ok {
                return Err(AuthError::Unauthenticated);
            }
        }
        if self.keys.is_empty() {
            return Ok(HeadCheck::Authenticated);
        }
        let signature = SignatureHeaders::read(headers, self.tolerance, now_secs())?;
        if signature.presented.is_empty() {
            return Err(AuthError::Unauthenticated);
        }
        Ok(if self.token.is_some() {
            HeadCheck::Authenticated
        } else {
            HeadCheck::AwaitingSignature
        })
    }

    /// Checks the signature over the raw body, when signatures are configured.
    pub fn check_body(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), AuthError> {
        if self.keys.is_empty() {
            return Ok(());
        }
        self.check_signature(headers, body, now_secs())
    }

    fn check_signature(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), AuthError> {
        let SignatureHeaders {
            id,
            timestamp,
            presented,
        } = SignatureHeaders::read(headers, self.tolerance, now)?;
        for key in &self.keys {
            let Ok(mut mac) = HmacSha256::new_from_slice(key) else {
                continue;
            };
            mac.update(id.as_bytes());
            mac.update(b".");
            mac.update(timestamp.as_bytes());
            mac.update(b".");
            mac.update(body);
            let expected = mac.finalize().into_bytes();
            if presented
                .iter()
                .any(|p| bool::from(p.as_slice().ct_eq(expected.as_slice())))
            {
                return Ok(());
            }
        }
        Err(AuthError::Unauthenticated)
    }
}

/// The Standard Webhooks headers of a request, checked for presence and timestamp tolerance.
struct SignatureHeaders<'a> {
    id: &'a str,
    timestamp: &'a str,
    /// The decoded `v1` signatures (others are ignored).
    presented: Vec<Vec<u8>>,
}

impl<'a> SignatureHeaders<'a> {
    fn read(headers: &'a HeaderMap, tolerance: Duration, now: i64) -> Result<Self, AuthError> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or(AuthError::Unauthenticated)
        };
        let id = header("webhook-id")?;
        let timestamp = header("webhook-timestamp")?;
        let signatures = header("webhook-signature")?;
        let sent: i64 = timestamp.parse().map_err(|_| AuthError::Unauthenticated)?;
        if sent.abs_diff(now) > tolerance.as_secs() {
            return Err(AuthError::Unauthenticated);
        }
        let presented = signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|s| BASE64.decode(s).ok())
            .collect();
        Ok(Self {
            id,
            timestamp,
            presented,
        })
    }
}

/// What a gRPC token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Subscribe and look events up.
    Subscribe,
    /// Publish events.
    Publish,
}

/// gRPC bearer tokens and their scopes; empty = no authentication.
#[derive(Clone, Default)]
pub struct GrpcAuth {
    tokens: Vec<(TokenDigest, Vec<Scope>)>,
}

impl std::fmt::Debug for GrpcAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcAuth")
            .field("tokens", &self.tokens.len())
            .finish()
    }
}

impl GrpcAuth {
    /// From specs `SCOPES:TOKEN`, e.g. `subscribe,publish:s3cret`.
    pub fn new(specs: &[String]) -> Result<Self, ConfigError> {
        let tokens = specs
            .iter()
            .map(|spec| {
                let (scopes, token) = spec.split_once(':').ok_or(ConfigError::BadToken)?;
                let scopes = scopes
                    .split(',')
                    .map(|scope| match scope.trim() {
                        "subscribe" => Ok(Scope::Subscribe),
                        "publish" => Ok(Scope::Publish),
                        _ => Err(ConfigError::BadToken),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                if token.is_empty() {
                    return Err(ConfigError::BadToken);
                }
                Ok((TokenDigest::of(token.as_bytes()), scopes))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { tokens })
    }

    /// Whether tokens are required.
    pub fn enabled(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Checks the `authorization` metadata (as HTTP/2 headers) for `scope`.
    pub fn check(&self, headers: &HeaderMap, scope: Scope) -> Result<(), AuthError> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let presented = bearer(headers).ok_or(AuthError::Unauthenticated)?;
        // Compare against every token so timing does not tell which one matched.
        let mut found: Option<&Vec<Scope>> = None;
        for (token, scopes) in &self.tokens {
            if token.matches(presented) {
                found = Some(scopes);
            }
        }
        match found {
            None => Err(AuthError::Unauthenticated),
            Some(scopes) if scopes.contains(&scope) => Ok(()),
            Some(_) => Err(AuthError::Forbidden),
        }
    }
}

/// The token a scraper must present for `/metrics` (`Authorization: Bearer`); none = open.
#[derive(Clone, Default)]
pub struct MetricsAuth {
    token: Option<TokenDigest>,
}

impl std::fmt::Debug for MetricsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsAuth")
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl MetricsAuth {
    /// From `--metrics-token`; unset or empty leaves `/metrics` open.
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: token
                .filter(|t| !t.is_empty())
                .map(|t| TokenDigest::of(t.as_bytes())),
        }
    }

    /// Checks the bearer token of a `/metrics` request.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), AuthError> {
        match &self.token {
            None => Ok(()),
            Some(token) => match bearer(headers) {
                Some(presented) if token.matches(presented) => Ok(()),
                _ => Err(AuthError::Unauthenticated),
            },
        }
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The `token` parameter of a query string, decoded as every form-encoded query is (`%2B` is
/// `+`, a bare `+` is a space): the one reading of a token from a URL, for ingest and the read
/// side (`/v1/events:stream`, `/v1/stats`) alike.
pub fn query_token(query: &str) -> Option<Cow<'_, str>> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(key, _)| key == "token")
        .map(|(_, value)| value)
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
