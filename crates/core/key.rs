//! `imgstore key list|add|remove|passwd`: the key slots of an encrypted
//! repository on this machine (unlocking is `keys.rs`'s).

use std::path::Path;

use anyhow::Context;
use imgstore_crypto::{Secret, SlotExt, DEFAULT_KDF};
use imgstore_format::KeySlot;
use zeroize::Zeroizing;

use crate::args::{KeyAction, KeyArgs};
use crate::exit;
use crate::keys::{now, unlock, with_secret, Source};
use crate::output::{emit, note};

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
