//! Whom the client trusts: a pinned certificate fingerprint, or a CA file.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::Digest;

use crate::RemoteOptions;

/// Parses `SHA256:hex`, `hex`, or `aa:bb:...` into 32 bytes.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    let s = s
        .strip_prefix("SHA256:")
        .or_else(|| s.strip_prefix("sha256:"))
        .unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[derive(Debug)]
struct Pinned {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got: [u8; 32] = sha2::Sha256::digest(end_entity.as_ref()).into();
        if got == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            let hex: String = got.iter().map(|b| format!("{b:02x}")).collect();
            Err(rustls::Error::General(format!(
                "the server's certificate has fingerprint SHA256:{hex}, not the pinned one: \
                 if the server's certificate was replaced, pin the new fingerprint \
                 (`imgstore server --fingerprint` on the server prints it)"
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The rustls config of a plain-HTTP client (`imgstore://`): never used
/// for a handshake, since such a client connects in clear and follows no
/// redirect, but given so that reqwest needs no process-wide provider. It
/// trusts no certificate.
pub fn plain_config() -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth())
}

/// The rustls config for `opts`; an error says what to pass.
pub fn client_config(opts: &RemoteOptions) -> Result<rustls::ClientConfig, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?;
    let mut config = match (&opts.fingerprint, &opts.ca_file) {
        (Some(fp), _) => {
            let fingerprint = parse_fingerprint(fp).ok_or_else(|| {
                "the server fingerprint is not SHA256: followed by 64 hex digits".to_string()
            })?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(Pinned {
                    fingerprint,
                    provider,
                }))
                .with_no_client_auth()
        }
        (None, Some(ca)) => {
            let pem = std::fs::read(ca)
                .map_err(|e| format!("cannot read CA file {}: {e}", ca.display()))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut &pem[..]) {
                let cert = cert.map_err(|e| format!("CA file {}: {e}", ca.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("CA file {}: {e}", ca.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("CA file {} holds no PEM certificate", ca.display()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => {
            return Err(
                "no way to trust the server: pass --server-fingerprint (or set \
                 IMGSTORE_SERVER_FINGERPRINT) or --server-ca FILE"
                    .into(),
            )
        }
    };
    // HTTP/2 only (the client is built with prior knowledge): requests
    // made before the connection is up then wait for that one connection
    // instead of each opening its own.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_the_usual_spellings() {
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_fingerprint(&format!("SHA256:{hex}")),
            Some([0xab; 32])
        );
        assert_eq!(parse_fingerprint(&hex), Some([0xab; 32]));
        let colons: Vec<&str> = std::iter::repeat_n("AB", 32).collect();
        assert_eq!(parse_fingerprint(&colons.join(":")), Some([0xab; 32]));
        assert_eq!(parse_fingerprint("SHA256:abcd"), None);
        assert_eq!(parse_fingerprint(&"zz".repeat(32)), None);
    }
}
