//! The server's certificate: the operator's, or one generated at first
//! start and kept (so its fingerprint, which clients pin, stays the same).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::Digest;

use crate::ServerError;

/// The SHA-256 fingerprint clients pin: `SHA256:` + 64 hex digits of the
/// DER of the server's end-entity certificate.
pub fn fingerprint(cert: &[u8]) -> String {
    format!("SHA256:{}", crate::access::hex(&sha2::Sha256::digest(cert)))
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> ServerError + 'a {
    move |source| ServerError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// Loads `cert`/`key`, or creates a self-signed pair under `dir` once.
/// Returns the rustls config (HTTP/2 and HTTP/1.1 by ALPN) and the
/// certificate's fingerprint.
pub fn load_or_create(
    dir: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<(Arc<rustls::ServerConfig>, String), ServerError> {
    let (cert_path, key_path): (PathBuf, PathBuf) = match (cert, key) {
        (Some(c), Some(k)) => (c.to_path_buf(), k.to_path_buf()),
        (None, None) => {
            let c = dir.join("cert.pem");
            let k = dir.join("key.pem");
            if !c.exists() {
                generate(dir, &c, &k)?;
            }
            (c, k)
        }
        _ => {
            return Err(ServerError::Invalid(
                "tls_cert and tls_key go together: give both or neither".into(),
            ))
        }
    };
    let cert_pem = std::fs::read(&cert_path).map_err(io(&cert_path, "read the certificate"))?;
    let key_pem = std::fs::read(&key_path).map_err(io(&key_path, "read the private key"))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &cert_pem[..])
        .collect::<Result<_, _>>()
        .map_err(io(&cert_path, "parse the certificate"))?;
    let first = certs.first().ok_or_else(|| ServerError::Config {
        path: cert_path.clone(),
        why: "no PEM certificate in it".into(),
    })?;
    let fp = fingerprint(first);
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(io(&key_path, "parse the private key"))?
        .ok_or_else(|| ServerError::Config {
            path: key_path.clone(),
            why: "no PEM private key in it".into(),
        })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Invalid(format!("TLS setup: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServerError::Config {
            path: key_path.clone(),
            why: format!("the key does not fit the certificate: {e}"),
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((Arc::new(config), fp))
}

fn generate(dir: &Path, cert: &Path, key: &Path) -> Result<(), ServerError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::create_dir_all(dir).map_err(io(dir, "create"))?;
    let host = rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned();
    let names = vec![host, "localhost".into(), "127.0.0.1".into(), "::1".into()];
    let ck = rcgen::generate_simple_self_signed(names)
        .map_err(|e| ServerError::Invalid(format!("cannot generate a certificate: {e}")))?;
    let mut k = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(key)
        .map_err(io(key, "create"))?;
    k.write_all(ck.key_pair.serialize_pem().as_bytes())
        .and_then(|_| k.sync_all())
        .map_err(io(key, "write"))?;
    std::fs::write(cert, ck.cert.pem()).map_err(io(cert, "write"))?;
    Ok(())
}
