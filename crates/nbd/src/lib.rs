//! A Network Block Device server (fixed newstyle protocol): read-only
//! exports, and writable ones whose writes the export itself keeps (the
//! binary sends them to a copy-on-write overlay, never the repository).
//!
//! Why a crate of its own: the protocol knows nothing of snapshots or
//! storage. It serves anything that implements [`Export`] — here, a
//! snapshot image read through imgstore's chunk cache — and can be tested
//! and audited alone. It speaks what unmodified clients (`nbdinfo`,
//! `nbdcopy`, `qemu-img`, the kernel's `nbd-client`) use:
//!
//! * handshake: fixed newstyle, `NBD_OPT_EXPORT_NAME`, `GO`, `INFO`,
//!   `LIST`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` /
//!   `SET_META_CONTEXT` (`base:allocation`); anything else is refused with
//!   `NBD_REP_ERR_UNSUP`;
//! * transmission: `READ` (as data and hole chunks once structured replies
//!   are on, so zero extents are not sent as bytes), `BLOCK_STATUS`
//!   (holes and zeros from the recipes, no data read), `CACHE`, `FLUSH`,
//!   `DISC`; `WRITE`, `WRITE_ZEROES` and `TRIM` go to exports that say they
//!   are writable (a copy-on-write overlay), and are refused with `EPERM`
//!   otherwise.
//!
//! The [`client`] module is the other side: an NBD client for reading
//! (and writing) exports that other servers offer — QEMU's, above all.
//!
//! A library never prints: errors are returned to the caller.

use std::io::{self, Read, Write};

pub mod client;

/// What an export offers.
pub trait Export: Sync {
    fn size(&self) -> u64;
    /// Fills `buf` with the bytes at `offset` (within the export).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// `(length, is_zero)` runs covering `[offset, offset + len)`.
    fn map(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>>;
    /// Whether clients may write (the export then also takes writes,
    /// zeroing and flushes).
    fn writable(&self) -> bool {
        false
    }
    fn write_at(&self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    fn write_zeroes(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::PermissionDenied))
    }
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The set of exports a server offers.
pub trait Exports: Sync {
    /// The export a client named ("" = the default one, if any).
    fn lookup(&self, name: &str) -> Option<&dyn Export>;
    /// `(name, description)` of every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
}

#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("client broke the protocol: {0}")]
    Protocol(String),
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_LIST_META_CONTEXT: u32 = 9;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 2;
const TFLAG_SEND_FLUSH: u16 = 4;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TFLAG_SEND_DF: u16 = 1 << 7;
const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
const TFLAG_SEND_CACHE: u16 = 1 << 10;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_CACHE: u16 = 5;
const CMD_BLOCK_STATUS: u16 = 7;
const CMD_FLAG_DF: u16 = 1 << 2;
const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

const REPLY_FLAG_DONE: u16 = 1;
const REPLY_NONE: u16 = 0;
const REPLY_OFFSET_DATA: u16 = 1;
const REPLY_OFFSET_HOLE: u16 = 2;
const REPLY_BLOCK_STATUS: u16 = 5;
const REPLY_ERROR: u16 = (1 << 15) + 1;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;

/// `base:allocation` status flag: the extent is not allocated.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` status flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 2;

/// The one metadata context served, and its id.
const BASE_ALLOCATION: &str = "base:allocation";
const BASE_ALLOCATION_ID: u32 = 1;

/// Largest read served at once (clients split larger ones; 32 MiB is what
/// the protocol recommends servers accept).
const MAX_REQUEST: u32 = 32 << 20;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

struct Conn<'a, S> {
    s: S,
    exports: &'a dyn Exports,
    structured: bool,
    meta: bool,
}

