//! Opening a repository named by `-r`: a local directory (the RocksDB
//! store) or a server URL (`imgstores://HOST[:PORT]/`). Commands get a
//! [`Repo`] and use it as a `dyn Repository`; only what is local by nature
//! (disk usage, the writer lock) looks at which one it is.

use std::path::Path;

use anyhow::Context;
use imgstore_remote::{RemoteOptions, RemoteRepo};
use imgstore_repo::Repository;
use imgstore_store::{Mode, Store};

use crate::commands::settings;

pub(crate) enum Repo {
    Local(Store),
    Remote(RemoteRepo),
}

impl std::ops::Deref for Repo {
    type Target = dyn Repository;
    fn deref(&self) -> &(dyn Repository + 'static) {
        match self {
            Repo::Local(s) => s,
            Repo::Remote(r) => r,
        }
    }
}

impl Repo {
    /// Bytes the repository occupies (on this machine, or on the server).
    pub fn disk_usage(&self) -> u64 {
        match self {
            // With its packs, for a bucket-backed one.
            Repo::Local(s) => s.storage_bytes().unwrap_or(0),
            Repo::Remote(r) => r.storage_bytes().unwrap_or(0),
        }
    }

    /// Request counts of a bucket-backed repository.
    pub fn bucket_report(&self) -> Option<imgstore_store::BucketReport> {
        match self {
            Repo::Local(s) => s.bucket_report(),
            Repo::Remote(_) => None,
        }
    }

    /// The local store, when the repository is one.
    pub fn local(&self) -> Option<&Store> {
        match self {
            Repo::Local(s) => Some(s),
            Repo::Remote(_) => None,
        }
    }

    /// Opens the server session a backup of `image` runs in (nothing for a
    /// local repository, whose lock already makes this process the writer).
    pub fn begin_backup(&self, image: &str) -> anyhow::Result<()> {
        if let Repo::Remote(r) = self {
            r.begin_session(image)?;
        }
        Ok(())
    }
}

/// The server URL `repo` names, if it names one.
pub(crate) fn remote_url(repo: &Path) -> Option<&str> {
    repo.to_str().filter(|s| imgstore_remote::is_remote(s))
}

fn connect(url: &str) -> anyhow::Result<RemoteRepo> {
    let s = settings();
    connect_with(
        url,
        &Credentials {
            token_file: s.token_file.clone(),
            token_env: "IMGSTORE_TOKEN",
            fingerprint: s.server_fingerprint.clone(),
            ca_file: s.server_ca.clone(),
        },
    )
}

/// How to authenticate to a server and whom to trust.
pub(crate) struct Credentials {
    pub token_file: Option<std::path::PathBuf>,
    /// The environment variable holding the token when no file is given.
    pub token_env: &'static str,
    pub fingerprint: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
}

pub(crate) fn connect_with(url: &str, c: &Credentials) -> anyhow::Result<RemoteRepo> {
    let token = match (&c.token_file, std::env::var(c.token_env)) {
        (Some(f), _) => std::fs::read_to_string(f)
            .with_context(|| format!("cannot read the token file {}", f.display()))?
            .trim()
            .to_string(),
        (None, Ok(t)) if !t.trim().is_empty() => t.trim().to_string(),
        _ => {
            return Err(crate::exit::usage(format!(
                "{url} needs a token: set {} or pass a token file",
                c.token_env
            )))
        }
    };
    let repo = RemoteRepo::connect(RemoteOptions {
        url: url.to_string(),
        token,
        fingerprint: c.fingerprint.clone(),
        ca_file: c.ca_file.clone(),
        retry_for: settings().retry_for,
    })?;
    let codec = crate::keys::codec_for(repo.config(), url)?;
    Ok(repo.with_codec(codec))
}

/// Opens for reading: a local store read-only (no lock), or the server.
pub(crate) fn open_read(repo: &Path) -> anyhow::Result<Repo> {
    match remote_url(repo) {
        Some(url) => Ok(Repo::Remote(connect(url)?)),
        None => local(Store::open(repo, Mode::ReadOnly)?, repo),
    }
}

/// A local store with its codec (unlocked when encrypted).
fn local(store: Store, repo: &Path) -> anyhow::Result<Repo> {
    let codec = crate::keys::codec_for(store.config(), &repo.display().to_string())?;
    Ok(Repo::Local(store.with_codec(codec)))
}

/// Opens for work that never reads plaintext (gc): an encrypted local
/// repository opens without its key, as its server or a bucket host would
/// run it. Read-only for a dry run, as the writer `operation` otherwise.
pub(crate) fn open_keyless(
    repo: &Path,
    dry_run: bool,
    operation: &'static str,
) -> anyhow::Result<Repo> {
    match remote_url(repo) {
        Some(url) => Ok(Repo::Remote(connect(url)?)),
        None if dry_run => Ok(Repo::Local(Store::open(repo, Mode::ReadOnly)?)),
        None => Ok(Repo::Local(Store::open_waiting(
            repo,
            Mode::Write { operation },
            settings().wait,
        )?)),
    }
}

/// Opens as the writer `operation`: a local store with its lock (waiting
/// as long as `--wait` says), or the server (which serialises writers).
pub(crate) fn open_writer(repo: &Path, operation: &'static str) -> anyhow::Result<Repo> {
    match remote_url(repo) {
        Some(url) => Ok(Repo::Remote(connect(url)?)),
        None => local(
            Store::open_waiting(repo, Mode::Write { operation }, settings().wait)?,
            repo,
        ),
    }
}

/// Opens as the writer `operation` without waiting for a local lock (a
/// side step such as recording damage marks, skipped when busy).
pub(crate) fn open_writer_now(
    repo: &Path,
    operation: &'static str,
) -> Result<Repo, imgstore_engine::EngineError> {
    match remote_url(repo) {
        Some(url) => connect(url).map(Repo::Remote).map_err(|e| {
            imgstore_engine::EngineError::Repo(imgstore_repo::RepoError::Invalid(e.to_string()))
        }),
        None => local(Store::open(repo, Mode::Write { operation })?, repo).map_err(|e| {
            imgstore_engine::EngineError::Repo(imgstore_repo::RepoError::Invalid(e.to_string()))
        }),
    }
}
