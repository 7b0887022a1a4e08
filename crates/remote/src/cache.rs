//! Where the client keeps its cache of a server: one directory per server
//! URL and token, holding the server's last hello and, per image, the last
//! snapshot this client committed with its index pages
//! ([`imgstore_format::cache`] has the files' bytes; docs/FORMAT.md,
//! "Client cache").
//!
//! The directory's name is a hash of the URL and the token, so it says
//! neither; it and its files are the user's alone (0700, 0600). A file
//! that cannot be read or decoded is as good as absent: the backup then
//! asks the server, as it would without a cache. Writes go to a temporary
//! file renamed into place, so a reader never sees half a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use imgstore_format::cache::{CachedHello, CachedSnapshot};

/// The cache of one server, as one token sees it.
#[derive(Debug, Clone)]
pub struct ClientCache {
    dir: PathBuf,
}

impl ClientCache {
    /// The cache of server `url` (its canonical form) for `token`, under
    /// `root` (created when first written).
    pub fn new(root: &Path, url: &str, token: &str) -> ClientCache {
        let mut h = blake3::Hasher::new_derive_key("imgstore 2026-12-05 client cache directory");
        h.update(&(url.len() as u64).to_le_bytes());
        h.update(url.as_bytes());
        h.update(token.trim().as_bytes());
        let name = h.finalize().to_hex();
        ClientCache {
            dir: root.join("servers").join(&name.as_str()[..32]),
        }
    }

    /// The directory (for messages).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's hello as last received, if kept and readable.
    pub fn hello(&self) -> Option<CachedHello> {
        let b = std::fs::read(self.dir.join("hello")).ok()?;
        CachedHello::decode(&b).ok()
    }

    pub fn save_hello(&self, hello: &CachedHello) -> std::io::Result<()> {
        self.write("hello", &hello.encode())
    }

    /// The last snapshot this client committed of `image`, if kept.
    pub fn snapshot(&self, image: &str) -> Option<CachedSnapshot> {
        let b = std::fs::read(self.image_file(image)).ok()?;
        CachedSnapshot::decode(&b).ok()
    }

    /// Keeps `snap` as the last snapshot of `image` (one too large to keep
    /// removes the one kept: it is no longer the last).
    pub fn save_snapshot(&self, image: &str, snap: &CachedSnapshot) -> std::io::Result<()> {
        if !snap.fits() {
            return self.forget_snapshot(image);
        }
        self.write(&self.image_name(image), &snap.encode())
    }

    pub fn forget_snapshot(&self, image: &str) -> std::io::Result<()> {
        match std::fs::remove_file(self.image_file(image)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn image_name(&self, image: &str) -> String {
        let h = blake3::Hasher::new_derive_key("imgstore 2026-12-05 client cache image")
            .update(image.as_bytes())
            .finalize();
        format!("image-{}", &h.to_hex().as_str()[..32])
    }

    fn image_file(&self, image: &str) -> PathBuf {
        self.dir.join(self.image_name(image))
    }

    fn write(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)?;
        let mut suffix = [0u8; 8];
        let _ = getrandom::fill(&mut suffix);
        let tmp = self.dir.join(format!(
            ".{name}.{}",
            suffix
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ));
        let out = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(bytes)?;
            std::fs::rename(&tmp, self.dir.join(name))
        })();
        if out.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imgstore_format::Id;

    #[test]
    fn kept_per_server_and_token_and_unreadable_files_count_as_absent() {
        let root = tempfile::tempdir().unwrap();
        let a = ClientCache::new(root.path(), "imgstores://h:1/", "tok-a");
        let b = ClientCache::new(root.path(), "imgstores://h:1/", "tok-b");
        let c = ClientCache::new(root.path(), "imgstores://h:2/", "tok-a");
        assert_ne!(a.dir(), b.dir());
        assert_ne!(a.dir(), c.dir());
        // The directory's name says neither the URL nor the token.
        let name = a.dir().to_string_lossy().into_owned();
        assert!(!name.contains("tok-a") && !name.contains("h:1"));

        let hello = CachedHello {
            rtt_us: 7,
            hello: b"{}".to_vec(),
        };
        a.save_hello(&hello).unwrap();
        assert_eq!(a.hello(), Some(hello));
        assert_eq!(b.hello(), None);
        let snap = CachedSnapshot {
            id: Id::hash(b"r"),
            record: b"r".to_vec(),
            pages: vec![],
        };
        a.save_snapshot("disk", &snap).unwrap();
        assert_eq!(a.snapshot("disk"), Some(snap));
        assert_eq!(a.snapshot("other"), None);

        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(a.dir()), 0o700);
        assert_eq!(mode(&a.dir().join("hello")), 0o600);

        std::fs::write(a.dir().join("hello"), b"junk").unwrap();
        assert_eq!(a.hello(), None);
        a.forget_snapshot("disk").unwrap();
        assert_eq!(a.snapshot("disk"), None);
        a.forget_snapshot("disk").unwrap();
    }
}