impl<'a, S: Read + Write> Conn<'a, S> {
    fn reply(&mut self, opt: u32, kind: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(20 + data.len());
        b.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    fn error(&mut self, opt: u32, kind: u32, msg: &str) -> io::Result<()> {
        self.reply(opt, kind, msg.as_bytes())
    }

    fn flags(e: &dyn Export) -> u16 {
        let common = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_DF | TFLAG_SEND_CACHE;
        if e.writable() {
            // One overlay behind every connection, flushed as a whole: safe
            // for several connections, so multi-conn stays on.
            common | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_CAN_MULTI_CONN
        } else {
            common | TFLAG_READ_ONLY | TFLAG_CAN_MULTI_CONN
        }
    }

    /// Option haggling; returns the export to serve, or None when the
    /// client aborted.
    fn handshake(&mut self) -> Result<Option<&'a dyn Export>, NbdError> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.s.write_all(&hello)?;
        let mut cf = [0u8; 4];
        self.s.read_exact(&mut cf)?;
        let no_zeroes = u32::from_be_bytes(cf) & CLIENT_NO_ZEROES != 0;
        loop {
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h)?;
            if u64::from_be_bytes(h[..8].try_into().expect("8")) != IHAVEOPT {
                return Err(NbdError::Protocol("bad option magic".into()));
            }
            let opt = u32::from_be_bytes(h[8..12].try_into().expect("4"));
            let len = u32::from_be_bytes(h[12..16].try_into().expect("4"));
            if len > 64 << 10 {
                return Err(NbdError::Protocol(format!("option of {len} bytes")));
            }
            let mut data = vec![0u8; len as usize];
            self.s.read_exact(&mut data)?;
            match opt {
                OPT_EXPORT_NAME => {
                    let name = String::from_utf8_lossy(&data).into_owned();
                    let exports = self.exports;
                    let Some(e) = exports.lookup(&name) else {
                        // No way to report an error here: close.
                        return Ok(None);
                    };
                    let mut b = Vec::new();
                    b.extend_from_slice(&e.size().to_be_bytes());
                    b.extend_from_slice(&Self::flags(e).to_be_bytes());
                    if !no_zeroes {
                        b.extend_from_slice(&[0u8; 124]);
                    }
                    self.s.write_all(&b)?;
                    return Ok(Some(e));
                }
                OPT_ABORT => {
                    let _ = self.reply(opt, REP_ACK, &[]);
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.error(opt, REP_ERR_INVALID, "LIST takes no data")?;
                        continue;
                    }
                    for (name, desc) in self.exports.list() {
                        let mut b = (name.len() as u32).to_be_bytes().to_vec();
                        b.extend_from_slice(name.as_bytes());
                        b.extend_from_slice(desc.as_bytes());
                        self.reply(opt, REP_SERVER, &b)?;
                    }
                    self.reply(opt, REP_ACK, &[])?;
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        self.error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")?;
                        continue;
                    }
                    self.structured = true;
                    self.reply(opt, REP_ACK, &[])?;
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let parsed = (|| {
                        let nl = u32_at(&data, 0)? as usize;
                        let mut at = 4 + nl;
                        let n = u32_at(&data, at)?;
                        at += 4;
                        let mut queries = Vec::new();
                        for _ in 0..n {
                            let ql = u32_at(&data, at)? as usize;
                            queries.push(
                                String::from_utf8_lossy(data.get(at + 4..at + 4 + ql)?)
                                    .into_owned(),
                            );
                            at += 4 + ql;
                        }
                        Some(queries)
                    })();
                    let Some(queries) = parsed else {
                        self.error(opt, REP_ERR_INVALID, "malformed meta context request")?;
                        continue;
                    };
                    if opt == OPT_SET_META_CONTEXT && !self.structured {
                        self.error(
                            opt,
                            REP_ERR_INVALID,
                            "structured replies are not negotiated",
                        )?;
                        continue;
                    }
                    let wanted = queries.is_empty() && opt == OPT_LIST_META_CONTEXT
                        || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:");
                    if wanted {
                        let mut b = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                        b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                        self.reply(opt, REP_META_CONTEXT, &b)?;
                    }
                    if opt == OPT_SET_META_CONTEXT {
                        self.meta = wanted;
                    }
                    self.reply(opt, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    let parsed = (|| {
                        let nl = u32_at(&data, 0)? as usize;
                        let name = String::from_utf8_lossy(data.get(4..4 + nl)?).into_owned();
                        let n = u16_at(&data, 4 + nl)? as usize;
                        let infos: Option<Vec<u16>> =
                            (0..n).map(|i| u16_at(&data, 6 + nl + 2 * i)).collect();
                        Some((name, infos?))
                    })();
                    let Some((name, infos)) = parsed else {
                        self.error(opt, REP_ERR_INVALID, "malformed INFO/GO request")?;
                        continue;
                    };
                    let exports = self.exports;
                    let Some(e) = exports.lookup(&name) else {
                        self.error(
                            opt,
                            REP_ERR_UNKNOWN,
                            &format!("no export named {name:?}: list them with nbdinfo --list"),
                        )?;
                        continue;
                    };
                    let mut b = INFO_EXPORT.to_be_bytes().to_vec();
                    b.extend_from_slice(&e.size().to_be_bytes());
                    b.extend_from_slice(&Self::flags(e).to_be_bytes());
                    self.reply(opt, REP_INFO, &b)?;
                    let mut b = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                    b.extend_from_slice(&1u32.to_be_bytes());
                    b.extend_from_slice(&4096u32.to_be_bytes());
                    b.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                    self.reply(opt, REP_INFO, &b)?;
                    if infos.contains(&INFO_NAME) {
                        let mut b = INFO_NAME.to_be_bytes().to_vec();
                        b.extend_from_slice(name.as_bytes());
                        self.reply(opt, REP_INFO, &b)?;
                    }
                    if infos.contains(&INFO_DESCRIPTION) {
                        if let Some((_, d)) =
                            self.exports.list().into_iter().find(|(n, _)| *n == name)
                        {
                            let mut b = INFO_DESCRIPTION.to_be_bytes().to_vec();
                            b.extend_from_slice(d.as_bytes());
                            self.reply(opt, REP_INFO, &b)?;
                        }
                    }
                    self.reply(opt, REP_ACK, &[])?;
                    if opt == OPT_GO {
                        return Ok(Some(e));
                    }
                }
                _ => self.error(opt, REP_ERR_UNSUP, "option not supported by imgstore")?,
            }
        }
    }

    // Replies are written as header, then payload from where it lies: the
    // output buffering joins small pieces and passes large ones straight
    // to the socket, so data is not copied into a reply buffer first.
    fn simple(&mut self, cookie: u64, error: u32, data: &[u8]) -> io::Result<()> {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        h[4..8].copy_from_slice(&error.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        self.s.write_all(&h)?;
        self.s.write_all(data)
    }

    fn chunk(&mut self, cookie: u64, flags: u16, kind: u16, payload: &[&[u8]]) -> io::Result<()> {
        let len: usize = payload.iter().map(|p| p.len()).sum();
        let mut h = [0u8; 20];
        h[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&kind.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..20].copy_from_slice(&(len as u32).to_be_bytes());
        self.s.write_all(&h)?;
        for p in payload {
            self.s.write_all(p)?;
        }
        Ok(())
    }

    fn fail(&mut self, cookie: u64, errno: u32, msg: &str) -> io::Result<()> {
        if self.structured {
            let mut p = errno.to_be_bytes().to_vec();
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg.as_bytes());
            self.chunk(cookie, REPLY_FLAG_DONE, REPLY_ERROR, &[&p])
        } else {
            self.simple(cookie, errno, &[])
        }
    }

    /// Replies to a command without payload: success or EIO.
    fn done(&mut self, cookie: u64, r: io::Result<()>) -> io::Result<()> {
        match r {
            Err(err) => self.fail(cookie, EIO, &err.to_string()),
            Ok(()) if self.structured => self.chunk(cookie, REPLY_FLAG_DONE, REPLY_NONE, &[]),
            Ok(()) => self.simple(cookie, 0, &[]),
        }
    }

    fn read(
        &mut self,
        e: &dyn Export,
        cookie: u64,
        offset: u64,
        len: u32,
        buf: &mut Vec<u8>,
    ) -> io::Result<()> {
        buf.resize(len as usize, 0);
        if !self.structured {
            return match e.read_at(offset, buf) {
                Ok(()) => self.simple(cookie, 0, buf),
                Err(err) => self.fail(cookie, EIO, &err.to_string()),
            };
        }
        // Structured: data chunks for data, hole chunks for zero extents.
        let map = match e.map(offset, len as u64) {
            Ok(m) => m,
            Err(err) => return self.fail(cookie, EIO, &err.to_string()),
        };
        let mut pos = offset;
        for (n, zero) in map {
            if zero {
                let mut p = pos.to_be_bytes().to_vec();
                p.extend_from_slice(&(n as u32).to_be_bytes());
                self.chunk(cookie, 0, REPLY_OFFSET_HOLE, &[&p])?;
            } else {
                let d = &mut buf[..n as usize];
                if let Err(err) = e.read_at(pos, d) {
                    return self.fail(cookie, EIO, &err.to_string());
                }
                let d = &buf[..n as usize];
                self.chunk(cookie, 0, REPLY_OFFSET_DATA, &[&pos.to_be_bytes(), d])?;
            }
            pos += n;
        }
        self.chunk(cookie, REPLY_FLAG_DONE, REPLY_NONE, &[])
    }

    fn block_status(
        &mut self,
        e: &dyn Export,
        cookie: u64,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> io::Result<()> {
        if !self.meta {
            return self.fail(cookie, EINVAL, "base:allocation was not negotiated");
        }
        let map = match e.map(offset, len as u64) {
            Ok(m) => m,
            Err(err) => return self.fail(cookie, EIO, &err.to_string()),
        };
        let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        for (n, zero) in map.iter().take(if flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            65536
        }) {
            p.extend_from_slice(&(*n as u32).to_be_bytes());
            p.extend_from_slice(&(if *zero { STATE_HOLE | STATE_ZERO } else { 0 }).to_be_bytes());
        }
        self.chunk(cookie, REPLY_FLAG_DONE, REPLY_BLOCK_STATUS, &[&p])
    }

    fn transmit(&mut self, e: &dyn Export) -> Result<(), NbdError> {
        let mut buf = Vec::new();
        loop {
            let mut h = [0u8; 28];
            match self.s.read_exact(&mut h) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(err) => return Err(err.into()),
            }
            if u32::from_be_bytes(h[..4].try_into().expect("4")) != REQUEST_MAGIC {
                return Err(NbdError::Protocol("bad request magic".into()));
            }
            let flags = u16::from_be_bytes(h[4..6].try_into().expect("2"));
            let kind = u16::from_be_bytes(h[6..8].try_into().expect("2"));
            let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8"));
            let offset = u64::from_be_bytes(h[16..24].try_into().expect("8"));
            let len = u32::from_be_bytes(h[24..28].try_into().expect("4"));
            let in_range = offset
                .checked_add(len as u64)
                .is_some_and(|end| end <= e.size());
            match kind {
                CMD_DISC => return Ok(()),
                CMD_READ if !in_range || len > MAX_REQUEST => {
                    self.fail(cookie, EINVAL, "read beyond the end of the export")?
                }
                CMD_READ => {
                    let _ = flags & CMD_FLAG_DF; // chunks never fragment a data extent needlessly
                    self.read(e, cookie, offset, len, &mut buf)?
                }
                CMD_BLOCK_STATUS if !in_range || len == 0 => {
                    self.fail(cookie, EINVAL, "block status beyond the end of the export")?
                }
                CMD_BLOCK_STATUS => self.block_status(e, cookie, flags, offset, len)?,
                CMD_FLUSH | CMD_CACHE => {
                    let r = if kind == CMD_FLUSH { e.flush() } else { Ok(()) };
                    self.done(cookie, r)?
                }
                CMD_WRITE | CMD_WRITE_ZEROES | CMD_TRIM => {
                    if kind == CMD_WRITE && len > MAX_REQUEST {
                        return Err(NbdError::Protocol(format!("write of {len} bytes")));
                    }
                    if kind == CMD_WRITE {
                        buf.resize(len as usize, 0);
                        self.s.read_exact(&mut buf)?;
                    }
                    if !e.writable() {
                        self.fail(cookie, EPERM, "the export is read-only")?;
                    } else if !in_range {
                        self.fail(cookie, EINVAL, "write beyond the end of the export")?;
                    } else {
                        let r = match kind {
                            CMD_WRITE => e.write_at(offset, &buf),
                            // Trimmed blocks read back as zeros.
                            _ => e.write_zeroes(offset, len as u64),
                        };
                        self.done(cookie, r)?
                    }
                }
                _ => self.fail(cookie, EINVAL, "command not supported")?,
            }
        }
    }
}

