//! TLS for the shared port (rustls, ring): HTTP/1.1 and gRPC over h2, chosen by ALPN. The
//! certificate and key are read from PEM files and reloaded on SIGHUP or when the files change,
//! without dropping connections. The key must match the certificate, at start and on reload; a
//! reload that fails (a file unreadable, or a pair that does not match, as while one of the two
//! files is being replaced) keeps the previous pair and logs why.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// rustls refused the configuration or key.
    #[error("TLS: {0}")]
    Rustls(#[from] tokio_rustls::rustls::Error),
}

/// Where the certificate chain and private key live.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// How often to look for changed files.
    pub poll: Duration,
}

/// Serves the current certificate; swapped on reload.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

impl ReloadingCert {
    /// Reads the files again; on error the previous certificate stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let key = load(&self.files)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        Ok(())
    }
}

fn pem_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

fn load(files: &TlsFiles) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| pem_error(&files.cert, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_error(&files.cert, e))?;
    if chain.is_empty() {
        return Err(pem_error(&files.cert, "no certificate found"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|e| pem_error(&files.key, e))?;
    // Checks that the key is the certificate's (its public key is the leaf's); without this a
    // mismatched pair is served, and every handshake fails.
    CertifiedKey::from_der(chain, key, &ring::default_provider()).map_err(|error| match error {
        tokio_rustls::rustls::Error::InconsistentKeys(_) => pem_error(
            &files.key,
            format!(
                "the private key does not match the certificate in {}",
                files.cert.display()
            ),
        ),
        other => other.into(),
    })
}

/// A TLS acceptor offering h2 and http/1.1, and the reloadable certificate behind it.
pub fn acceptor(files: TlsFiles) -> Result<(TlsAcceptor, Arc<ReloadingCert>), TlsError> {
    let first = load(&files)?;
    let cert = Arc::new(ReloadingCert {
        files,
        current: RwLock::new(Arc::new(first)),
    });
    let mut config = ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((TlsAcceptor::from(Arc::new(config)), cert))
}

/// Reloads `cert` on SIGHUP and whenever the files' modification times change, until
/// `shutdown` fires.
pub fn spawn_reloader(cert: Arc<ReloadingCert>, mut shutdown: watch::Receiver<bool>) {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut seen = modified(&cert.files);
        let mut poll = tokio::time::interval(cert.files.poll);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            let reason = tokio::select! {
                _ = hup => "SIGHUP",
                _ = poll.tick() => {
                    let now = modified(&cert.files);
                    if now == seen { continue }
                    seen = now;
                    "files changed"
                }
                _ = shutdown.changed() => return,
            };
            match cert.reload() {
                Ok(()) => tracing::info!(reason, "TLS certificate reloaded"),
                Err(error) => {
                    tracing::error!(reason, %error, "TLS certificate reload failed; keeping the previous one")
                }
            }
        }
    });
}

fn modified(files: &TlsFiles) -> (Option<SystemTime>, Option<SystemTime>) {
    let time = |path: &Path| std::fs::metadata(path).and_then(|m| m.modified()).ok();
    (time(&files.cert), time(&files.key))
}
