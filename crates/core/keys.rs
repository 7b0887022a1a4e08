//! Unlocking encrypted repositories, and `imgstore key`.
//!
//! The secret comes, in this order, from `--key-file`, `--password-file`,
//! `--password-command`, `IMGSTORE_PASSWORD`, or a prompt on the terminal
//! without echo (restic's conventions). It never appears on a command line
//! or in an error message.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use imgstore_crypto::{open_any, Keys, MasterKey, Secret, SlotExt, DEFAULT_KDF};
use imgstore_format::{KeySlot, RepoConfig};
use imgstore_repo::Codec;
use zeroize::Zeroizing;

use crate::args::{KeyAction, KeyArgs};
use crate::exit;
use crate::output::{emit, note};
use crate::settings::settings;

/// Where a secret comes from.
enum Source {
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

fn with_secret<T>(src: &Source, f: impl FnOnce(&Secret<'_>) -> T) -> anyhow::Result<T> {
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

fn unlock(slots: &[KeySlot], location: &str) -> anyhow::Result<MasterKey> {
    let src = read_secret(location, false)?;
    with_secret(&src, |s| open_any(slots, s))?
        .map_err(|e| exit::usage(format!("{location}: {e}: nothing was read or changed")))
}

fn now() -> i64 {
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

/// `imgstore key list|add|remove|passwd`, on a local repository (under its
/// writer lock, so no other writer rewrites the config meanwhile).
pub fn key(repo: &Path, a: KeyArgs) -> anyhow::Result<()> {
    if crate::open::remote_url(repo).is_some() {
        return Err(exit::usage(
            "`imgstore key` changes the key slots of a repository on this machine: run it on the server with -r DIR",
        ));
    }
    // Under the writer lock, without the key: each action unlocks a slot
    // itself when it needs the master key.
    let Some(mut store) = crate::open::open_keyless(repo, false, "key")?.into_local() else {
        return Err(exit::usage("`imgstore key` needs a repository directory"));
    };
    let mut config = store.config().clone();
    let location = repo.display().to_string();
    let Some(enc) = config.encryption.clone() else {
        return Err(exit::usage(format!(
            "{location} is not encrypted: it has no keys"
        )));
    };
    match a.action {
        KeyAction::List => {
            let mut out = format!("{:<10} {:<11} {:<22} KDF\n", "ID", "KIND", "CREATED");
            for s in &enc.slots {
                out.push_str(&format!(
                    "{:<10} {:<11} {:<22} {}\n",
                    s.id,
                    format!("{:?}", s.kind).to_lowercase(),
                    crate::units::format_time(s.created * 1_000_000_000),
                    s.kdf
                        .map(|k| format!("argon2id m={} MiB t={} p={}", k.m_kib / 1024, k.t, k.p))
                        .unwrap_or_else(|| "-".into())
                ));
            }
            emit(&out)?;
        }
        KeyAction::Add { new_key_file } => {
            let master = unlock(&enc.slots, &location)?;
            let slot = match new_key_file {
                Some(path) => {
                    use std::io::Write;
                    use std::os::unix::fs::OpenOptionsExt;
                    let secret = Zeroizing::new(imgstore_crypto_random_key()?);
                    let mut f = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(&path)
                        .with_context(|| {
                            format!("cannot create {} (it must not exist)", path.display())
                        })?;
                    f.write_all(&secret)?;
                    f.sync_all()?;
                    KeySlot::new(&master, &Secret::KeyFile(&secret), DEFAULT_KDF, now())?
                }
                None => {
                    let src = new_passphrase()?;
                    with_secret(&src, |s| KeySlot::new(&master, s, DEFAULT_KDF, now()))??
                }
            };
            let id = slot.id.clone();
            let mut enc = enc;
            enc.slots.push(slot);
            config.encryption = Some(enc);
            store.save_config(config)?;
            note(&format!("key slot {id} added"));
        }
        KeyAction::Remove { id } => {
            // The caller proves they hold a key, and cannot remove the last.
            unlock(&enc.slots, &location)?;
            let mut enc = enc;
            let before = enc.slots.len();
            enc.slots.retain(|s| s.id != id);
            if enc.slots.len() == before {
                return Err(exit::usage(format!(
                    "no key slot {id} (`imgstore key list`)"
                )));
            }
            if enc.slots.is_empty() {
                return Err(exit::usage(
                    "that is the last key slot: add another first, or the data is lost",
                ));
            }
            config.encryption = Some(enc);
            store.save_config(config)?;
            note(&format!("key slot {id} removed"));
        }
        KeyAction::Passwd { id } => {
            let master = unlock(&enc.slots, &location)?;
            let mut enc = enc;
            let Some(i) = enc.slots.iter().position(|s| s.id == id) else {
                return Err(exit::usage(format!(
                    "no key slot {id} (`imgstore key list`)"
                )));
            };
            let src = new_passphrase()?;
            // Re-wrapped under the same id (the id is bound into the slot).
            let slot = with_secret(&src, |s| {
                imgstore_crypto::rewrap(&master, s, DEFAULT_KDF, now(), &id)
            })??;
            enc.slots[i] = slot;
            config.encryption = Some(enc);
            store.save_config(config)?;
            note(&format!("key slot {id} has a new passphrase"));
        }
    }
    Ok(())
}

fn new_passphrase() -> anyhow::Result<Source> {
    match std::env::var("IMGSTORE_NEW_PASSWORD") {
        Ok(p) => Ok(Source::Passphrase(Zeroizing::new(p.into_bytes()))),
        Err(_) => {
            let p = rpassword::prompt_password("new passphrase: ").map_err(|_| {
                exit::usage("give the new passphrase in IMGSTORE_NEW_PASSWORD or on a terminal")
            })?;
            let again = rpassword::prompt_password("the same passphrase again: ")
                .context("cannot read the passphrase")?;
            if again != p {
                return Err(exit::usage("the passphrases differ: nothing was changed"));
            }
            Ok(Source::Passphrase(Zeroizing::new(p.into_bytes())))
        }
    }
}

fn imgstore_crypto_random_key() -> anyhow::Result<Vec<u8>> {
    Ok(imgstore_crypto::new_key_file()?)
}