/// Serves one client connection until it disconnects.
pub fn serve_connection<S: Read + Write>(stream: S, exports: &dyn Exports) -> Result<(), NbdError> {
    let mut c = Conn {
        s: stream,
        exports,
        structured: false,
        meta: false,
    };
    let Some(e) = c.handshake()? else {
        return Ok(());
    };
    let mut c = Conn {
        s: Buffered {
            inner: c.s,
            out: Vec::with_capacity(256 << 10),
        },
        exports,
        structured: c.structured,
        meta: c.meta,
    };
    let r = c.transmit(e);
    let _ = c.s.flush();
    // What a client wrote is made durable when it leaves, flush or not.
    let f = e.flush();
    r?;
    Ok(f?)
}

/// Buffers replies and sends them when the server next waits for a
/// request (or the buffer is full): one write per burst, not per field.
struct Buffered<S> {
    inner: S,
    out: Vec<u8>,
}

impl<S: Read + Write> Read for Buffered<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.flush()?;
        self.inner.read(buf)
    }
}

impl<S: Write> Write for Buffered<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.out.len() + buf.len() > 256 << 10 {
            self.flush()?;
            if buf.len() > 256 << 10 {
                return self.inner.write(buf);
            }
        }
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.inner.write_all(&self.out)?;
            self.out.clear();
        }
        self.inner.flush()
    }
}
