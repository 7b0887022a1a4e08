//! What this client has seen of each server repository, as ssh's
//! `known_hosts` remembers host keys: the first answer from a URL is
//! recorded (trust on first use), and a later answer that contradicts it —
//! another repository id, or plain where it was encrypted — is refused
//! until the user accepts the change.
//!
//! The record is one JSON file (`known-repos.json`, mode 0600) mapping the
//! canonical URL (`imgstores://host:port/`) to the repository's id (from
//! its config) and whether it is encrypted. It is rewritten atomically
//! (a temporary file renamed over it) under an advisory lock, so clients
//! recording at the same time lose nothing. Which directory holds it is
//! the caller's choice.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use imgstore_format::RepoConfig;
use serde::{Deserialize, Serialize};

/// Name of the record inside the state directory.
pub const FILE_NAME: &str = "known-repos.json";
const LOCK_NAME: &str = "known-repos.lock";
const SCHEMA: u32 = 1;

/// What was recorded of one repository.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The repository id (`id` in its config).
    pub id: String,
    /// Whether its config has key slots.
    pub encrypted: bool,
    /// When it was recorded, seconds since the Unix epoch.
    pub recorded: i64,
}

impl Seen {
    /// What `config` says of its repository, recorded at `now`.
    pub fn of(config: &RepoConfig, now: i64) -> Seen {
        Seen {
            id: config.id.clone(),
            encrypted: config.encryption.is_some(),
            recorded: now,
        }
    }

    fn same_repository(&self, other: &Seen) -> bool {
        self.id == other.id && self.encrypted == other.encrypted
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Body {
    schema_version: u32,
    #[serde(default)]
    repositories: BTreeMap<String, Seen>,
}

/// What the record says of a server's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// The answer matches what was recorded.
    Recorded,
    /// Nothing is recorded for the URL yet: record it once the repository
    /// has been opened.
    FirstContact,
    /// The answer contradicts the record, and the caller accepted the
    /// change: record the new repository in its place.
    Replaced(Seen),
}

/// Why a server's repository is refused, or the record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// A key or passphrase is given, and the repository says it is plain:
    /// whatever the client sent it would be plaintext.
    #[error(
        "{url} answers as a plain (unencrypted) repository, but {secret} is given for it: \
         refusing to send it anything in clear (a server must not downgrade a client to \
         plaintext); if the repository is meant to be plain, run without the key or passphrase"
    )]
    PlainWithSecret { url: String, secret: String },
    /// The record says encrypted, the server says plain.
    #[error(
        "{url} now answers as plain (unencrypted) repository {now}, but this client recorded \
         encrypted repository {recorded} there: refusing to read or send anything (a server \
         downgrading to plaintext); if the repository was replaced on purpose, run once with \
         --trust-new-repository, or remove its entry from {file}"
    )]
    Downgraded {
        url: String,
        recorded: String,
        now: String,
        file: PathBuf,
    },
    /// The server answers for another repository than the one recorded.
    #[error(
        "{url} now answers as {} repository {now}, but this client recorded {} repository \
         {recorded} there: refusing to read or send anything; if the repository was replaced \
         on purpose, run once with --trust-new-repository, or remove its entry from {file}",
        kind(*.now_encrypted),
        kind(*.recorded_encrypted)
    )]
    Changed {
        url: String,
        recorded: String,
        recorded_encrypted: bool,
        now: String,
        now_encrypted: bool,
        file: PathBuf,
    },
    /// The record cannot be read or written.
    #[error("cannot {op} the known-repositories record {}: {detail}: {hint}", path.display())]
    Record {
        op: &'static str,
        path: PathBuf,
        detail: String,
        hint: &'static str,
    },
}

fn kind(encrypted: bool) -> &'static str {
    if encrypted {
        "encrypted"
    } else {
        "plain"
    }
}

/// The record in one state directory.
#[derive(Clone, Debug)]
pub struct KnownRepos {
    dir: PathBuf,
}

