//! An NBD client: what a backup needs to read a disk exported by QEMU
//! (`qemu-nbd`, `qemu-storage-daemon`, a running VM's `nbd-server-add`)
//! or any other server, and what a restore needs to write one.
//!
//! It speaks the fixed newstyle handshake with `NBD_OPT_GO`, structured
//! replies and metadata contexts (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`), and in transmission `READ`, `WRITE`,
//! `WRITE_ZEROES`, `FLUSH` and `BLOCK_STATUS`, with several requests in
//! flight on one connection ([`Client::run`]). One [`Client`] is one
//! connection, used by one thread at a time; open several for parallel
//! readers.
//!
//! Why not libnbd's Rust bindings: they are not published as a crate (they
//! live in libnbd's source tree, 1.18 and later), and the libnbd that
//! Debian 12 ships (1.14) has none; this client needs only the commands
//! above and shares its constants with the server beside it.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::*;

/// Where an NBD export is: the URI forms of the NBD spec (and libnbd).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uri {
    pub address: Address,
    /// The export name ("" = the server's default export).
    pub export: String,
    /// `nbds://` and `nbds+unix://`: TLS after `NBD_OPT_STARTTLS`.
    pub tls: Option<Tls>,
}

/// How an `nbds://` connection trusts its server, in libnbd's URI terms:
/// `?tls-certificates=DIR` names a directory laid out as QEMU's x509
/// credentials are (`ca-cert.pem`, and `client-cert.pem` with
/// `client-key.pem` when the server asks for a client certificate, as
/// QEMU's `verify-peer=on` does); `&tls-hostname=NAME` is the name the
/// server's certificate must carry (the host, or `localhost` for a Unix
/// socket, by default).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tls {
    pub certificates: PathBuf,
    pub hostname: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// `nbd://HOST[:PORT]/EXPORT` (port 10809 by default).
    Tcp { host: String, port: u16 },
    /// `nbd+unix:///EXPORT?socket=PATH`.
    Unix(PathBuf),
}

/// The NBD port the IANA assigned.
pub const DEFAULT_PORT: u16 = 10809;

impl Uri {
    /// Whether `s` looks like an NBD URI (so a path is never mistaken for one).
    pub fn is_uri(s: &str) -> bool {
        s.starts_with("nbd://")
            || s.starts_with("nbd+unix://")
            || s.starts_with("nbds://")
            || s.starts_with("nbds+unix://")
    }

    /// Parses `nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`,
    /// and their TLS forms `nbds://…?tls-certificates=DIR` and
    /// `nbds+unix://…&tls-certificates=DIR` (see [`Tls`]).
    pub fn parse(s: &str) -> Result<Uri, ClientError> {
        let bad = |why: &str| ClientError::BadUri {
            uri: s.to_string(),
            why: why.to_string(),
        };
        let (plain, tls) = match (s.strip_prefix("nbds://"), s.strip_prefix("nbds+unix://")) {
            (Some(rest), _) => (format!("nbd://{rest}"), true),
            (_, Some(rest)) => (format!("nbd+unix://{rest}"), true),
            _ => (s.to_string(), false),
        };
        // The TLS parameters leave the query; what is left parses as the
        // plain form does.
        let (head, query) = plain.split_once('?').unwrap_or((&plain, ""));
        let mut certificates = None;
        let mut hostname = None;
        let mut rest = Vec::new();
        for kv in query.split('&').filter(|kv| !kv.is_empty()) {
            match kv.split_once('=') {
                Some(("tls-certificates", v)) => certificates = Some(v),
                Some(("tls-hostname", v)) => hostname = Some(v),
                _ => rest.push(kv),
            }
        }
        if !tls && (certificates.is_some() || hostname.is_some()) {
            return Err(bad(
                "TLS parameters need the nbds:// or nbds+unix:// scheme",
            ));
        }
        let plain = if rest.is_empty() {
            head.to_string()
        } else {
            format!("{head}?{}", rest.join("&"))
        };
        let mut uri = Uri::parse_plain(&plain, s)?;
        if tls {
            let dir = certificates.ok_or_else(|| {
                bad("nbds:// needs ?tls-certificates=DIR, a directory holding the server's CA as ca-cert.pem")
            })?;
            let dir = percent_decode(dir).ok_or_else(|| bad("bad %-escape in tls-certificates"))?;
            let hostname = match (hostname, &uri.address) {
                (Some(h), _) => {
                    percent_decode(h).ok_or_else(|| bad("bad %-escape in tls-hostname"))?
                }
                (None, Address::Tcp { host, .. }) => host.clone(),
                (None, Address::Unix(_)) => "localhost".to_string(),
            };
            uri.tls = Some(Tls {
                certificates: PathBuf::from(dir),
                hostname,
            });
        }
        Ok(uri)
    }

