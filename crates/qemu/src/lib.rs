//! VM disk images (qcow2, vmdk, vhdx, vdi, vpc, qed, raw) read and written
//! through QEMU's own block layer: `qemu-img info` says what an image is,
//! and a private `qemu-storage-daemon` exports it over NBD on a Unix
//! socket in a private temporary directory, for the NBD client to read
//! (or, for a restore, write).
//!
//! Why a crate of its own: it is the one place that starts QEMU's
//! programs and owns their lifetime — a daemon is killed and collected
//! when its [`Export`] is dropped, however the caller ends, and is started
//! under `setpriv --pdeathsig KILL` so that it dies with the process that
//! started it even when that process is killed outright. Why QEMU's block
//! layer and not a parser of our own: it follows backing chains, reads
//! compressed and encrypted-at-rest clusters, snapshots and every format's
//! corner cases exactly as the hypervisor that wrote the image does.
//!
//! A library never prints: errors are returned to the caller.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use imgstore_nbd::client::{Address, Uri};

/// Formats imgstore reads and writes through QEMU (`--format`).
pub const FORMATS: &[&str] = &["qcow2", "vmdk", "vhdx", "vdi", "vpc", "qed", "raw"];

/// Formats a restore can write.
pub const WRITABLE_FORMATS: &[&str] = &["qcow2", "vmdk", "vhdx", "vdi", "vpc", "qed"];

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// A QEMU program is not installed.
    #[error(
        "{program} is not installed: install QEMU's tools (Debian: apt-get install qemu-utils)"
    )]
    Missing { program: &'static str },
    /// QEMU could not open or understand the image.
    #[error("{}: {why}", path.display())]
    Image { path: PathBuf, why: String },
    /// Starting, reaching or stopping the daemon failed.
    #[error("qemu-storage-daemon for {}: {why}", path.display())]
    Daemon { path: PathBuf, why: String },
    /// The daemon refused a QMP command (or its monitor failed).
    #[error("qemu-storage-daemon for {}: {command}: {why}", path.display())]
    Qmp {
        path: PathBuf,
        command: &'static str,
        why: String,
    },
}

/// What `qemu-img info` says about an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format (given, or probed by QEMU).
    pub format: String,
    /// The size of the disk the guest sees.
    pub virtual_size: u64,
    /// The backing file, resolved as QEMU resolves it.
    pub backing: Option<String>,
    /// The persistent dirty bitmaps a qcow2 image holds.
    pub bitmaps: Vec<BitmapInfo>,
}

/// A persistent dirty bitmap of a qcow2 image, as `qemu-img info` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
pub struct BitmapInfo {
    pub name: String,
    /// `auto` (enabled: it records writes whenever the image is opened
    /// read-write), `in-use` (the image is open read-write, or was not
    /// closed cleanly: then the bitmap may have missed writes).
    pub flags: Vec<String>,
    pub granularity: u64,
}

impl BitmapInfo {
    /// Marked in use: opened read-write and not (yet) closed cleanly.
    pub fn in_use(&self) -> bool {
        self.flags.iter().any(|f| f == "in-use")
    }

    /// Enabled: records the writes made while the image is open.
    pub fn enabled(&self) -> bool {
        self.flags.iter().any(|f| f == "auto")
    }
}

#[derive(serde::Deserialize)]
struct RawInfo {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "full-backing-filename")]
    backing: Option<String>,
    encrypted: Option<bool>,
    #[serde(rename = "format-specific")]
    format_specific: Option<FormatSpecific>,
}

#[derive(serde::Deserialize)]
struct FormatSpecific {
    data: Option<FormatData>,
}

#[derive(serde::Deserialize)]
struct FormatData {
    bitmaps: Option<Vec<BitmapInfo>>,
}

fn program(name: &'static str) -> Result<Command, QemuError> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    if !found {
        return Err(QemuError::Missing { program: name });
    }
    Ok(Command::new(name))
}

/// Whether QEMU's tools are installed (`qemu-img` and `qemu-storage-daemon`).
pub fn available() -> bool {
    program("qemu-img").is_ok() && program("qemu-storage-daemon").is_ok()
}

