//! TLS on the embedded broker's listener (`[mqtt.listen_tls]`): one rustls
//! acceptor (ring), built once at start from the certificate, key and the
//! whole client CA file, and handed to the vendored rumqttd as an
//! [`rumqttd::Acceptor`], so every handshake runs in its own task with a
//! deadline (vendor/rumqttd/OPENCLAW-PATCH.md, fourth change).

use crate::server::config::ListenTlsSection;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the listener's TLS could not be set up (each names the config key).
#[derive(Debug, thiserror::Error)]
pub enum BrokerTlsError {
    #[error("mqtt.listen_tls.{key}: cannot read {path}: {source}")]
    Read {
        key: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("mqtt.listen_tls.{key}: {path} holds no {what} in PEM form")]
    Empty {
        key: &'static str,
        path: String,
        what: &'static str,
    },
    #[error("mqtt.listen_tls.{key}: {path}: {message}")]
    Invalid {
        key: &'static str,
        path: String,
        message: String,
    },
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, BrokerTlsError> {
    std::fs::read(path).map_err(|source| BrokerTlsError::Read {
        key,
        path: path.display().to_string(),
        source,
    })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, BrokerTlsError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BrokerTlsError::Invalid {
            key,
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(BrokerTlsError::Empty {
            key,
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// The rustls server config of `[mqtt.listen_tls]`: its certificate chain
/// and key; with `client_ca_file`, a client must show a certificate that
/// chains to one of the file's certificates (all of them are trusted).
pub fn server_config(tls: &ListenTlsSection) -> Result<rustls::ServerConfig, BrokerTlsError> {
    let invalid =
        |key: &'static str, path: &Path, e: &dyn std::fmt::Display| BrokerTlsError::Invalid {
            key,
            path: path.display().to_string(),
            message: e.to_string(),
        };
    let chain = certs("cert_file", &tls.cert_file)?;
    let pem = read("key_file", &tls.key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => BrokerTlsError::Empty {
            key: "key_file",
            path: tls.key_file.display().to_string(),
            what: "private key",
        },
        e => invalid("key_file", &tls.key_file, &e),
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("cert_file", &tls.cert_file, &e))?;
    let builder = match &tls.client_ca_file {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs("client_ca_file", ca)? {
                roots
                    .add(c)
                    .map_err(|e| invalid("client_ca_file", ca, &e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| invalid("client_ca_file", ca, &e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    builder.with_single_cert(chain, key).map_err(|e| match e {
        // A certificate rustls cannot read is the cert file's fault; a key
        // that is not the certificate's (or unreadable) the key file's.
        rustls::Error::InvalidCertificate(_) => invalid("cert_file", &tls.cert_file, &e),
        e => invalid("key_file", &tls.key_file, &e),
    })
}

/// The acceptor the broker's listener runs on each connection.
pub fn acceptor(tls: &ListenTlsSection) -> Result<rumqttd::Acceptor, BrokerTlsError> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(tls)?));
    Ok(rumqttd::Acceptor {
        handshake: Arc::new(move |stream| {
            let acceptor = acceptor.clone();
            Box::pin(async move {
                let s = acceptor.accept(stream).await?;
                Ok(Box::new(s) as Box<dyn rumqttd::N>)
            })
        }),
        timeout: Duration::from_millis(tls.handshake_timeout_ms),
        max_pending: tls.max_handshakes,
    })
}
