//! Who may do what: the config file, the token file, roles and namespaces.
//!
//! Tokens are 256 random bits shown once (`imgstore token add`); the server
//! keeps only their BLAKE3 hash, so the token file is no secret worth
//! stealing. A token has a role and a list of namespaces; a namespace is a
//! named set of image-name patterns in the config (`[namespaces]`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use imgstore_protocol::Role;
use serde::{Deserialize, Serialize};

use crate::ServerError;

/// The server's config file (TOML). Every field has a default, so an empty
/// file (or none) serves `REPO` on port 8420 with a generated certificate.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on (default `0.0.0.0:8420`).
    pub listen: Option<String>,
    /// PEM certificate chain and key; default: generated once into
    /// `REPO/server/tls/`.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// The token file (default `REPO/server/tokens.json`).
    pub tokens: Option<PathBuf>,
    /// Answer "which chunks are stored?" from the whole repository instead
    /// of the caller's namespaces: more upload deduplication across hosts,
    /// but any backup client can then test whether a chunk of data it can
    /// hash is stored by anyone. Only for single-tenant deployments.
    #[serde(default)]
    pub trust_clients: bool,
    /// Idle time after which a backup session is dropped (default "15m").
    pub session_idle_timeout: Option<String>,
    /// Requests carrying bulk bodies (region uploads, commits) processed at
    /// once; bounds the server's memory to about this × 80 MiB (default 8).
    pub max_uploads: Option<usize>,
    /// HTTP/2 receive window of a connection, in MiB (default 32): how
    /// much a client may send before the server has read it, so a
    /// connection uploads at most this much per round trip (32 MiB at
    /// 150 ms RTT: 1.7 Gbit/s). One stream may use an eighth of it, so
    /// uploads waiting at the gate for a slot (a client keeps at most
    /// twice its share in flight) cannot fill it and starve those being
    /// read. Data
    /// received and not yet read is held in memory: at most this much per
    /// connection.
    pub http2_window_mib: Option<usize>,
    /// Connections served at once (default 512).
    pub max_connections: Option<usize>,
    /// Connections from one IP address at once (default 128), so one host
    /// cannot take every connection slot.
    pub max_connections_per_ip: Option<usize>,
    /// A connection with no request in flight for this long is closed
    /// (default "60s"): idle or silent connections cannot hold the slots.
    pub idle_connection_timeout: Option<String>,
    /// Longest time a request body may take to arrive, and longest silence
    /// inside one (default "10m" and "30s").
    pub body_timeout: Option<String>,
    pub body_idle_timeout: Option<String>,
    /// Request bodies held in memory at once, all requests together, in
    /// MiB (default 1024). A request waits for its share before its body is
    /// read; past 30 s of waiting it is answered 503.
    pub max_body_memory_mib: Option<usize>,
    /// Read requests answering with bulk data (`chunks/get`, `pages`,
    /// `regions`) processed at once (default 4).
    pub max_reads: Option<usize>,
    /// Open backup sessions per token (default 16) and in all (default 1024).
    pub max_sessions_per_token: Option<usize>,
    pub max_sessions: Option<usize>,
    /// How far in the future of the server's clock a snapshot's time may
    /// be (default "10m"); a plain record past it is refused.
    pub max_clock_skew: Option<String>,
    /// Namespace name → image-name patterns (`*` any run, `?` one character).
    #[serde(default)]
    pub namespaces: BTreeMap<String, Vec<String>>,
}

impl ServerConfig {
    pub fn load(path: &Path) -> Result<ServerConfig, ServerError> {
        let text = std::fs::read_to_string(path).map_err(|source| ServerError::Io {
            path: path.to_path_buf(),
            op: "read the server config",
            source,
        })?;
        let c: ServerConfig = toml::from_str(&text).map_err(|e| ServerError::Config {
            path: path.to_path_buf(),
            why: e.message().to_string(),
        })?;
        for (name, pats) in &c.namespaces {
            imgstore_format::meta::ns_prefix(name).map_err(|e| ServerError::Config {
                path: path.to_path_buf(),
                why: format!("namespace {name:?}: {e}"),
            })?;
            if pats.is_empty() {
                return Err(ServerError::Config {
                    path: path.to_path_buf(),
                    why: format!("namespace {name:?} has no image patterns"),
                });
            }
        }
        Ok(c)
    }

    /// The namespace an image name belongs to: the first (by name) whose
    /// patterns match it.
    pub fn namespace_of(&self, image: &str) -> Option<&str> {
        self.namespaces
            .iter()
            .find(|(_, pats)| pats.iter().any(|p| glob(p.as_bytes(), image.as_bytes())))
            .map(|(n, _)| n.as_str())
    }
}

/// `*` matches any run of characters, `?` one; everything else itself.
pub fn glob(pat: &[u8], s: &[u8]) -> bool {
    let (mut p, mut i) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while i < s.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == s[i]) {
            p += 1;
            i += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = i;
            p += 1;
        } else if let Some(sp) = star {
            p = sp + 1;
            mark += 1;
            i = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|c| *c == b'*')
}

