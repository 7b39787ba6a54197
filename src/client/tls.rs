//! How the client commands check the gateway's certificate when `--ca-cert` is given: the usual
//! WebPKI checks with the file's certificates as roots; and, as curl and grpcurl do, a server
//! certificate that is byte for byte one of them is trusted as it is, though WebPKI refuses it
//! (a self-signed certificate such as `openssl req -x509` makes is marked CA:TRUE, which WebPKI
//! refuses as a server's: `CaUsedAsEndEntity`). Even then it must name the server, be within its
//! dates and, if it lists purposes, be meant for servers; the handshake still proves that the
//! server holds its key.

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::client::danger::{
    HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier,
};
use tokio_rustls::rustls::client::{verify_server_name, WebPkiServerVerifier};
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::server::ParsedCertificate;
use tokio_rustls::rustls::{
    CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme,
};

/// The verifier for the certificates of a `--ca-cert` PEM file; `Err` says why the file is
/// unusable.
pub(super) fn verifier(pem: &[u8]) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let certificates = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("not a PEM certificate file: {error}"))?;
    let mut roots = RootCertStore::empty();
    let (added, _unparsable) = roots.add_parsable_certificates(certificates.iter().cloned());
    if added == 0 {
        return Err("holds no usable PEM certificate".into());
    }
    let webpki = WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(ring::default_provider()),
    )
    .build()
    .map_err(|error| error.to_string())?;
    Ok(Arc::new(PinnedOrWebPki {
        pinned: certificates,
        webpki,
    }))
}

/// WebPKI, or a certificate given in `--ca-cert` presented as the server's own.
struct PinnedOrWebPki {
    /// Every certificate of the `--ca-cert` file, as DER.
    pinned: Vec<CertificateDer<'static>>,
    /// The usual checks, with the same certificates as roots.
    webpki: Arc<WebPkiServerVerifier>,
}

impl fmt::Debug for PinnedOrWebPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PinnedOrWebPki")
            .field("pinned", &self.pinned.len())
            .finish_non_exhaustive()
    }
}

impl ServerCertVerifier for PinnedOrWebPki {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let refused = match self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Ok(verified) => return Ok(verified),
            Err(error) => error,
        };
        if !self
            .pinned
            .iter()
            .any(|pinned| pinned.as_ref() == end_entity.as_ref())
        {
            return Err(refused);
        }
        // The very certificate the user named: its issuer does not matter, the rest does.
        verify_server_name(&ParsedCertificate::try_from(end_entity)?, server_name)?;
        dates_and_purpose(end_entity, now)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// `now` is within the certificate's validity, and its extended key usage, when it has one,
/// allows a TLS server.
fn dates_and_purpose(der: &CertificateDer<'_>, now: UnixTime) -> Result<(), Error> {
    let (_, certificate) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|_| CertificateError::BadEncoding)?;
    let now = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let validity = certificate.validity();
    if now < validity.not_before.timestamp() {
        return Err(CertificateError::NotValidYet.into());
    }
    if now > validity.not_after.timestamp() {
        return Err(CertificateError::Expired.into());
    }
    match certificate.extended_key_usage() {
        Ok(None) => Ok(()),
        Ok(Some(usage)) if usage.value.any || usage.value.server_auth => Ok(()),
        Ok(Some(_)) => Err(CertificateError::InvalidPurpose.into()),
        Err(_) => Err(CertificateError::BadEncoding.into()),
    }
}
