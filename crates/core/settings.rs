//! The flags every command shares (`--quiet`, `--wait`, a server's trust
//! and token, an encrypted repository's secret), resolved once from the
//! command line before any command runs, and read from here by whatever
//! needs them (output, opening repositories, key slots, the server).

use std::path::PathBuf;

use crate::args::Cli;
use crate::exit;

/// Flags every command shares.
pub(crate) struct Settings {
    pub quiet: bool,
    pub verbose: bool,
    /// How long a writer waits for the repository lock.
    pub wait: std::time::Duration,
    /// For a server repository: where the token is, whom to trust, how
    /// long to retry.
    pub token_file: Option<PathBuf>,
    pub server_fingerprint: Option<String>,
    pub server_ca: Option<PathBuf>,
    pub retry_for: std::time::Duration,
    /// `--limit-upload` / `--limit-download`, shared by every server and
    /// bucket this process reaches.
    pub limits: imgstore_limit::Limits,
    /// For an encrypted repository: where the secret comes from.
    pub key_file: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub password_command: Option<String>,
    /// Accept a server repository that contradicts the known-repositories
    /// record (`--trust-new-repository`).
    pub trust_new_repository: bool,
}

static SETTINGS: std::sync::OnceLock<Settings> = std::sync::OnceLock::new();

pub(crate) fn settings() -> &'static Settings {
    SETTINGS.get_or_init(|| Settings {
        quiet: false,
        verbose: false,
        wait: std::time::Duration::ZERO,
        token_file: None,
        server_fingerprint: None,
        server_ca: None,
        retry_for: std::time::Duration::from_secs(120),
        limits: imgstore_limit::Limits::default(),
        key_file: None,
        password_file: None,
        password_command: None,
        trust_new_repository: false,
    })
}

/// Resolves the shared flags of `cli` (durations parsed, usage errors as
/// every command gives them); read back through [`settings`].
pub(crate) fn init(cli: &Cli) -> anyhow::Result<()> {
    let wait = match &cli.wait {
        Some(w) => humantime::parse_duration(w).map_err(|_| {
            exit::usage(format!("--wait={w} is not a duration (e.g. 30s, 10m, 2h)"))
        })?,
        None => std::time::Duration::ZERO,
    };
    let retry_for = humantime::parse_duration(&cli.retry_for).map_err(|_| {
        exit::usage(format!(
            "--retry-for {} is not a duration (e.g. 30s, 2m)",
            cli.retry_for
        ))
    })?;
    let rate = |v: &Option<String>, flag: &str| {
        v.as_deref()
            .map(|r| crate::units::parse_rate(r, flag))
            .transpose()
    };
    let limits = imgstore_limit::Limits::new(
        rate(&cli.limit_upload, "--limit-upload")?,
        rate(&cli.limit_download, "--limit-download")?,
    );
    imgstore_bucket::set_limits(limits.clone());
    let _ = SETTINGS.set(Settings {
        quiet: cli.quiet,
        verbose: cli.verbose,
        wait,
        token_file: cli.token_file.clone(),
        server_fingerprint: cli.server_fingerprint.clone(),
        server_ca: cli.server_ca.clone(),
        retry_for,
        limits,
        key_file: cli.key_file.clone(),
        password_file: cli.password_file.clone(),
        password_command: cli.password_command.clone(),
        trust_new_repository: cli.trust_new_repository,
    });
    Ok(())
}
