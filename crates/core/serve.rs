//! `serve`: snapshots as read-only NBD exports.

use std::io;
use std::net::TcpListener;
use std::os::unix::net::UnixListener;
use std::path::Path;

use anyhow::Context;
use imgstore_engine::{ImageReader, Overlay};
use imgstore_format::{Id, Snapshot};
use imgstore_nbd::{Export, Exports};

use crate::args::ServeArgs;
use crate::output::note;
use crate::units::{format_time, human_bytes, parse_size};

/// A snapshot, read-only or behind a copy-on-write overlay.
struct SnapExport<'a>(ImageReader<'a>, Option<Overlay>);

/// An engine error as the client sees it (EIO), also reported on the
/// server's stderr, where the operator sees which chunk or file failed.
fn eio(e: imgstore_engine::EngineError) -> io::Error {
    note(&format!("imgstore serve: {e}"));
    io::Error::other(e.to_string())
}

impl Export for SnapExport<'_> {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        match &self.1 {
            Some(o) => o.read_at(&self.0, offset, buf),
            None => self.0.read_at(offset, buf),
        }
        .map_err(eio)
    }
    fn map(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
        match &self.1 {
            Some(o) => o.map(&self.0, offset, len),
            None => self.0.map(offset, len),
        }
        .map_err(eio)
    }
    fn writable(&self) -> bool {
        self.1.is_some()
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        match &self.1 {
            Some(o) => o.write_at(&self.0, offset, data).map_err(eio),
            None => Err(io::ErrorKind::PermissionDenied.into()),
        }
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
        match &self.1 {
            Some(o) => o.write_zeros(&self.0, offset, len).map_err(eio),
            None => Err(io::ErrorKind::PermissionDenied.into()),
        }
    }
    fn flush(&self) -> io::Result<()> {
        match &self.1 {
            Some(o) => o.flush().map_err(eio),
            None => Ok(()),
        }
    }
}

struct Set<'a> {
    snaps: &'a [(Id, Snapshot)],
    exports: Vec<SnapExport<'a>>,
}

impl Exports for Set<'_> {
    fn lookup(&self, name: &str) -> Option<&dyn Export> {
        // Export names resolve like every other snapshot name (an id or a
        // unique prefix, NAME@latest), among the exported snapshots.
        let i = if name.is_empty() {
            (self.snaps.len() == 1).then_some(0)?
        } else {
            let (sel, image) = imgstore_engine::parse_export_name(name).ok()?;
            let (id, _) = imgstore_engine::select(self.snaps, &sel, image.as_deref()).ok()?;
            self.snaps.iter().position(|(i, _)| *i == id)?
        };
        Some(&self.exports[i])
    }

    fn list(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .snaps
            .iter()
            .map(|(id, s)| {
                (
                    id.to_hex(),
                    format!(
                        "{} {} {}",
                        s.name,
                        format_time(s.time_ns),
                        human_bytes(s.size)
                    ),
                )
            })
            .collect();
        let mut names: Vec<&str> = self.snaps.iter().map(|(_, s)| s.name.as_str()).collect();
        names.sort();
        names.dedup();
        for n in names {
            out.push((
                format!("{n}@latest"),
                format!("newest exported snapshot of {n}"),
            ));
        }
        out
    }
}

pub fn serve(repo: &Path, a: ServeArgs) -> anyhow::Result<()> {
    if a.snapshots.is_empty() && !a.all {
        return Err(crate::exit::usage(
            "name the snapshots to export (ids, prefixes or `latest`), or pass --all",
        ));
    }
    let cache = parse_size(&a.cache)? as usize;
    let store = crate::open::open_read(repo)?;
    let snaps = crate::select::chosen_snapshots(&*store, &a.snapshots, a.all, a.name.as_deref())?;
    let per_export = (cache / snaps.len()).max(8 << 20);
    if a.writable.is_some() && snaps.len() != 1 {
        return Err(crate::exit::usage(
            "--writable serves exactly one snapshot: name it (e.g. `latest --name vm-root`)",
        ));
    }
    let mut exports = Vec::new();
    for (id, s) in &snaps {
        let overlay = match &a.writable {
            Some(dir) => Some(Overlay::open(dir, id, s)?),
            None => None,
        };
        exports.push(SnapExport(
            ImageReader::new(&*store, id, s, per_export)?,
            overlay,
        ));
    }
    if let Some(dir) = &a.writable {
        note(&format!(
            "writes go to the overlay in {} (never into the repository); keep them as a snapshot with `imgstore backup --from-export {}`",
            dir.display(),
            dir.display()
        ));
    }
    let set = Set {
        snaps: &snaps,
        exports,
    };
    let describe = |uri: &str| {
        note(&format!(
            "serving {} {} at {uri} (export names: full id, unique prefix, NAME@latest); Ctrl-C stops",
            crate::units::plural(snaps.len() as u64, "snapshot"),
            if a.writable.is_some() { "writable (copy-on-write)" } else { "read-only" }
        ));
        for (id, s) in &snaps {
            note(&format!(
                "  {}  {}  {}  {}",
                id.short(),
                s.name,
                format_time(s.time_ns),
                human_bytes(s.size)
            ));
        }
    };
    let set = &set;
    // Ctrl-C and SIGTERM stop the server in order: the overlay keeps every
    // write made so far (flushed or not), the socket file goes. Watched
    // from before the first connection.
    let (rt, mut stops) = crate::stops::watch()?;
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let socket = a.socket.clone();
        let writable = a.writable.clone();
        scope.spawn(move || {
            let why = rt.block_on(stops.next());
            let mut code = 0;
            for e in &set.exports {
                if let Some(o) = &e.1 {
                    if let Err(err) = o.flush() {
                        note(&format!("imgstore serve: {err}"));
                        code = crate::exit::FAILURE as i32;
                    }
                }
            }
            if let Some(path) = &socket {
                let _ = std::fs::remove_file(path);
            }
            match (&writable, code) {
                (Some(dir), 0) => note(&format!(
                    "stopped ({why}); every write is kept in the overlay in {}",
                    dir.display()
                )),
                _ => note(&format!("stopped ({why})")),
            }
            std::process::exit(code);
        });
        if let Some(path) = &a.socket {
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                // A socket left by an earlier server that was killed.
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path)
                .with_context(|| format!("cannot listen on socket {}", path.display()))?;
            describe(&format!("nbd+unix:///?socket={}", path.display()));
            for conn in l.incoming() {
                let conn = conn.context("accept")?;
                scope.spawn(move || {
                    if let Err(e) = imgstore_nbd::serve_connection(conn, set) {
                        note(&format!("imgstore serve: client: {e}"));
                    }
                });
            }
        } else {
            let l = TcpListener::bind(&a.listen)
                .with_context(|| format!("cannot listen on {}", a.listen))?;
            describe(&format!("nbd://{}", a.listen));
            for conn in l.incoming() {
                let conn = conn.context("accept")?;
                let _ = conn.set_nodelay(true);
                scope.spawn(move || {
                    if let Err(e) = imgstore_nbd::serve_connection(conn, set) {
                        note(&format!("imgstore serve: client: {e}"));
                    }
                });
            }
        }
        Ok(())
    })
}