/// The last line of a QEMU program's stderr, without the program's name
/// and the option it was parsing (which repeats the whole JSON).
fn qemu_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .trim();
    let line = match line.find("}: ") {
        Some(i) if line.contains(" --") => &line[i + 3..],
        _ => line,
    };
    let line = line
        .strip_prefix("qemu-img: ")
        .or_else(|| line.strip_prefix("qemu-storage-daemon: "))
        .unwrap_or(line);
    line.to_string()
}

/// What the image at `path` is (`qemu-img info`); `format` forces the
/// format instead of letting QEMU probe it. An image locked by a running
/// VM is refused (back such a disk up over NBD instead).
pub fn info(path: &Path, format: Option<&str>) -> Result<ImageInfo, QemuError> {
    let mut c = program("qemu-img")?;
    // -U: probing needs no lock, so a raw image a VM has open is still
    // read as before; the daemon that reads a VM format takes QEMU's
    // shared lock and refuses an image a running VM writes.
    c.args(["info", "--output=json", "-U"]);
    if let Some(f) = format {
        c.args(["-f", f]);
    }
    let out = qemu_img_on(path, c.arg("--").arg(path))?;
    if !out.status.success() {
        let msg = qemu_message(&out.stderr);
        let why = format!("QEMU cannot open it as a disk image: {msg}");
        return Err(QemuError::Image {
            path: path.to_path_buf(),
            why,
        });
    }
    let raw: RawInfo = serde_json::from_slice(&out.stdout).map_err(|e| QemuError::Image {
        path: path.to_path_buf(),
        why: format!("unexpected qemu-img info output: {e}"),
    })?;
    if raw.encrypted == Some(true) {
        return Err(QemuError::Image {
            path: path.to_path_buf(),
            why: "is encrypted by QEMU: decrypt it first (qemu-img convert with --object secret)"
                .into(),
        });
    }
    let bitmaps = raw
        .format_specific
        .and_then(|f| f.data)
        .and_then(|d| d.bitmaps)
        .unwrap_or_default();
    Ok(ImageInfo {
        format: raw.format,
        virtual_size: raw.virtual_size,
        backing: raw.backing,
        bitmaps,
    })
}

/// Runs `cmd` (a `qemu-img` command about the image at `path`) to its end,
/// without input; a failure to start it names the image.
fn qemu_img_on(path: &Path, cmd: &mut Command) -> Result<std::process::Output, QemuError> {
    cmd.stdin(Stdio::null())
        .output()
        .map_err(|e| QemuError::Image {
            path: path.to_path_buf(),
            why: format!("cannot run qemu-img: {e}"),
        })
}

/// Creates a new, empty (thin) image of `size` bytes in `format`.
pub fn create(path: &Path, format: &str, size: u64) -> Result<(), QemuError> {
    let out = qemu_img_on(
        path,
        program("qemu-img")?
            .args(["create", "-q", "-f", format, "--"])
            .arg(path)
            .arg(size.to_string()),
    )?;
    if !out.status.success() {
        return Err(QemuError::Image {
            path: path.to_path_buf(),
            why: format!(
                "cannot create a {format} image: {}",
                qemu_message(&out.stderr)
            ),
        });
    }
    Ok(())
}

/// How an image is exported.
#[derive(Clone, Debug, Default)]
pub struct ExportOptions {
    /// Clients may write (a restore into the image).
    pub writable: bool,
    /// Managing the image's dirty bitmaps: the image is opened read-write
    /// (QEMU's lock keeps a VM from opening it meanwhile) with a QMP
    /// monitor, and the export — read-only — is added only by
    /// [`Export::export`], with or without a bitmap. Dropping the daemon
    /// then stops it cleanly (SIGTERM), so the image's bitmaps are written
    /// back and not left marked in use.
    pub manage_bitmaps: bool,
}

/// A private `qemu-storage-daemon` exporting one image over NBD. Dropping
/// it kills the daemon, waits for it and removes its directory.
pub struct Export {
    child: Option<Child>,
    dir: Option<tempfile::TempDir>,
    uri: Uri,
    path: PathBuf,
    /// The QMP monitor (`manage_bitmaps`), connected before the directory
    /// holding its socket is removed.
    qmp: Option<Qmp>,
}

/// The non-persistent, disabled copy of a bitmap that an export offers
/// (QEMU exports only a bitmap that no longer changes).
pub const EXPORTED_BITMAP: &str = "__imgstore_read";