    /// [`Uri::parse`] of a plain form; errors name `given`.
    fn parse_plain(s: &str, given: &str) -> Result<Uri, ClientError> {
        let bad = |why: &str| ClientError::BadUri {
            uri: given.to_string(),
            why: why.to_string(),
        };
        if let Some(rest) = s.strip_prefix("nbd+unix://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.is_empty() && !path.starts_with('/') {
                return Err(bad(
                    "a Unix socket URI has no host: write nbd+unix:///EXPORT?socket=PATH",
                ));
            }
            let export = percent_decode(path.strip_prefix('/').unwrap_or(path))
                .ok_or_else(|| bad("bad %-escape in the export name"))?;
            let socket = query
                .split('&')
                .find_map(|kv| kv.strip_prefix("socket="))
                .ok_or_else(|| bad("no socket: write nbd+unix:///EXPORT?socket=PATH"))?;
            let socket =
                percent_decode(socket).ok_or_else(|| bad("bad %-escape in the socket path"))?;
            if socket.is_empty() {
                return Err(bad("empty socket path"));
            }
            return Ok(Uri {
                address: Address::Unix(PathBuf::from(socket)),
                export,
                tls: None,
            });
        }
        let Some(rest) = s.strip_prefix("nbd://") else {
            return Err(bad(
                "not an NBD URI: write nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH",
            ));
        };
        if rest.contains('?') {
            return Err(bad(
                "query options other than tls-certificates and tls-hostname are not supported",
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in the host"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(bad("no host: write nbd://HOST[:PORT]/EXPORT"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .map_err(|_| bad("the port is not a number from 1 to 65535"))?,
            None => DEFAULT_PORT,
        };
        let export = percent_decode(path).ok_or_else(|| bad("bad %-escape in the export name"))?;
        Ok(Uri {
            address: Address::Tcp {
                host: host.to_string(),
                port,
            },
            export,
            tls: None,
        })
    }
}

impl std::fmt::Display for Uri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = if self.tls.is_some() { "s" } else { "" };
        match &self.address {
            Address::Tcp { host, port } if host.contains(':') => {
                write!(f, "nbd{s}://[{host}]:{port}/{}", self.export)
            }
            Address::Tcp { host, port } => write!(f, "nbd{s}://{host}:{port}/{}", self.export),
            Address::Unix(p) => write!(f, "nbd{s}+unix:///{}?socket={}", self.export, p.display()),
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The server's message with an error reply, or its number.
fn refusal(kind: u32, data: &[u8]) -> String {
    let msg = String::from_utf8_lossy(data).into_owned();
    if msg.is_empty() {
        format!("error {}", kind.wrapping_sub(1 << 31))
    } else {
        msg
    }
}

/// What can go wrong talking to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{uri}: {why}")]
    BadUri { uri: String, why: String },
    #[error("cannot connect: {0}")]
    Connect(io::Error),
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the server broke the protocol: {0}")]
    Protocol(String),
    /// TLS (`nbds://`) could not be set up or its handshake failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// The server refused an option during the handshake.
    #[error("the server refused {what}: {msg}")]
    Refused { what: String, msg: String },
    /// The server answered a command with an error.
    #[error("the server failed {what} at byte {offset}: {msg} (errno {errno})")]
    Command {
        what: &'static str,
        offset: u64,
        errno: u32,
        msg: String,
    },
}

impl ClientError {
    /// As an I/O error (for callers whose interface speaks `io::Error`).
    pub fn into_io(self) -> io::Error {
        match self {
            ClientError::Io(e) | ClientError::Connect(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }
}

/// The connection's stream.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// TLS over one of the others, after `NBD_OPT_STARTTLS`.
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, Stream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
            // Every write leaves as records at once: requests are read and
            // answered while the next are being written.
            Stream::Tls(s) => {
                let n = s.write(buf)?;
                s.flush()?;
                Ok(n)
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tls(s) => s.flush(),
            _ => Ok(()),
        }
    }
}

impl Stream {
    fn set_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Tls(s) => s.sock.set_timeout(t),
        }
    }
}

/// The rustls configuration for `tls`: the CA of its directory, and its
/// client certificate when it holds one. An error says which file.
fn tls_config(tls: &Tls) -> Result<rustls::ClientConfig, ClientError> {
    let dir = &tls.certificates;
    let bad =
        |file: &str, why: String| ClientError::Tls(format!("{}: {why}", dir.join(file).display()));
    let pem = |file: &str| std::fs::read(dir.join(file)).map_err(|e| bad(file, e.to_string()));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut &pem("ca-cert.pem")?[..]) {
        let cert = cert.map_err(|e| bad("ca-cert.pem", e.to_string()))?;
        roots
            .add(cert)
            .map_err(|e| bad("ca-cert.pem", e.to_string()))?;
    }
    if roots.is_empty() {
        return Err(bad("ca-cert.pem", "holds no PEM certificate".into()));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(format!("TLS setup: {e}")))?
        .with_root_certificates(roots);
    if !dir.join("client-cert.pem").exists() {
        return Ok(builder.with_no_client_auth());
    }
    let certs = rustls_pemfile::certs(&mut &pem("client-cert.pem")?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad("client-cert.pem", e.to_string()))?;
    let key = rustls_pemfile::private_key(&mut &pem("client-key.pem")?[..])
        .map_err(|e| bad("client-key.pem", e.to_string()))?
        .ok_or_else(|| bad("client-key.pem", "holds no PEM private key".into()))?;
    builder
        .with_client_auth_cert(certs, key)
        .map_err(|e| bad("client-cert.pem", e.to_string()))
}

/// The flag of a `qemu:dirty-bitmap:NAME` extent that was written since
/// the bitmap was cleared.
pub const STATE_DIRTY: u32 = 1;

