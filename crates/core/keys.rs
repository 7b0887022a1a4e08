//! Unlocking encrypted repositories: where the secret comes from, and the
//! key slots it opens (`imgstore key` is in `key.rs`).
//!
//! The secret comes, in this order, from `--key-file`, `--password-file`,
//! `--password-command`, `IMGSTORE_PASSWORD`, or a prompt on the terminal
//! without echo (restic's conventions). It never appears on a command line
//! or in an error message.

use std::sync::Arc;

use anyhow::Context;
use imgstore_crypto::{open_any, Keys, MasterKey, Secret, SlotExt, DEFAULT_KDF};
use imgstore_format::{KeySlot, RepoConfig};
use imgstore_repo::Codec;
use zeroize::Zeroizing;

use crate::exit;
use crate::settings::settings;

/// Where a secret comes from.
pub(crate) enum Source {
    KeyFile(std::path::PathBuf),
    Passphrase(Zeroizing<Vec<u8>>),
}

fn read_secret(what: &str, confirm: bool) -> anyhow::Result<Source> {
    let s = settings();
    if let Some(f) = &s.key_file {
        return Ok(Source::KeyFile(f.clone()));
    }
    if let Some(f) = &s.password_file {
        let mut v = std::fs::read(f)
            .with_context(|| format!("cannot read the password file {}", f.display()))?;
        while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            v.pop();
        }
        return Ok(Source::Passphrase(Zeroizing::new(v)));
    }
    if let Some(cmd) = &s.password_command {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .output()
            .context("cannot run --password-command")?;
        if !out.status.success() {
            return Err(exit::usage(format!(
                "--password-command failed ({})",
                out.status
            )));
        }
        let mut v = out.stdout;
        while v.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            v.pop();
        }
        return Ok(Source::Passphrase(Zeroizing::new(v)));
    }
    if let Ok(p) = std::env::var("IMGSTORE_PASSWORD") {
        return Ok(Source::Passphrase(Zeroizing::new(p.into_bytes())));
    }
    let p = rpassword::prompt_password(format!("passphrase for {what}: ")).map_err(|_| {
        exit::usage(format!(
            "{what} is encrypted: give its passphrase (IMGSTORE_PASSWORD, --password-file, --password-command, a terminal) or --key-file"
        ))
    })?;
    if confirm {
        let again = rpassword::prompt_password("the same passphrase again: ")
            .context("cannot read the passphrase")?;
        if again != p {
            return Err(exit::usage("the passphrases differ: nothing was changed"));
        }
    }
    Ok(Source::Passphrase(Zeroizing::new(p.into_bytes())))
}

/// The secret this command was given, named for messages: a client given
/// one expects an encrypted repository (a terminal prompt is not counted:
/// it is only asked for when the repository is encrypted).
pub(crate) fn secret_given() -> Option<&'static str> {
    let s = settings();
    if s.key_file.is_some() {
        Some("a key file (--key-file or IMGSTORE_KEY_FILE)")
    } else if s.password_file.is_some() {
        Some("a password file (--password-file or IMGSTORE_PASSWORD_FILE)")
    } else if s.password_command.is_some() {
        Some("a password command (--password-command or IMGSTORE_PASSWORD_COMMAND)")
    } else if std::env::var_os("IMGSTORE_PASSWORD").is_some() {
        Some("a passphrase (IMGSTORE_PASSWORD)")
    } else {
        None
    }
}

pub(crate) fn with_secret<T>(src: &Source, f: impl FnOnce(&Secret<'_>) -> T) -> anyhow::Result<T> {
    match src {
        Source::KeyFile(p) => {
            let bytes = Zeroizing::new(
                std::fs::read(p)
                    .with_context(|| format!("cannot read the key file {}", p.display()))?,
            );
            Ok(f(&Secret::KeyFile(&bytes)))
        }
        Source::Passphrase(p) => Ok(f(&Secret::Passphrase(p))),
    }
}

/// The codec of a repository with `config`, asking for its secret when it
/// is encrypted.
pub(crate) fn codec_for(config: &RepoConfig, location: &str) -> anyhow::Result<Codec> {
    let Some(enc) = &config.encryption else {
        return Ok(Codec::Plain);
    };
    let master = unlock(&enc.slots, location)?;
    Ok(Codec::Sealed(Arc::new(Keys::derive(&master))))
}

pub(crate) fn unlock(slots: &[KeySlot], location: &str) -> anyhow::Result<MasterKey> {
    let src = read_secret(location, false)?;
    with_secret(&src, |s| open_any(slots, s))?
        .map_err(|e| exit::usage(format!("{location}: {e}: nothing was read or changed")))
}

pub(crate) fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Key slots of a new encrypted repository (one, for the secret given).
pub(crate) fn new_slots(location: &str) -> anyhow::Result<(MasterKey, Vec<KeySlot>)> {
    let master = MasterKey::generate()?;
    let src = read_secret(&format!("the new repository {location}"), true)?;
    let slot = with_secret(&src, |s| KeySlot::new(&master, s, DEFAULT_KDF, now()))??;
    Ok((master, vec![slot]))
}