/// A QMP connection: one JSON object per line each way.
struct Qmp {
    reader: std::io::BufReader<std::os::unix::net::UnixStream>,
    writer: std::os::unix::net::UnixStream,
}

impl Qmp {
    fn connect(socket: &Path) -> std::io::Result<Qmp> {
        use std::io::BufRead;
        let s = std::os::unix::net::UnixStream::connect(socket)?;
        s.set_read_timeout(Some(QMP_TIMEOUT))?;
        s.set_write_timeout(Some(QMP_TIMEOUT))?;
        let mut q = Qmp {
            reader: std::io::BufReader::new(s.try_clone()?),
            writer: s,
        };
        // The greeting, then capabilities negotiation.
        let mut line = String::new();
        q.reader.read_line(&mut line)?;
        if !line.contains("QMP") {
            return Err(std::io::Error::other(format!(
                "not a QMP greeting: {}",
                line.trim()
            )));
        }
        q.execute("qmp_capabilities", serde_json::json!({}))
            .map_err(std::io::Error::other)?;
        Ok(q)
    }

    /// Runs one command; its `return` value, or QEMU's error description.
    fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        use std::io::{BufRead, Write};
        let msg = serde_json::json!({"execute": command, "arguments": arguments});
        self.writer
            .write_all(format!("{msg}\n").as_bytes())
            .map_err(|e| format!("monitor: {e}"))?;
        // Events may come first; a bounded number of lines is read.
        for _ in 0..1000 {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .map_err(|e| format!("monitor: {e}"))?;
            if n == 0 {
                return Err("the monitor closed".into());
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| format!("monitor sent {:?}: {e}", line.trim()))?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(e
                    .get("desc")
                    .and_then(|d| d.as_str())
                    .unwrap_or("error")
                    .to_string());
            }
        }
        Err("no answer from the monitor".into())
    }
}

/// How long a QMP command may take.
const QMP_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a daemon managing bitmaps may take to stop cleanly when
/// dropped before it is killed.
const DROP_STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The name of the one export the daemon serves.
const EXPORT_NAME: &str = "disk";

/// How long the daemon may take to open the image and listen.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a clean stop may take (writes flushed) before the daemon is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(120);

