//! Who may do what: the ingest credentials (a shared token and/or Standard Webhooks signatures)
//! and the gRPC bearer tokens with scopes. Comparisons are constant-time; failures say nothing
//! about which part was wrong.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::Sha256;
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

/// How webhook senders prove who they are. Every configured mechanism must pass.
#[derive(Clone, Default)]
pub struct IngestAuth {
    /// Shared token, accepted as `Authorization: Bearer` or `?token=`.
    token: Option<Vec<u8>>,
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
            token: token.filter(|t| !t.is_empty()).map(String::into_bytes),
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
        if let Some(token) = &self.token {
            let presented = bearer(headers).or_else(|| query.and_then(query_token));
            let ok =
                presented.is_some_and(|presented| bool::from(presented.as_bytes().ct_eq(token)));
            if !ok {
                return Err(AuthError::Unauthenticated);
            }
        }
        if !self.keys.is_empty() {
            self.check_signature(headers, body, now_secs())?;
        }
        Ok(())
    }

    fn check_signature(&self, headers: &HeaderMap, body: &[u8], now: i64) -> Result<(), AuthError> {
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
        if sent.abs_diff(now) > self.tolerance.as_secs() {
            return Err(AuthError::Unauthenticated);
        }
        let presented: Vec<Vec<u8>> = signatures
            .split(' ')
            .filter_map(|s| s.strip_prefix("v1,"))
            .filter_map(|s| BASE64.decode(s).ok())
            .collect();
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
    tokens: Vec<(Vec<u8>, Vec<Scope>)>,
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
                Ok((token.as_bytes().to_vec(), scopes))
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
            if bool::from(presented.as_bytes().ct_eq(token)) {
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

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

fn query_token(query: &str) -> Option<&str> {
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("token="))
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
