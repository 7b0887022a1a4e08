//! Opening a repository named by `-r`: a local directory (the RocksDB
//! store) or a server URL (`imgstores://HOST[:PORT]/`). Commands get a
//! [`Repo`] and use it as a `dyn Repository`; only what is local by nature
//! (disk usage, the writer lock) looks at which one it is.

use std::path::Path;

use anyhow::Context;
use imgstore_remote::cache::ClientCache;
use imgstore_remote::known::{KnownRepos, Seen, Trust, TrustError};
use imgstore_remote::{RemoteOptions, RemoteRepo};
use imgstore_repo::Repository;
use imgstore_store::{Mode, Store};

use crate::settings::settings;

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

    /// Bytes the repository occupies, its directory (if it has one)
    /// measured as `dir_bytes` before it was opened: opening for write
    /// preallocates a WAL file that is not the repository's.
    pub fn usage_with(&self, dir_bytes: Option<u64>) -> u64 {
        match (self, dir_bytes) {
            (Repo::Local(s), Some(d)) => d + s.external_bytes(),
            _ => self.disk_usage(),
        }
    }

    /// Closes the repository; returns the bytes it occupies afterwards.
    pub fn close(self) -> u64 {
        match self {
            Repo::Local(s) => s.close(),
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

    /// The server, when the repository is one.
    pub fn remote(&self) -> Option<&RemoteRepo> {
        match self {
            Repo::Local(_) => None,
            Repo::Remote(r) => Some(r),
        }
    }

    /// The local store, when the repository is one.
    pub fn local(&self) -> Option<&Store> {
        match self {
            Repo::Local(s) => Some(s),
            Repo::Remote(_) => None,
        }
    }

    /// The local store, owned, when the repository is one.
    pub fn into_local(self) -> Option<Store> {
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

    /// [`Repo::begin_backup`] in the background, the server pinning the
    /// regions of `pin_pages` (the parent's) as the session opens; the
    /// engine's first calls that need it wait for it, and a refused one
    /// stops the backup (`Repository::ready`).
    pub fn begin_backup_ahead(&self, image: &str, pin_pages: &[imgstore_format::Id]) {
        if let Repo::Remote(r) = self {
            r.begin_session_ahead(image, pin_pages);
        }
    }
}

/// Opens a repository to read from (the source of `copy`): a server with
/// `creds`, or a local directory read-only, with its key if encrypted.
pub(crate) fn open_source(repo: &Path, creds: &Credentials) -> anyhow::Result<Repo> {
    match remote_url(repo) {
        Some(url) => Ok(Repo::Remote(connect_with(url, creds)?)),
        None => local(Store::open(repo, Mode::ReadOnly)?, repo),
    }
}

/// The server URL `repo` names, if it names one.
pub(crate) fn remote_url(repo: &Path) -> Option<&str> {
    repo.to_str().filter(|s| imgstore_remote::is_remote(s))
}

/// Whether `repo` is reached over a link: a server, or a local index whose
/// data lives in a bucket (its config names the bucket; anything that
/// cannot be read here counts as local, and opening it reports why).
pub(crate) fn over_a_link(repo: &Path) -> bool {
    remote_url(repo).is_some()
        || std::fs::read(repo.join(imgstore_format::CONFIG_FILE))
            .ok()
            .and_then(|b| imgstore_format::RepoConfig::from_json(&b).ok())
            .is_some_and(|c| c.storage.is_some())
}

fn connect(url: &str) -> anyhow::Result<RemoteRepo> {
    connect_with(url, &own_credentials())
}

/// This command's credentials for its own repository (`-r`): the token
/// and trust settings of the command line and environment.
fn own_credentials() -> Credentials {
    let s = settings();
    Credentials {
        token_file: s.token_file.clone(),
        token_env: "IMGSTORE_TOKEN",
        fingerprint: s.server_fingerprint.clone(),
        ca_file: s.server_ca.clone(),
        secret_means_encrypted: true,
    }
}

/// How to authenticate to a server and whom to trust.
pub(crate) struct Credentials {
    pub token_file: Option<std::path::PathBuf>,
    /// The environment variable holding the token when no file is given.
    pub token_env: &'static str,
    pub fingerprint: Option<String>,
    pub ca_file: Option<std::path::PathBuf>,
    /// A key or passphrase given on this command is for this repository,
    /// so it must be encrypted (false for `copy --from`, where the secret
    /// may be the destination's).
    pub secret_means_encrypted: bool,
}

pub(crate) fn connect_with(url: &str, c: &Credentials) -> anyhow::Result<RemoteRepo> {
    let token = read_token(url, c)?;
    connect_token(url, c, token, None, None)
}

/// The token `c` names.
fn read_token(url: &str, c: &Credentials) -> anyhow::Result<String> {
    Ok(match (&c.token_file, std::env::var(c.token_env)) {
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
    })
}

/// Connects with `token`; from the client's cache when `cached` is given
/// (`RemoteRepo::connect_ahead`): the cached hello is checked here as the
/// server's would be, and the server's must match it before anything
/// commits.
fn connect_token(
    url: &str,
    c: &Credentials,
    token: String,
    cached: Option<&imgstore_format::cache::CachedHello>,
    session_for: Option<&str>,
) -> anyhow::Result<RemoteRepo> {
    let opts = RemoteOptions {
        url: url.to_string(),
        token,
        fingerprint: c.fingerprint.clone(),
        ca_file: c.ca_file.clone(),
        retry_for: settings().retry_for,
        limits: settings().limits.clone(),
        // Nearly every command lists the snapshots first.
        prefetch_listing: true,
        session_for: session_for.map(str::to_string),
    };
    let repo = match cached {
        Some(h) => RemoteRepo::connect_ahead(opts, h)?,
        None => RemoteRepo::connect(opts)?,
    };
    // Only the hello has been exchanged: the repository's config is what
    // the server *says*. Nothing is read or sent before it is checked
    // against what this client knows (docs/SECURITY.md, "The client never
    // downgrades").
    let canonical = imgstore_remote::canonical_url(url).map_err(crate::exit::usage)?;
    let known = known_repos()?;
    let trust = known.check(&canonical, repo.config(), settings().trust_new_repository)?;
    if c.secret_means_encrypted && repo.config().encryption.is_none() {
        if let Some(secret) = crate::keys::secret_given() {
            return Err(TrustError::PlainWithSecret {
                url: canonical,
                secret: secret.into(),
            }
            .into());
        }
    }
    let codec = crate::keys::codec_for(repo.config(), url)?;
    // Recorded once the repository has opened (an encrypted one with this
    // client's key): trust on first use, or the change the user accepted.
    let seen = Seen::of(repo.config(), now());
    match trust {
        Trust::Recorded => {}
        Trust::FirstContact => {
            known.record(&canonical, seen)?;
            crate::output::detail(&format!(
                "recorded {canonical} as {} repository {} in {}",
                if repo.config().encryption.is_some() {
                    "encrypted"
                } else {
                    "plain"
                },
                repo.config().id,
                known.path().display()
            ));
        }
        Trust::Replaced(old) => {
            known.record(&canonical, seen)?;
            crate::output::note(&format!(
                "{canonical} is now recorded as repository {} in place of {} (--trust-new-repository)",
                repo.config().id,
                old.id
            ));
        }
    }
    Ok(repo.with_codec(codec))
}

/// A backup's writer: as [`open_writer`], and for a server the client's
/// cache of it (none with `no_cache`). With `ahead` and a hello in the
/// cache, the connection starts from it (`RemoteRepo::connect_ahead`).
pub(crate) fn backup_writer(
    repo: &Path,
    no_cache: bool,
    ahead: bool,
    image: Option<&str>,
) -> anyhow::Result<(Repo, Option<ClientCache>)> {
    let Some(url) = remote_url(repo) else {
        return Ok((open_writer(repo, "backup")?, None));
    };
    let c = own_credentials();
    let token = read_token(url, &c)?;
    let canonical = imgstore_remote::canonical_url(url).map_err(crate::exit::usage)?;
    let cache = if no_cache {
        None
    } else {
        cache_dir().map(|d| ClientCache::new(&d, &canonical, &token))
    };
    let hello = cache.as_ref().filter(|_| ahead).and_then(|c| c.hello());
    // A cached hello that does not open here (a key now missing, a record
    // changed) is as good as none: the server's answers decide, as they
    // would without a cache. Without the cache's hello, the session opens
    // with the hello.
    let ahead = hello.and_then(|h| connect_token(url, &c, token.clone(), Some(&h), None).ok());
    let r = match ahead {
        Some(r) => r,
        None => connect_token(url, &c, token, None, image)?,
    };
    Ok((Repo::Remote(r), cache))
}

/// The client's cache directory: `IMGSTORE_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/imgstore`, else `~/.cache/imgstore`; none without a
/// home (the cache is then not used).
fn cache_dir() -> Option<std::path::PathBuf> {
    user_dir("IMGSTORE_CACHE_DIR", "XDG_CACHE_HOME", ".cache/imgstore")
}

/// One of imgstore's own directories: `$own`, else `$xdg/imgstore`, else
/// `~/in_home`; none without a home.
fn user_dir(own: &str, xdg: &str, in_home: &str) -> Option<std::path::PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(dir) = var(own) {
        return Some(dir.into());
    }
    // The XDG spec: a relative value is invalid and ignored.
    let xdg = var(xdg)
        .map(std::path::PathBuf::from)
        .filter(|p| p.is_absolute());
    if let Some(dir) = xdg {
        return Some(dir.join("imgstore"));
    }
    // HOME, else the account's home directory.
    #[allow(deprecated)]
    let home = std::env::home_dir().filter(|p| p.is_absolute());
    home.map(|h| h.join(in_home))
}

/// The known-repositories record, in [`state_dir`].
fn known_repos() -> anyhow::Result<KnownRepos> {
    Ok(KnownRepos::in_dir(state_dir(
        "the known-repositories record",
    )?))
}

/// imgstore's state directory: `IMGSTORE_STATE_DIR`, else
/// `$XDG_STATE_HOME/imgstore`, else `~/.local/state/imgstore`. `what` names
/// what is kept there, for the error when there is none.
pub(crate) fn state_dir(what: &str) -> anyhow::Result<std::path::PathBuf> {
    user_dir(
        "IMGSTORE_STATE_DIR",
        "XDG_STATE_HOME",
        ".local/state/imgstore",
    )
    .ok_or_else(|| {
        crate::exit::usage(format!(
            "no directory for {what}: set IMGSTORE_STATE_DIR (or HOME)"
        ))
    })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
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