impl KnownRepos {
    /// The record kept in `dir` (created when first written).
    pub fn in_dir(dir: impl Into<PathBuf>) -> KnownRepos {
        KnownRepos { dir: dir.into() }
    }

    /// The record's file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE_NAME)
    }

    fn read_error(&self, detail: String) -> TrustError {
        TrustError::Record {
            op: "read",
            path: self.path(),
            detail,
            hint: "fix or remove it (the repositories it names are then trusted anew at their next contact)",
        }
    }

    fn write_error(&self, path: &Path, e: std::io::Error) -> TrustError {
        TrustError::Record {
            op: "write",
            path: path.to_path_buf(),
            detail: e.to_string(),
            hint: "make its directory writable, or set IMGSTORE_STATE_DIR to one that is",
        }
    }

    fn load(&self) -> Result<Body, TrustError> {
        let path = self.path();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Body {
                    schema_version: SCHEMA,
                    repositories: BTreeMap::new(),
                })
            }
            Err(e) => return Err(self.read_error(e.to_string())),
        };
        let body: Body =
            serde_json::from_slice(&bytes).map_err(|e| self.read_error(e.to_string()))?;
        if body.schema_version != SCHEMA {
            return Err(self.read_error(format!(
                "schema_version {} (this imgstore knows {SCHEMA})",
                body.schema_version
            )));
        }
        Ok(body)
    }

    /// What is recorded for `url` (a canonical URL, [`crate::canonical_url`]).
    pub fn get(&self, url: &str) -> Result<Option<Seen>, TrustError> {
        Ok(self.load()?.repositories.remove(url))
    }

    /// Checks a server's answer for `url` against the record. A
    /// contradiction is refused unless `accept_change` (the user's
    /// deliberate `--trust-new-repository`).
    pub fn check(
        &self,
        url: &str,
        config: &RepoConfig,
        accept_change: bool,
    ) -> Result<Trust, TrustError> {
        let now = Seen::of(config, 0);
        let Some(recorded) = self.get(url)? else {
            return Ok(Trust::FirstContact);
        };
        if recorded.same_repository(&now) {
            return Ok(Trust::Recorded);
        }
        if accept_change {
            return Ok(Trust::Replaced(recorded));
        }
        if recorded.encrypted && !now.encrypted {
            return Err(TrustError::Downgraded {
                url: url.to_string(),
                recorded: recorded.id,
                now: now.id,
                file: self.path(),
            });
        }
        Err(TrustError::Changed {
            url: url.to_string(),
            recorded_encrypted: recorded.encrypted,
            recorded: recorded.id,
            now_encrypted: now.encrypted,
            now: now.id,
            file: self.path(),
        })
    }

    /// Records `seen` for `url`, in place of whatever was recorded. The
    /// directory is created (0700) when missing; the file is replaced
    /// atomically and is readable by its owner only.
    pub fn record(&self, url: &str, seen: Seen) -> Result<(), TrustError> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| self.write_error(&self.dir, e))?;
        let lock_path = self.dir.join(LOCK_NAME);
        let lock = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&lock_path)
            .map_err(|e| self.write_error(&lock_path, e))?;
        // Another client recording at the same moment waits here, then
        // re-reads: neither entry is lost.
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| self.write_error(&lock_path, e.into()))?;
        let mut body = self.load()?;
        body.schema_version = SCHEMA;
        body.repositories.insert(url.to_string(), seen);
        let mut bytes = serde_json::to_vec_pretty(&body).expect("the record serializes");
        bytes.push(b'\n');
        let path = self.path();
        let tmp = self
            .dir
            .join(format!("{FILE_NAME}.tmp.{}", std::process::id()));
        let written = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(self.write_error(&path, e));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgstore_format::{ChunkingConfig, Encryption, ENCRYPTION_SCHEME};

    fn config(id: &str, encrypted: bool) -> RepoConfig {
        let mut c = RepoConfig::new(
            id.into(),
            0,
            ChunkingConfig {
                algorithm: "fastcdc-2020".into(),
                min: 16 << 10,
                avg: 64 << 10,
                max: 256 << 10,
                zero_min: 4 << 10,
            },
            3,
        );
        if encrypted {
            c.encryption = Some(Encryption {
                scheme: ENCRYPTION_SCHEME.into(),
                slots: vec![],
            });
        }
        c
    }

    const URL: &str = "imgstores://backup.example:8420/";

    #[test]
    fn first_contact_is_recorded_and_then_matched() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownRepos::in_dir(dir.path().join("state/imgstore"));
        let a = config("aa", true);
        assert_eq!(known.check(URL, &a, false).unwrap(), Trust::FirstContact);
        known.record(URL, Seen::of(&a, 7)).unwrap();
        assert_eq!(known.check(URL, &a, false).unwrap(), Trust::Recorded);
        // Another URL is another entry.
        let other = "imgstores://other:8420/";
        assert_eq!(known.check(other, &a, false).unwrap(), Trust::FirstContact);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(known.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let dmode = std::fs::metadata(dir.path().join("state/imgstore"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dmode & 0o777, 0o700);
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(known.path()).unwrap()).unwrap();
        assert_eq!(v["schema_version"], 1);
        assert_eq!(v["repositories"][URL]["id"], "aa");
        assert_eq!(v["repositories"][URL]["encrypted"], true);
        assert_eq!(v["repositories"][URL]["recorded"], 7);
    }

    #[test]
    fn contradictions_are_refused_unless_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownRepos::in_dir(dir.path());
        known.record(URL, Seen::of(&config("aa", true), 1)).unwrap();
        // Plain where it was encrypted, same id or not: a downgrade.
        for plain in [config("aa", false), config("bb", false)] {
            let e = known.check(URL, &plain, false).unwrap_err();
            assert!(matches!(e, TrustError::Downgraded { .. }), "{e}");
            let msg = e.to_string();
            assert!(
                msg.contains(URL)
                    && msg.contains("--trust-new-repository")
                    && msg.contains(FILE_NAME),
                "{msg}"
            );
        }
        // Another encrypted repository.
        let e = known.check(URL, &config("bb", true), false).unwrap_err();
        assert!(matches!(e, TrustError::Changed { .. }), "{e}");
        assert!(e.to_string().contains("repository bb"), "{e}");
        // Accepted: the old entry is handed back, and replaced on record.
        let b = config("bb", false);
        let Trust::Replaced(old) = known.check(URL, &b, true).unwrap() else {
            panic!("not replaced")
        };
        assert_eq!(old.id, "aa");
        known.record(URL, Seen::of(&b, 2)).unwrap();
        assert_eq!(known.check(URL, &b, false).unwrap(), Trust::Recorded);
        // A plain record meeting an encrypted answer is a change too.
        let e = known.check(URL, &config("bb", true), false).unwrap_err();
        assert!(matches!(e, TrustError::Changed { .. }), "{e}");
    }

    #[test]
    fn a_damaged_record_is_reported_not_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownRepos::in_dir(dir.path());
        std::fs::write(known.path(), b"{not json").unwrap();
        let e = known.check(URL, &config("aa", true), false).unwrap_err();
        assert!(matches!(e, TrustError::Record { op: "read", .. }), "{e}");
        assert!(e.to_string().contains(FILE_NAME), "{e}");
    }

    #[test]
    fn concurrent_records_lose_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let known = KnownRepos::in_dir(dir.path());
        std::thread::scope(|s| {
            for t in 0..8 {
                let known = known.clone();
                s.spawn(move || {
                    for i in 0..10 {
                        let url = format!("imgstores://h{t}-{i}:8420/");
                        known
                            .record(&url, Seen::of(&config("aa", false), 0))
                            .unwrap();
                    }
                });
            }
        });
        for t in 0..8 {
            for i in 0..10 {
                let url = format!("imgstores://h{t}-{i}:8420/");
                assert!(known.get(&url).unwrap().is_some(), "{url} lost");
            }
        }
    }
}