/// One token's entry in the token file.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    /// BLAKE3 of the token, hex.
    pub hash: String,
    pub role: Role,
    /// Namespaces it may use (ignored for admin tokens: all).
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// Creation time, seconds since the Unix epoch.
    pub created: i64,
}

/// The token file: `{"version": 1, "tokens": [...]}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFile {
    pub version: u32,
    pub tokens: Vec<TokenEntry>,
}

/// Prefix of every token (so a leaked one is recognisable to scanners).
pub const TOKEN_PREFIX: &str = "imgs_";

/// The hash the token file keeps of `token`.
pub fn token_hash(token: &str) -> String {
    blake3::hash(token.trim().as_bytes()).to_hex().to_string()
}

impl TokenFile {
    pub fn load(path: &Path) -> Result<TokenFile, ServerError> {
        match std::fs::read(path) {
            Ok(b) => {
                let f: TokenFile = serde_json::from_slice(&b).map_err(|e| ServerError::Config {
                    path: path.to_path_buf(),
                    why: e.to_string(),
                })?;
                if f.version != 1 {
                    return Err(ServerError::Config {
                        path: path.to_path_buf(),
                        why: format!("token file version {} is not 1", f.version),
                    });
                }
                Ok(f)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokenFile {
                version: 1,
                tokens: Vec::new(),
            }),
            Err(source) => Err(ServerError::Io {
                path: path.to_path_buf(),
                op: "read the token file",
                source,
            }),
        }
    }

    /// Writes the file atomically (temporary file, fsync, rename), mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), ServerError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |op: &'static str| {
            move |source| ServerError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io("create the directory of"))?;
        }
        let tmp = path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("write"))?;
        let text = serde_json::to_vec_pretty(self).expect("serialisable");
        f.write_all(&text).map_err(io("write"))?;
        f.sync_all().map_err(io("sync"))?;
        std::fs::rename(&tmp, path).map_err(io("replace"))?;
        Ok(())
    }

    /// Adds a token and returns its secret (shown once, never stored).
    pub fn add(
        &mut self,
        name: &str,
        role: Role,
        namespaces: Vec<String>,
    ) -> Result<String, ServerError> {
        if self.tokens.iter().any(|t| t.name == name) {
            return Err(ServerError::Invalid(format!(
                "a token named {name:?} exists: remove it first or choose another name"
            )));
        }
        let mut raw = [0u8; 32];
        getrandom::fill(&mut raw)
            .map_err(|e| ServerError::Invalid(format!("no system randomness: {e}")))?;
        let token = format!("{TOKEN_PREFIX}{}", hex(&raw));
        self.tokens.push(TokenEntry {
            name: name.to_string(),
            hash: token_hash(&token),
            role,
            namespaces,
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        });
        Ok(token)
    }

    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.tokens.len();
        self.tokens.retain(|t| t.name != name);
        self.tokens.len() != before
    }
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// An authenticated caller.
#[derive(Clone, Debug)]
pub struct Caller {
    pub token: String,
    pub role: Role,
    pub namespaces: Vec<String>,
}

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.role == Role::Admin
    }

    /// May this caller see snapshots of `image`?
    pub fn sees(&self, config: &ServerConfig, image: &str) -> bool {
        self.is_admin()
            || config
                .namespace_of(image)
                .is_some_and(|ns| self.namespaces.iter().any(|n| n == ns))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"web01-*", b"web01-disk0"));
        assert!(glob(b"web01-*", b"web01-"));
        assert!(!glob(b"web01-*", b"web02-disk0"));
        assert!(glob(b"*", b""));
        assert!(glob(b"a?c", b"abc"));
        assert!(!glob(b"a?c", b"ac"));
        assert!(glob(b"*-db-*", b"x-db-y"));
        assert!(!glob(b"exact", b"exact2"));
    }

    #[test]
    fn tokens_are_stored_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let mut f = TokenFile::load(&path).unwrap();
        let t = f.add("h1", Role::Backup, vec!["web".into()]).unwrap();
        assert!(t.starts_with(TOKEN_PREFIX) && t.len() == 5 + 64);
        assert!(
            f.add("h1", Role::Admin, vec![]).is_err(),
            "names are unique"
        );
        f.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&t[5..]), "the secret is not in the file");
        assert!(text.contains(&token_hash(&t)));
        let back = TokenFile::load(&path).unwrap();
        assert_eq!(back.tokens[0].role, Role::Backup);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn namespaces_resolve_by_pattern() {
        let c: ServerConfig =
            toml::from_str("[namespaces]\nweb = [\"web-*\"]\ndb = [\"db-*\", \"pg?\"]\n").unwrap();
        assert_eq!(c.namespace_of("web-1"), Some("web"));
        assert_eq!(c.namespace_of("pg1"), Some("db"));
        assert_eq!(c.namespace_of("mail"), None);
        assert!(toml::from_str::<ServerConfig>("bogus = 1").is_err());
    }
}