impl Export {
    /// Starts a daemon exporting the image at `path` in `format`; returns
    /// once it listens. Backing files are opened as the image names them,
    /// read-only.
    pub fn start(path: &Path, format: &str, opts: &ExportOptions) -> Result<Export, QemuError> {
        let daemon_err = |why: String| QemuError::Daemon {
            path: path.to_path_buf(),
            why,
        };
        if !FORMATS.contains(&format) {
            return Err(QemuError::Image {
                path: path.to_path_buf(),
                why: format!(
                    "format {format:?} is not one imgstore reads through QEMU ({})",
                    FORMATS.join(", ")
                ),
            });
        }
        let mut cmd = program("setpriv")?;
        program("qemu-storage-daemon")?;
        let dir = tempfile::Builder::new()
            .prefix("imgstore-qemu-")
            .tempdir()
            .map_err(|e| daemon_err(format!("cannot make its private directory: {e}")))?;
        let socket = dir.path().join("nbd.sock");
        let stderr = dir.path().join("stderr");
        let abs = std::path::absolute(path)
            .map_err(|e| daemon_err(format!("cannot resolve the path: {e}")))?;
        let ro = !opts.writable && !opts.manage_bitmaps;
        let qmp_socket = dir.path().join("qmp.sock");
        let blockdev = serde_json::json!({
            "driver": format,
            "node-name": "disk",
            "read-only": ro,
            "file": {"driver": "file", "filename": abs, "read-only": ro},
        });
        let server = serde_json::json!({
            "addr": {"type": "unix", "path": socket},
            "max-connections": 0,
        });
        let export = serde_json::json!({
            "type": "nbd",
            "id": "export",
            "node-name": "disk",
            "name": EXPORT_NAME,
            "writable": opts.writable,
        });
        let err_file = std::fs::File::create(&stderr)
            .map_err(|e| daemon_err(format!("cannot make its log: {e}")))?;
        // setpriv sets the parent-death signal and execs the daemon: if
        // this process dies (Ctrl-C, SIGTERM, kill -9), the kernel kills
        // the daemon. Its own process group keeps a terminal's Ctrl-C from
        // reaching it first: the caller sees its own errors, not the
        // daemon's disappearance. (The signal follows the thread that
        // spawned the daemon: start it from the thread that outlives it.)
        use std::os::unix::process::CommandExt;
        // The daemon sets its options up in command-line order: the
        // monitor comes before the NBD server, so it listens by the time
        // the NBD socket does (the loop below still waits for both).
        //
        // Between the fork and setpriv's prctl this process may already
        // be gone (killed the moment it started the daemon): the signal is
        // then set too late to fire, and the daemon would outlive it. So a
        // shell, with the signal set, checks that its parent is still this
        // process before it execs the daemon ($PPID names the parent it
        // started under; reparented, the daemon never starts).
        cmd.args(["--pdeathsig", "KILL", "--", "sh", "-c"])
            .arg(format!(
                "[ \"$PPID\" = {} ] && exec qemu-storage-daemon \"$@\"",
                std::process::id()
            ))
            .arg("qemu-storage-daemon");
        if opts.manage_bitmaps {
            cmd.arg("--chardev")
                .arg(format!(
                    "socket,id=qmp,path={},server=on,wait=off",
                    qmp_socket.display()
                ))
                .args(["--monitor", "chardev=qmp"]);
        }
        cmd.arg("--blockdev")
            .arg(blockdev.to_string())
            .arg("--nbd-server")
            .arg(server.to_string());
        if !opts.manage_bitmaps {
            cmd.arg("--export").arg(export.to_string());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file)
            .process_group(0);
        let child = cmd
            .spawn()
            .map_err(|e| daemon_err(format!("cannot start it: {e}")))?;
        let mut e = Export {
            child: Some(child),
            dir: Some(dir),
            uri: Uri {
                address: Address::Unix(socket.clone()),
                export: EXPORT_NAME.into(),
                tls: None,
            },
            path: path.to_path_buf(),
            qmp: None,
        };
        let started = Instant::now();
        loop {
            // Listening once a connection is accepted (the socket file
            // appears at bind, just before listen); the probe connection
            // is closed at once. With a monitor, it must accept too.
            if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_ok() {
                if !opts.manage_bitmaps {
                    return Ok(e);
                }
                if qmp_socket.exists() {
                    match Qmp::connect(&qmp_socket) {
                        Ok(q) => {
                            e.qmp = Some(q);
                            return Ok(e);
                        }
                        Err(err) if started.elapsed() > START_TIMEOUT => {
                            return Err(daemon_err(format!("its QMP monitor: {err}")));
                        }
                        Err(_) => {}
                    }
                }
            }
            let c = e.child.as_mut().expect("running");
            if let Ok(Some(status)) = c.try_wait() {
                let msg = std::fs::read(&stderr).unwrap_or_default();
                e.child = None;
                let why = if msg.is_empty() {
                    format!("the daemon ended ({status})")
                } else {
                    qemu_message(&msg)
                };
                let all = String::from_utf8_lossy(&msg);
                let hint = if all.contains("lock") || all.contains("another process") {
                    " (is a running VM using it? back its disk up over NBD instead)"
                } else {
                    ""
                };
                return Err(QemuError::Image {
                    path: path.to_path_buf(),
                    why: format!("QEMU cannot open it: {why}{hint}"),
                });
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(daemon_err(format!(
                    "did not listen within {} s",
                    START_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn qmp(
        &mut self,
        command: &'static str,
        arguments: serde_json::Value,
    ) -> Result<serde_json::Value, QemuError> {
        let path = self.path.clone();
        let Some(q) = self.qmp.as_mut() else {
            return Err(QemuError::Qmp {
                path,
                command,
                why: "the daemon was started without a monitor".into(),
            });
        };
        q.execute(command, arguments)
            .map_err(|why| QemuError::Qmp { path, command, why })
    }

    /// A daemon started with `manage_bitmaps`: adds the read-only export,
    /// offering a frozen copy of persistent bitmap `bitmap` as the NBD
    /// metadata context `qemu:dirty-bitmap:`[`EXPORTED_BITMAP`] when one
    /// is given. Fails if QEMU refuses the bitmap (an inconsistent one: the
    /// caller may export without it).
    pub fn export(&mut self, bitmap: Option<&str>) -> Result<(), QemuError> {
        let node = "disk";
        let mut bitmaps = vec![];
        if let Some(b) = bitmap {
            // Nothing writes the image meanwhile (the daemon holds its
            // lock and exports it read-only), so the copy is the bitmap.
            let have = self.qmp("query-named-block-nodes", serde_json::json!({"flat": true}))?;
            let exists = |name: &str| {
                have.as_array().into_iter().flatten().any(|n| {
                    n["node-name"] == node
                        && n["dirty-bitmaps"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .any(|d| d["name"] == name)
                })
            };
            if !exists(EXPORTED_BITMAP) {
                self.qmp(
                    "block-dirty-bitmap-add",
                    serde_json::json!({"node": node, "name": EXPORTED_BITMAP,
                        "persistent": false, "disabled": true}),
                )?;
            }
            self.qmp(
                "block-dirty-bitmap-clear",
                serde_json::json!({"node": node, "name": EXPORTED_BITMAP}),
            )?;
            self.qmp(
                "block-dirty-bitmap-merge",
                serde_json::json!({"node": node, "target": EXPORTED_BITMAP, "bitmaps": [b]}),
            )?;
            bitmaps.push(EXPORTED_BITMAP);
        }
        self.qmp(
            "block-export-add",
            serde_json::json!({"type": "nbd", "id": "export", "node-name": node,
                "name": EXPORT_NAME, "writable": false, "bitmaps": bitmaps}),
        )?;
        Ok(())
    }

    /// Adds an enabled persistent bitmap `name` to the image (written into
    /// the qcow2 file when the daemon stops cleanly).
    pub fn add_bitmap(&mut self, name: &str) -> Result<(), QemuError> {
        self.qmp(
            "block-dirty-bitmap-add",
            serde_json::json!({"node": "disk", "name": name, "persistent": true}),
        )?;
        Ok(())
    }

    /// Removes bitmap `name` from the image (from the file too, when the
    /// daemon stops cleanly). Works on an inconsistent bitmap.
    pub fn remove_bitmap(&mut self, name: &str) -> Result<(), QemuError> {
        self.qmp(
            "block-dirty-bitmap-remove",
            serde_json::json!({"node": "disk", "name": name}),
        )?;
        Ok(())
    }

    /// Where the export is.
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The daemon's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Removes the socket and its directory: connections already open go
    /// on, nobody else can connect, and nothing is left on disk whatever
    /// happens to this process later.
    pub fn seal(&mut self) {
        if let Some(d) = self.dir.take() {
            let _ = d.close();
        }
    }

    /// Stops the daemon cleanly (SIGTERM: QEMU flushes and closes the
    /// image) and checks that it ended well; what a writer calls after its
    /// last flush.
    pub fn stop(mut self) -> Result<(), QemuError> {
        self.stop_within(STOP_TIMEOUT)
    }

    fn stop_within(&mut self, timeout: Duration) -> Result<(), QemuError> {
        // The monitor goes first: the daemon does not wait for it.
        self.qmp = None;
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let pid = rustix::process::Pid::from_raw(c.id() as i32).expect("a child's pid");
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        let started = Instant::now();
        let status = loop {
            match c.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if started.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return Err(QemuError::Daemon {
                        path: self.path.clone(),
                        why: format!("did not stop within {} s and was killed", timeout.as_secs()),
                    });
                }
            }
        };
        if !status.success() {
            return Err(QemuError::Daemon {
                path: self.path.clone(),
                why: format!("ended badly ({status})"),
            });
        }
        Ok(())
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if self.qmp.is_some() {
            // Managing bitmaps: a clean stop writes them back consistent,
            // so a failed backup leaves the image's bitmap usable.
            let _ = self.stop_within(DROP_STOP_TIMEOUT);
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_lose_the_json() {
        let m = b"qemu-storage-daemon: --blockdev {\"driver\":\"qcow2\"}: Could not open backing file: Could not open 'b.qcow2': No such file or directory\n";
        assert_eq!(
            qemu_message(m),
            "Could not open backing file: Could not open 'b.qcow2': No such file or directory"
        );
        assert_eq!(
            qemu_message(b"qemu-img: Could not open 'x': Unsupported qcow2 version 7\n"),
            "Could not open 'x': Unsupported qcow2 version 7"
        );
    }
}