/// One command of a batch sent with [`Client::run`].
pub enum Command<'a> {
    /// Fills the buffer with the bytes at the offset.
    Read(u64, &'a mut [u8]),
    Write(u64, &'a [u8]),
    /// Zeroes `len` bytes at the offset (holes where the server can).
    WriteZeroes(u64, u64),
    Flush,
}

/// How long a server may stay silent before the connection is given up.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Requests in flight at once on one connection.
const WINDOW: usize = 16;

/// Largest read or write sent as one request (QEMU accepts 32 MiB).
pub const MAX_IO: usize = 4 << 20;

/// Largest range one block status request asks about (1 GiB).
pub const STATUS_SPAN: u64 = 1 << 30;

/// One connection to one export, after the handshake.
pub struct Client {
    s: Stream,
    size: u64,
    flags: u16,
    /// Metadata contexts the server agreed to, by name.
    contexts: HashMap<String, u32>,
    cookie: u64,
}

impl Client {
    /// Connects to `uri` and negotiates structured replies, the metadata
    /// `contexts` (those the server does not know are left out: see
    /// [`Client::context`]) and the export. `timeout` bounds every wait for
    /// the server.
    pub fn connect(uri: &Uri, contexts: &[&str], timeout: Duration) -> Result<Client, ClientError> {
        let mut c = Client::open(uri, timeout)?;
        c.handshake(&uri.export, contexts)?;
        Ok(c)
    }

    /// The metadata contexts the server offers on `uri`'s export for
    /// `query` (`NBD_OPT_LIST_META_CONTEXT`; `qemu:dirty-bitmap:` lists
    /// QEMU's exported bitmaps), on a connection of its own that is then
    /// given up (`NBD_OPT_ABORT`). A server that cannot list gives none.
    pub fn list_contexts(
        uri: &Uri,
        query: &str,
        timeout: Duration,
    ) -> Result<Vec<String>, ClientError> {
        let mut c = Client::open(uri, timeout)?;
        let export = uri.export.as_bytes();
        let mut b = (export.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(export);
        b.extend_from_slice(&1u32.to_be_bytes());
        b.extend_from_slice(&(query.len() as u32).to_be_bytes());
        b.extend_from_slice(query.as_bytes());
        c.option(OPT_LIST_META_CONTEXT, &b)?;
        let mut names = Vec::new();
        // One reply per context, then ACK (or an error): 4096 is far more
        // than any export has bitmaps.
        for _ in 0..4096 {
            let (kind, data) = c.option_reply(OPT_LIST_META_CONTEXT)?;
            match kind {
                REP_META_CONTEXT if data.len() >= 4 => {
                    names.push(String::from_utf8_lossy(&data[4..]).into_owned());
                }
                REP_ACK => break,
                k if k >= (1 << 31) => break,
                _ => return Err(ClientError::Protocol("bad meta context reply".into())),
            }
        }
        let _ = c.option(OPT_ABORT, &[]);
        Ok(names)
    }

    /// A connection to `uri`'s server after the greeting (and TLS), before
    /// any option about the export.
    fn open(uri: &Uri, timeout: Duration) -> Result<Client, ClientError> {
        let s = match &uri.address {
            Address::Tcp { host, port } => {
                use std::net::ToSocketAddrs;
                let addrs: Vec<_> = (host.as_str(), *port)
                    .to_socket_addrs()
                    .map_err(ClientError::Connect)?
                    .collect();
                let mut last = io::Error::new(io::ErrorKind::NotFound, "no address for the host");
                let mut found = None;
                for a in addrs {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                let s = found.ok_or(ClientError::Connect(last))?;
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            Address::Unix(p) => Stream::Unix(UnixStream::connect(p).map_err(ClientError::Connect)?),
        };
        s.set_timeout(Some(timeout))?;
        let mut c = Client {
            s,
            size: 0,
            flags: 0,
            contexts: HashMap::new(),
            cookie: 0,
        };
        c.hello()?;
        if let Some(tls) = &uri.tls {
            c = c.start_tls(tls)?;
        }
        Ok(c)
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake: everything after it,
    /// the export's name included, goes encrypted.
    fn start_tls(mut self, tls: &Tls) -> Result<Client, ClientError> {
        let config = tls_config(tls)?;
        self.option(OPT_STARTTLS, &[])?;
        let (kind, data) = self.option_reply(OPT_STARTTLS)?;
        if kind != REP_ACK {
            return Err(ClientError::Refused {
                what: "TLS (NBD_OPT_STARTTLS)".into(),
                msg: refusal(kind, &data),
            });
        }
        let name = rustls::pki_types::ServerName::try_from(tls.hostname.clone())
            .map_err(|e| ClientError::Tls(format!("tls-hostname {:?}: {e}", tls.hostname)))?;
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let Client {
            s,
            size,
            flags,
            contexts,
            cookie,
        } = self;
        let mut s = Stream::Tls(Box::new(rustls::StreamOwned::new(conn, s)));
        // Complete the handshake now, so a certificate the client refuses
        // (or the server refuses) is reported as such.
        if let Stream::Tls(t) = &mut s {
            while t.conn.is_handshaking() {
                t.conn.complete_io(&mut t.sock).map_err(|e| {
                    ClientError::Tls(format!("handshake with the server failed: {e}"))
                })?;
            }
        }
        Ok(Client {
            s,
            size,
            flags,
            contexts,
            cookie,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server refuses writes.
    pub fn read_only(&self) -> bool {
        self.flags & TFLAG_READ_ONLY != 0
    }

    /// Whether the server says several connections see the same data.
    pub fn multi_conn(&self) -> bool {
        self.flags & TFLAG_CAN_MULTI_CONN != 0
    }

    /// Whether the server takes `WRITE_ZEROES`.
    pub fn can_write_zeroes(&self) -> bool {
        self.flags & TFLAG_SEND_WRITE_ZEROES != 0
    }

    /// Whether metadata context `name` was agreed on.
    pub fn context(&self, name: &str) -> bool {
        self.contexts.contains_key(name)
    }

    fn option(&mut self, opt: u32, data: &[u8]) -> io::Result<()> {
        let mut b = Vec::with_capacity(16 + data.len());
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b)
    }

    /// Reads one option reply: `(type, data)`.
    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        let magic = u64::from_be_bytes(h[..8].try_into().expect("8"));
        let got = u32::from_be_bytes(h[8..12].try_into().expect("4"));
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        if magic != REPLY_MAGIC || got != opt {
            return Err(ClientError::Protocol("bad option reply".into()));
        }
        if len > 64 << 10 {
            return Err(ClientError::Protocol(format!(
                "option reply of {len} bytes"
            )));
        }
        let mut data = vec![0u8; len as usize];
        self.s.read_exact(&mut data)?;
        Ok((kind, data))
    }

    /// The server's greeting and the client's flags.
    fn hello(&mut self) -> Result<(), ClientError> {
        let mut hello = [0u8; 18];
        self.s.read_exact(&mut hello)?;
        if u64::from_be_bytes(hello[..8].try_into().expect("8")) != NBDMAGIC {
            return Err(ClientError::Protocol("not an NBD server".into()));
        }
        if u64::from_be_bytes(hello[8..16].try_into().expect("8")) != IHAVEOPT {
            return Err(ClientError::Protocol(
                "the server speaks only the oldstyle handshake".into(),
            ));
        }
        let flags = u16::from_be_bytes(hello[16..18].try_into().expect("2"));
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol(
                "the server does not speak the fixed newstyle handshake".into(),
            ));
        }
        let mut cf = FLAG_FIXED_NEWSTYLE as u32;
        if flags & FLAG_NO_ZEROES != 0 {
            cf |= CLIENT_NO_ZEROES;
        }
        self.s.write_all(&cf.to_be_bytes())?;
        Ok(())
    }

    /// Option haggling after [`Client::hello`] (and TLS): structured
    /// replies, metadata contexts, the export.
    fn handshake(&mut self, export: &str, contexts: &[&str]) -> Result<(), ClientError> {
        // Structured replies: holes come back as hole chunks, and block
        // status needs them.
        self.option(OPT_STRUCTURED_REPLY, &[])?;
        let (kind, data) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        if kind == REP_ERR_TLS_REQD {
            return Err(ClientError::Refused {
                what: "a connection without TLS".into(),
                msg: "it requires TLS: use nbds://HOST[:PORT]/EXPORT?tls-certificates=DIR".into(),
            });
        }
        let structured = kind == REP_ACK;
        if !structured && kind < (1 << 31) {
            return Err(ClientError::Protocol(format!(
                "unexpected reply {kind} to STRUCTURED_REPLY ({})",
                String::from_utf8_lossy(&data)
            )));
        }
        if structured && !contexts.is_empty() {
            let mut b = (export.len() as u32).to_be_bytes().to_vec();
            b.extend_from_slice(export.as_bytes());
            b.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for q in contexts {
                b.extend_from_slice(&(q.len() as u32).to_be_bytes());
                b.extend_from_slice(q.as_bytes());
            }
            self.option(OPT_SET_META_CONTEXT, &b)?;
            for _ in 0..=contexts.len() {
                let (kind, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match kind {
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes(data[..4].try_into().expect("4"));
                        let name = String::from_utf8_lossy(&data[4..]).into_owned();
                        self.contexts.insert(name, id);
                    }
                    REP_ACK => break,
                    // A server that knows no metadata contexts: no map, all data.
                    k if k >= (1 << 31) => break,
                    _ => return Err(ClientError::Protocol("bad meta context reply".into())),
                }
            }
        }
        let mut b = (export.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(export.as_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &b)?;
        let mut have = false;
        // Each INFO reply is one message; 64 of them is far more than any
        // server sends.
        for _ in 0..64 {
            let (kind, data) = self.option_reply(OPT_GO)?;
            match kind {
                REP_INFO if u16_at(&data, 0) == Some(INFO_EXPORT) && data.len() >= 12 => {
                    self.size = u64::from_be_bytes(data[2..10].try_into().expect("8"));
                    self.flags = u16::from_be_bytes(data[10..12].try_into().expect("2"));
                    have = true;
                }
                REP_ACK if have => return Ok(()),
                REP_ACK => {
                    return Err(ClientError::Protocol(
                        "GO succeeded without telling the export's size".into(),
                    ))
                }
                k if k >= (1 << 31) => {
                    return Err(ClientError::Refused {
                        what: format!("export {export:?}"),
                        msg: refusal(k, &data),
                    });
                }
                _ => {}
            }
        }
        Err(ClientError::Protocol("endless GO replies".into()))
    }

    fn send(
        &mut self,
        kind: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> io::Result<u64> {
        self.cookie += 1;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&kind.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        self.s.write_all(&h)?;
        if !data.is_empty() {
            self.s.write_all(data)?;
        }
        Ok(self.cookie)
    }

    /// Runs `commands` with up to 16 in flight; reads and writes longer
    /// than 4 MiB are split. Returns when all have completed, or with the
    /// first error (the connection is then best dropped).
    pub fn run(&mut self, commands: &mut [Command<'_>]) -> Result<(), ClientError> {
        // Split into requests: (command index, offset within it, length).
        let mut reqs: Vec<(usize, usize, usize)> = Vec::new();
        for (i, c) in commands.iter().enumerate() {
            let len = match c {
                Command::Read(_, b) => b.len(),
                Command::Write(_, d) => d.len(),
                Command::WriteZeroes(..) | Command::Flush => {
                    reqs.push((i, 0, 0));
                    continue;
                }
            };
            let mut at = 0;
            while at < len {
                let n = (len - at).min(MAX_IO);
                reqs.push((i, at, n));
                at += n;
            }
        }
        let mut inflight: HashMap<u64, (usize, usize, usize)> = HashMap::new();
        let mut next = 0;
        while next < reqs.len() || !inflight.is_empty() {
            while next < reqs.len() && inflight.len() < WINDOW {
                let (i, at, n) = reqs[next];
                let cookie = match &commands[i] {
                    Command::Read(off, _) => {
                        self.send(CMD_READ, 0, off + at as u64, n as u32, &[])?
                    }
                    Command::Write(off, d) => {
                        self.send(CMD_WRITE, 0, off + at as u64, n as u32, &d[at..at + n])?
                    }
                    Command::WriteZeroes(off, len) => {
                        let len = u32::try_from(*len).map_err(|_| {
                            ClientError::Protocol("zeroing more than 4 GiB at once".into())
                        })?;
                        self.send(CMD_WRITE_ZEROES, 0, *off, len, &[])?
                    }
                    Command::Flush => self.send(CMD_FLUSH, 0, 0, 0, &[])?,
                };
                inflight.insert(cookie, (i, at, n));
                next += 1;
            }
            self.receive(commands, &mut inflight)?;
        }
        Ok(())
    }

    /// Reads one reply (all chunks of a structured one) and completes its
    /// request.
    fn receive(
        &mut self,
        commands: &mut [Command<'_>],
        inflight: &mut HashMap<u64, (usize, usize, usize)>,
    ) -> Result<(), ClientError> {
        // A reply ends with a chunk flagged done; bound the chunks a
        // request may take (a 4 MiB read at one chunk per 512 bytes).
        for _ in 0..(2 * MAX_IO / 512 + 2) {
            let mut m = [0u8; 4];
            self.s.read_exact(&mut m)?;
            let magic = u32::from_be_bytes(m);
            if magic == SIMPLE_REPLY_MAGIC {
                let mut h = [0u8; 12];
                self.s.read_exact(&mut h)?;
                let errno = u32::from_be_bytes(h[..4].try_into().expect("4"));
                let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                let (i, at, n) = inflight
                    .remove(&cookie)
                    .ok_or_else(|| ClientError::Protocol("reply to no request".into()))?;
                if errno != 0 {
                    return Err(command_error(&commands[i], at, errno, String::new()));
                }
                if let Command::Read(_, b) = &mut commands[i] {
                    self.s.read_exact(&mut b[at..at + n])?;
                }
                return Ok(());
            }
            if magic != STRUCTURED_REPLY_MAGIC {
                return Err(ClientError::Protocol("bad reply magic".into()));
            }
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h)?;
            let flags = u16::from_be_bytes(h[0..2].try_into().expect("2"));
            let kind = u16::from_be_bytes(h[2..4].try_into().expect("2"));
            let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
            let len = u32::from_be_bytes(h[12..16].try_into().expect("4")) as usize;
            let &(i, at, n) = inflight
                .get(&cookie)
                .ok_or_else(|| ClientError::Protocol("reply to no request".into()))?;
            let base = match &commands[i] {
                Command::Read(off, _) => off + at as u64,
                _ => 0,
            };
            match kind {
                REPLY_OFFSET_DATA => {
                    let mut o = [0u8; 8];
                    self.s.read_exact(&mut o)?;
                    let off = u64::from_be_bytes(o);
                    let dlen = len
                        .checked_sub(8)
                        .ok_or_else(|| ClientError::Protocol("short data chunk".into()))?;
                    let Command::Read(_, b) = &mut commands[i] else {
                        return Err(ClientError::Protocol(
                            "data for a request that reads none".into(),
                        ));
                    };
                    let from = off
                        .checked_sub(base)
                        .filter(|f| f + dlen as u64 <= n as u64)
                        .ok_or_else(|| {
                            ClientError::Protocol("data chunk outside its read".into())
                        })? as usize;
                    self.s.read_exact(&mut b[at + from..at + from + dlen])?;
                }
                REPLY_OFFSET_HOLE => {
                    let mut p = [0u8; 12];
                    if len != 12 {
                        return Err(ClientError::Protocol("bad hole chunk".into()));
                    }
                    self.s.read_exact(&mut p)?;
                    let off = u64::from_be_bytes(p[..8].try_into().expect("8"));
                    let hlen = u32::from_be_bytes(p[8..12].try_into().expect("4")) as u64;
                    let Command::Read(_, b) = &mut commands[i] else {
                        return Err(ClientError::Protocol(
                            "hole for a request that reads none".into(),
                        ));
                    };
                    let from = off
                        .checked_sub(base)
                        .filter(|f| f + hlen <= n as u64)
                        .ok_or_else(|| {
                            ClientError::Protocol("hole chunk outside its read".into())
                        })? as usize;
                    b[at + from..at + from + hlen as usize].fill(0);
                }
                REPLY_NONE => {
                    if len != 0 {
                        return Err(ClientError::Protocol("NONE chunk with a payload".into()));
                    }
                }
                k if k & (1 << 15) != 0 => {
                    if len > 64 << 10 {
                        return Err(ClientError::Protocol("huge error chunk".into()));
                    }
                    let mut p = vec![0u8; len];
                    self.s.read_exact(&mut p)?;
                    let errno = u32_at(&p, 0).unwrap_or(EIO);
                    let ml = u16_at(&p, 4).unwrap_or(0) as usize;
                    let msg = String::from_utf8_lossy(p.get(6..6 + ml).unwrap_or(&[])).into_owned();
                    inflight.remove(&cookie);
                    return Err(command_error(&commands[i], at, errno, msg));
                }
                _ => {
                    // Unknown non-error chunk: skip its payload.
                    if len > MAX_IO + 64 {
                        return Err(ClientError::Protocol("huge unknown chunk".into()));
                    }
                    let mut p = vec![0u8; len];
                    self.s.read_exact(&mut p)?;
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                inflight.remove(&cookie);
                return Ok(());
            }
        }
        Err(ClientError::Protocol("a reply of endless chunks".into()))
    }

    /// The extents of metadata context `context` from `offset` on, for at
    /// most `len` bytes: `(length, flags)` in order, covering at least one
    /// byte (servers may answer for less than asked; ask again from where
    /// the answer ends). Empty when the context was not agreed on.
    pub fn block_status(
        &mut self,
        context: &str,
        offset: u64,
        len: u32,
    ) -> Result<Vec<(u64, u32)>, ClientError> {
        let Some(&id) = self.contexts.get(context) else {
            return Ok(Vec::new());
        };
        let cookie = self.send(CMD_BLOCK_STATUS, 0, offset, len, &[])?;
        let mut out = Vec::new();
        // One chunk per agreed context, then done.
        for _ in 0..=self.contexts.len() + 1 {
            let (got, done) = self.status_chunk(id, offset, &mut out)?;
            if got != cookie {
                return Err(ClientError::Protocol("bad block status reply".into()));
            }
            if done {
                if out.is_empty() {
                    return Err(ClientError::Protocol("empty block status reply".into()));
                }
                return Ok(out);
            }
        }
        Err(ClientError::Protocol(
            "a block status reply of endless chunks".into(),
        ))
    }

    /// Every extent of metadata context `context` in `from..end`, as
    /// `(offset, length, flags)` in order, covering the range exactly:
    /// block status requests of at most [`STATUS_SPAN`] bytes, up to 16 in
    /// flight, each asked again from where a short answer ended. Empty
    /// when the context was not agreed on.
    pub fn block_status_range(
        &mut self,
        context: &str,
        from: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64, u32)>, ClientError> {
        let Some(&id) = self.contexts.get(context) else {
            return Ok(Vec::new());
        };
        let end = end.min(self.size);
        let mut pending: std::collections::VecDeque<(u64, u64)> = Default::default();
        let mut at = from;
        while at < end {
            let n = (end - at).min(STATUS_SPAN);
            pending.push_back((at, n));
            at += n;
        }
        /// A request in flight: offset, length asked, extents so far.
        type Asked = (u64, u64, Vec<(u64, u32)>);
        let mut inflight: HashMap<u64, Asked> = HashMap::new();
        let mut out: Vec<(u64, u64, u32)> = Vec::new();
        let mut chunks = 0u64;
        while !pending.is_empty() || !inflight.is_empty() {
            while inflight.len() < WINDOW {
                let Some((o, n)) = pending.pop_front() else {
                    break;
                };
                let cookie = self.send(CMD_BLOCK_STATUS, 0, o, n as u32, &[])?;
                inflight.insert(cookie, (o, n, Vec::new()));
            }
            chunks += 1;
            if chunks > 1 << 24 {
                return Err(ClientError::Protocol(
                    "block status replies that do not end".into(),
                ));
            }
            let mut got = Vec::new();
            let (cookie, done) = self.status_chunk(id, from, &mut got)?;
            let Some(req) = inflight.get_mut(&cookie) else {
                return Err(ClientError::Protocol(
                    "a block status reply to no request".into(),
                ));
            };
            req.2.extend(got);
            if done {
                let (o, n, extents) = inflight.remove(&cookie).expect("in flight");
                if extents.is_empty() {
                    return Err(ClientError::Protocol("empty block status reply".into()));
                }
                let mut pos = o;
                for (l, f) in extents {
                    if pos >= o + n {
                        break;
                    }
                    let e = (pos + l).min(o + n);
                    out.push((pos, e - pos, f));
                    pos = e;
                }
                if pos < o + n {
                    pending.push_front((pos, o + n - pos));
                }
            }
        }
        out.sort_unstable_by_key(|e| e.0);
        Ok(out)
    }

    /// Reads one structured reply chunk of a block status request; the
    /// extents of context `id` are appended to `out`. Returns the request's
    /// cookie and whether the reply is done (a done reply without extents,
    /// or with an empty one, is refused).
    fn status_chunk(
        &mut self,
        id: u32,
        offset: u64,
        out: &mut Vec<(u64, u32)>,
    ) -> Result<(u64, bool), ClientError> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h)?;
        let magic = u32::from_be_bytes(h[..4].try_into().expect("4"));
        if magic == SIMPLE_REPLY_MAGIC {
            let errno = u32::from_be_bytes(h[4..8].try_into().expect("4"));
            return Err(ClientError::Command {
                what: "block status",
                offset,
                errno,
                msg: String::new(),
            });
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(ClientError::Protocol("bad block status reply".into()));
        }
        let cookie = u64::from_be_bytes(h[8..16].try_into().expect("8"));
        let flags = u16::from_be_bytes(h[4..6].try_into().expect("2"));
        let kind = u16::from_be_bytes(h[6..8].try_into().expect("2"));
        let plen = u32::from_be_bytes(h[16..20].try_into().expect("4")) as usize;
        if plen > 8 << 20 {
            return Err(ClientError::Protocol("huge block status reply".into()));
        }
        let mut p = vec![0u8; plen];
        self.s.read_exact(&mut p)?;
        match kind {
            REPLY_BLOCK_STATUS => {
                if u32_at(&p, 0) == Some(id) {
                    let before = out.len();
                    for e in p[4..].chunks_exact(8) {
                        let l = u32::from_be_bytes(e[..4].try_into().expect("4")) as u64;
                        let f = u32::from_be_bytes(e[4..].try_into().expect("4"));
                        out.push((l, f));
                    }
                    if out.len() == before || out[before..].iter().any(|e| e.0 == 0) {
                        return Err(ClientError::Protocol("empty block status extent".into()));
                    }
                }
            }
            REPLY_NONE => {}
            k if k & (1 << 15) != 0 => {
                let errno = u32_at(&p, 0).unwrap_or(EIO);
                let ml = u16_at(&p, 4).unwrap_or(0) as usize;
                return Err(ClientError::Command {
                    what: "block status",
                    offset,
                    errno,
                    msg: String::from_utf8_lossy(p.get(6..6 + ml).unwrap_or(&[])).into_owned(),
                });
            }
            _ => {
                return Err(ClientError::Protocol(
                    "unexpected block status chunk".into(),
                ))
            }
        }
        let done = flags & REPLY_FLAG_DONE != 0;
        Ok((cookie, done))
    }

    /// Ends the session politely (`NBD_CMD_DISC`).
    pub fn disconnect(mut self) {
        let _ = self.send(CMD_DISC, 0, 0, 0, &[]);
    }
}

fn command_error(c: &Command<'_>, at: usize, errno: u32, msg: String) -> ClientError {
    let (what, offset) = match c {
        Command::Read(o, _) => ("a read", o + at as u64),
        Command::Write(o, _) => ("a write", o + at as u64),
        Command::WriteZeroes(o, _) => ("zeroing", *o),
        Command::Flush => ("a flush", 0),
    };
    let msg = if msg.is_empty() {
        match errno {
            EPERM => "operation not permitted".into(),
            EIO => "input/output error".into(),
            EINVAL => "invalid argument".into(),
            28 => "no space left".into(),
            _ => "error".into(),
        }
    } else {
        msg
    };
    ClientError::Command {
        what,
        offset,
        errno,
        msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let u = Uri::parse("nbd://127.0.0.1:10810/vm%20disk").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "127.0.0.1".into(),
                port: 10810
            }
        );
        assert_eq!(u.export, "vm disk");
        let u = Uri::parse("nbd://[::1]/x").unwrap();
        assert_eq!(
            u.address,
            Address::Tcp {
                host: "::1".into(),
                port: DEFAULT_PORT
            }
        );
        let u = Uri::parse("nbd://localhost").unwrap();
        assert_eq!(u.export, "");
        let u = Uri::parse("nbd+unix:///disk?socket=/run/a%2Cb.sock").unwrap();
        assert_eq!(u.address, Address::Unix("/run/a,b.sock".into()));
        assert_eq!(u.export, "disk");
        assert!(Uri::parse("nbd+unix:///disk").is_err());
        for tls in ["nbds://host/x", "nbds+unix:///x?socket=/s"] {
            assert!(Uri::is_uri(tls), "{tls} is taken for a path");
            let e = Uri::parse(tls).unwrap_err().to_string();
            assert!(e.contains("needs ?tls-certificates=DIR"), "{e}");
        }
        let u = Uri::parse("nbds://10.0.0.5:10810/vm?tls-certificates=/etc/pki/qemu").unwrap();
        assert_eq!(
            u.tls,
            Some(Tls {
                certificates: PathBuf::from("/etc/pki/qemu"),
                hostname: "10.0.0.5".into()
            })
        );
        assert_eq!(u.export, "vm");
        assert_eq!(u.to_string(), "nbds://10.0.0.5:10810/vm");
        let u = Uri::parse(
            "nbds+unix:///vm?socket=/run/a.sock&tls-certificates=/c&tls-hostname=vmhost",
        )
        .unwrap();
        assert_eq!(u.address, Address::Unix(PathBuf::from("/run/a.sock")));
        assert_eq!(u.tls.as_ref().unwrap().hostname, "vmhost");
        let u = Uri::parse("nbds+unix:///vm?tls-certificates=/c&socket=/run/a.sock").unwrap();
        assert_eq!(u.tls.as_ref().unwrap().hostname, "localhost");
        let e = Uri::parse("nbd://h/x?tls-certificates=/c")
            .unwrap_err()
            .to_string();
        assert!(e.contains("need the nbds://"), "{e}");
        assert!(Uri::parse("nbd://h/x").unwrap().tls.is_none());
        assert!(Uri::parse("nbd://host:99999/x").is_err());
        assert!(Uri::parse("nbd:///x").is_err());
        assert!(Uri::parse("nbds://host/x").is_err());
        assert!(Uri::parse("nbd+unix://host/x?socket=/s").is_err());
    }

    /// The client against this crate's server over a socket pair: reads
    /// with holes, block status, writes refused on a read-only export.
    #[test]
    fn client_against_the_server() {
        use std::sync::Mutex;
        struct Mem(Mutex<Vec<u8>>, bool);
        impl Export for Mem {
            fn size(&self) -> u64 {
                self.0.lock().unwrap().len() as u64
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
                let d = self.0.lock().unwrap();
                buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
                Ok(())
            }
            fn map(&self, offset: u64, len: u64) -> io::Result<Vec<(u64, bool)>> {
                // 64 KiB blocks: zero or not.
                let d = self.0.lock().unwrap();
                let mut out: Vec<(u64, bool)> = Vec::new();
                let mut pos = offset;
                while pos < offset + len {
                    let end = ((pos / 65536 + 1) * 65536).min(offset + len);
                    let z = d[pos as usize..end as usize].iter().all(|b| *b == 0);
                    match out.last_mut() {
                        Some(l) if l.1 == z => l.0 += end - pos,
                        _ => out.push((end - pos, z)),
                    }
                    pos = end;
                }
                Ok(out)
            }
            fn writable(&self) -> bool {
                self.1
            }
            fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
                let mut d = self.0.lock().unwrap();
                d[offset as usize..offset as usize + data.len()].copy_from_slice(data);
                Ok(())
            }
            fn write_zeroes(&self, offset: u64, len: u64) -> io::Result<()> {
                let mut d = self.0.lock().unwrap();
                d[offset as usize..(offset + len) as usize].fill(0);
                Ok(())
            }
        }
        struct One<'a>(&'a Mem);
        impl Exports for One<'_> {
            fn lookup(&self, name: &str) -> Option<&dyn Export> {
                (name == "d").then_some(self.0 as &dyn Export)
            }
            fn list(&self) -> Vec<(String, String)> {
                vec![("d".into(), String::new())]
            }
        }
        for writable in [false, true] {
            let mut data = vec![0u8; 9 << 20];
            for (i, b) in data[100_000..6_000_000].iter_mut().enumerate() {
                *b = (i % 251) as u8 + 1;
            }
            let mem = Mem(Mutex::new(data.clone()), writable);
            let dir =
                std::env::temp_dir().join(format!("nbd-client-{}-{writable}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            let sock = dir.join("s");
            let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
            std::thread::scope(|s| {
                let mem = &mem;
                s.spawn(move || {
                    for _ in 0..2 {
                        let (c, _) = listener.accept().unwrap();
                        let _ = serve_connection(c, &One(mem));
                    }
                });
                let uri = Uri::parse(&format!("nbd+unix:///d?socket={}", sock.display())).unwrap();
                // Listing the contexts takes a connection of its own.
                assert_eq!(
                    Client::list_contexts(&uri, "base:", TIMEOUT).unwrap(),
                    ["base:allocation"]
                );
                let mut c = Client::connect(&uri, &["base:allocation"], TIMEOUT).unwrap();
                assert_eq!(c.size(), 9 << 20);
                assert_eq!(c.read_only(), !writable);
                assert!(c.context("base:allocation"));
                let map = c.block_status("base:allocation", 0, 9 << 20).unwrap();
                assert_eq!(map.iter().map(|e| e.0).sum::<u64>(), 9 << 20);
                assert_eq!(map[0], (65536, STATE_HOLE | STATE_ZERO));
                assert_eq!(map[1].1, 0);
                // The pipelined form answers the same extents, at offsets,
                // exactly covering the range asked (here from inside one).
                let range = c
                    .block_status_range("base:allocation", 4096, 9 << 20)
                    .unwrap();
                assert_eq!(range[0], (4096, 65536 - 4096, STATE_HOLE | STATE_ZERO));
                let mut pos = 4096;
                for e in &range {
                    assert_eq!(e.0, pos);
                    pos += e.1;
                }
                assert_eq!(pos, 9 << 20);
                assert_eq!(range[1].2, 0);
                assert!(c
                    .block_status_range("qemu:dirty-bitmap:x", 0, 4096)
                    .unwrap()
                    .is_empty());
                let mut a = vec![7u8; 5 << 20];
                let mut b = vec![7u8; 1000];
                c.run(&mut [Command::Read(0, &mut a), Command::Read(8 << 20, &mut b)])
                    .unwrap();
                assert_eq!(a, data[..5 << 20]);
                assert!(b.iter().all(|x| *x == 0));
                let w = c.run(&mut [
                    Command::Write(4096, &[9u8; 8192]),
                    Command::WriteZeroes(200_000, 4096),
                    Command::Flush,
                ]);
                if writable {
                    w.unwrap();
                    let mut r = vec![0u8; 300_000];
                    c.run(&mut [Command::Read(0, &mut r)]).unwrap();
                    assert!(r[4096..12288].iter().all(|x| *x == 9));
                    assert!(r[200_000..204_096].iter().all(|x| *x == 0));
                    assert_eq!(r[204_096..], data[204_096..300_000]);
                } else {
                    let e = w.unwrap_err();
                    assert!(
                        matches!(e, ClientError::Command { errno: EPERM, .. }),
                        "{e}"
                    );
                }
                c.disconnect();
            });
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
