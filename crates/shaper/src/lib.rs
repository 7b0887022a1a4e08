//! An emulated WAN link for tests and benchmarks: a TCP proxy on loopback
//! that delays each direction by a fixed one-way latency, optionally caps
//! each direction's throughput, records every byte it forwards with a
//! timestamp, and can *freeze* (a silent dead peer) or *cut* (close
//! everything) the connections passing through it.
//!
//! The kernel of the machines this runs on has no `netem`, so the link is
//! emulated in user space. The model, per direction of each connection:
//!
//! ```text
//!  source socket ──read──► bottleneck (token bucket: bytes leave at ≤ rate,
//!                          shared by every connection of that direction)
//!                 ──► timestamped queue ──released at departure + delay──► write to the other side
//! ```
//!
//! Data is read as soon as it arrives (or as fast as the rate lets it
//! through), stamped, and written once its delay has passed, so any number
//! of bytes can be in flight at once: throughput is not capped by the
//! latency, as it is by a proxy that sleeps after each read. What a real
//! path adds and this one does not: TCP's own window (on loopback the
//! kernel's buffers are never the limit; on a real path they must cover
//! bandwidth × RTT), loss, and reordering.
//!
//! The queue of each direction of a connection holds at most
//! [`Link::queue_bytes`]; past that the shaper stops reading that socket
//! (TCP back-pressure), so memory stays bounded whatever the sender does.
//! With a rate, the shaper's own socket receive buffers are kept small, so
//! a sender's excess waits in its own send buffer (as on a real path), not
//! in a bloated buffer inside the link.
//!
//! # Why these choices
//!
//! * Threads, not an async runtime: four per connection (a reader and a
//!   writer per direction), which is nothing for the few connections an
//!   HTTP/2 client opens, and keeps the timing code plain.
//! * A virtual-finish-time token bucket (each read reserves its slot on
//!   the link and sleeps until then, with at most 20 ms of credit for a
//!   thread that woke late) paces to within one read (at most 5 ms of the
//!   rate) plus that credit, at any rate.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A direction of the link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// From the connecting client to the upstream server.
    Up,
    /// From the upstream server back to the client.
    Down,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
}

/// What the link does to the bytes crossing it.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    /// Added to each direction: half the round-trip time.
    pub delay: Duration,
    /// Most bytes per second from client to server (None: no cap).
    pub rate_up: Option<u64>,
    /// Most bytes per second from server to client (None: no cap).
    pub rate_down: Option<u64>,
    /// Most bytes queued in one direction of one connection before the
    /// shaper stops reading that socket.
    pub queue_bytes: usize,
}

impl Default for Link {
    fn default() -> Link {
        Link {
            delay: Duration::ZERO,
            rate_up: None,
            rate_down: None,
            queue_bytes: 64 << 20,
        }
    }
}

impl Link {
    /// A link with this round-trip time (half of it each way) and no cap.
    pub fn rtt(rtt: Duration) -> Link {
        Link {
            delay: rtt / 2,
            ..Link::default()
        }
    }

    /// The same link with both directions capped at `bytes_per_second`.
    pub fn rate(self, bytes_per_second: u64) -> Link {
        Link {
            rate_up: Some(bytes_per_second),
            rate_down: Some(bytes_per_second),
            ..self
        }
    }

    fn rate_of(&self, dir: Dir) -> Option<u64> {
        match dir {
            Dir::Up => self.rate_up,
            Dir::Down => self.rate_down,
        }
        .filter(|r| *r > 0)
    }
}

/// Bytes forwarded in one direction: `(time since the shaper started,
/// bytes released)`, one entry per piece as it is released to the
/// receiving socket, in time order.
#[derive(Clone, Debug, Default)]
pub struct Traffic(pub Vec<(Duration, u64)>);

impl Traffic {
    /// Every byte forwarded.
    pub fn total(&self) -> u64 {
        self.0.iter().map(|e| e.1).sum()
    }

    /// Only what was forwarded at or after `t`.
    pub fn since(&self, t: Duration) -> Traffic {
        Traffic(self.0.iter().copied().filter(|e| e.0 >= t).collect())
    }

    /// The most bytes forwarded within any window of length `window`
    /// (windows start at each write, so none is missed).
    pub fn peak(&self, window: Duration) -> u64 {
        let e = &self.0;
        let (mut best, mut sum, mut end) = (0, 0, 0);
        for start in 0..e.len() {
            while end < e.len() && e[end].0 < e[start].0 + window {
                sum += e[end].1;
                end += 1;
            }
            best = best.max(sum);
            sum -= e[start].1;
        }
        best
    }

    /// When the first and the last byte were forwarded.
    pub fn span(&self) -> Option<(Duration, Duration)> {
        Some((self.0.first()?.0, self.0.last()?.0))
    }
}

/// A running link: listens on loopback and forwards each connection to
/// the upstream address. Stops (closing every connection) when dropped.
pub struct Shaper {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    upstream: SocketAddr,
    link: Link,
    epoch: Instant,
    stop: AtomicBool,
    /// Ids of connections accepted so far (the next one's id).
    next_conn: AtomicU64,
    /// Connections with a smaller id are frozen.
    frozen_below: AtomicU64,
    /// Connections with a smaller id are cut.
    cut_below: AtomicU64,
    /// New connections are refused until this time (µs since `epoch`).
    refuse_until_us: AtomicU64,
    /// When the bottleneck of each direction is next free.
    pacers: [Mutex<Instant>; 2],
    logs: [Mutex<Vec<(Duration, u64)>>; 2],
}

/// How long a blocked read or write waits before looking at the flags.
const POLL: Duration = Duration::from_millis(20);
/// Largest read.
const READ_MAX: usize = 64 << 10;
/// How far a late sender may catch up on an idle link (a token bucket's
/// depth, in time).
const CREDIT: Duration = Duration::from_millis(20);
/// Accepted connections before the shaper stops accepting (a bound for
/// tests; far more than a benchmark opens).
const MAX_CONNECTIONS: u64 = 1_000_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shaper {
    /// Listens on `127.0.0.1`, any port, and forwards to `upstream`.
    pub fn start(upstream: impl ToSocketAddrs, link: Link) -> std::io::Result<Shaper> {
        Shaper::listen("127.0.0.1:0", upstream, link)
    }

    /// Listens on `listen` and forwards to `upstream`.
    pub fn listen(
        listen: impl ToSocketAddrs,
        upstream: impl ToSocketAddrs,
        link: Link,
    ) -> std::io::Result<Shaper> {
        let upstream = upstream
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "no upstream address"))?;
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let now = Instant::now();
        let shared = Arc::new(Shared {
            upstream,
            link,
            epoch: now,
            stop: AtomicBool::new(false),
            next_conn: AtomicU64::new(0),
            frozen_below: AtomicU64::new(0),
            cut_below: AtomicU64::new(0),
            refuse_until_us: AtomicU64::new(0),
            pacers: [Mutex::new(now), Mutex::new(now)],
            logs: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
        });
        let s = shared.clone();
        let accept = std::thread::Builder::new()
            .name("shaper-accept".into())
            .spawn(move || s.accept_loop(listener))?;
        Ok(Shaper {
            addr,
            shared,
            accept: Some(accept),
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Time since the shaper started (the clock of [`Traffic`]).
    pub fn elapsed(&self) -> Duration {
        self.shared.epoch.elapsed()
    }

    /// Freezes every connection open now: nothing more is forwarded either
    /// way and every socket stays open (no FIN, no RST), as when the peer's
    /// machine loses power or a NAT forgets the connection. Connections
    /// accepted later are forwarded as usual.
    pub fn freeze(&self) {
        let n = self.shared.next_conn.load(SeqCst);
        self.shared.frozen_below.fetch_max(n, SeqCst);
    }

    /// Closes every connection open now (both sockets of each). New
    /// connections are accepted as usual.
    pub fn cut(&self) {
        let n = self.shared.next_conn.load(SeqCst);
        self.shared.cut_below.fetch_max(n, SeqCst);
    }

    /// Closes every connection open now and refuses (accepts and at once
    /// closes) new ones for `d`: a link that is down for a while.
    pub fn cut_for(&self, d: Duration) {
        let until = (self.elapsed() + d).as_micros() as u64;
        self.shared.refuse_until_us.fetch_max(until, SeqCst);
        self.cut();
    }

    /// Connections accepted so far (refused ones included).
    pub fn connections(&self) -> u64 {
        self.shared.next_conn.load(SeqCst)
    }

    /// Everything forwarded in direction `dir` so far.
    pub fn traffic(&self, dir: Dir) -> Traffic {
        Traffic(lock(&self.shared.logs[dir.index()]).clone())
    }

    /// Bytes forwarded in direction `dir` so far.
    pub fn bytes(&self, dir: Dir) -> u64 {
        lock(&self.shared.logs[dir.index()])
            .iter()
            .map(|e| e.1)
            .sum()
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.shared.stop.store(true, SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// One direction of one connection: what was read and waits for its time.
struct Pipe {
    queue: Mutex<PipeState>,
    ready: Condvar,
}

#[derive(Default)]
struct PipeState {
    items: VecDeque<Item>,
    bytes: usize,
}

enum Item {
    /// Bytes to write at the instant.
    Data(Instant, Vec<u8>),
    /// The source closed its side: close the destination's at the instant.
    Eof(Instant),
    /// The source failed: close everything.
    Reset,
}

/// A connection's two sockets and its id.
struct Conn {
    id: u64,
    client: TcpStream,
    upstream: TcpStream,
}

impl Conn {
    fn close(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.upstream.shutdown(Shutdown::Both);
    }
}

impl Shared {
    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        while !self.stop.load(SeqCst) && self.next_conn.load(SeqCst) < MAX_CONNECTIONS {
            let client = match listener.accept() {
                Ok((c, _)) => c,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                }
                Err(_) => {
                    std::thread::sleep(POLL);
                    continue;
                }
            };
            let id = self.next_conn.fetch_add(1, SeqCst);
            if self.epoch.elapsed().as_micros() as u64 <= self.refuse_until_us.load(SeqCst) {
                drop(client);
                continue;
            }
            let s = self.clone();
            let _ = std::thread::Builder::new()
                .name(format!("shaper-conn-{id}"))
                .spawn(move || s.connect(id, client));
        }
    }

    /// Connects connection `id` upstream and runs its four threads.
    fn connect(self: Arc<Self>, id: u64, client: TcpStream) {
        let Ok(upstream) = TcpStream::connect_timeout(&self.upstream, Duration::from_secs(10))
        else {
            return;
        };
        let rated = self.link.rate_up.is_some() || self.link.rate_down.is_some();
        for s in [&client, &upstream] {
            let _ = s.set_nodelay(true);
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(POLL));
            let _ = s.set_write_timeout(Some(POLL));
            if rated {
                // Keep the excess in the sender's buffers, not in the link.
                let _ = socket2::SockRef::from(s).set_recv_buffer_size(128 << 10);
            }
        }
        let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
            return;
        };
        let conn = Arc::new(Conn {
            id,
            client,
            upstream,
        });
        let mut threads = Vec::new();
        for (dir, from, to) in [
            (Dir::Up, c2, conn.upstream.try_clone()),
            (Dir::Down, u2, conn.client.try_clone()),
        ] {
            let Ok(to) = to else {
                conn.close();
                return;
            };
            let pipe = Arc::new(Pipe {
                queue: Mutex::new(PipeState::default()),
                ready: Condvar::new(),
            });
            let (s, c, p) = (self.clone(), conn.clone(), pipe.clone());
            threads.push(std::thread::spawn(move || s.read_side(dir, &c, from, &p)));
            let (s, c) = (self.clone(), conn.clone());
            threads.push(std::thread::spawn(move || s.write_side(dir, &c, to, &pipe)));
        }
        for t in threads {
            let _ = t.join();
        }
        conn.close();
    }

    fn frozen(&self, c: &Conn) -> bool {
        c.id < self.frozen_below.load(SeqCst)
    }

    /// Should connection `c`'s threads end?
    fn over(&self, c: &Conn) -> bool {
        self.stop.load(SeqCst) || c.id < self.cut_below.load(SeqCst)
    }

    /// Reserves the link of `dir` for `n` bytes; returns when they have
    /// passed its bottleneck (now, without a rate).
    fn pace(&self, dir: Dir, n: usize) -> Instant {
        let Some(rate) = self.link.rate_of(dir) else {
            return Instant::now();
        };
        let done = {
            let mut free = lock(&self.pacers[dir.index()]);
            // A sender that was late (this thread scheduled late on a busy
            // machine) may catch up on at most CREDIT of the link: without
            // it every late wake-up is lost for good and the link carries
            // less than its rate; with it, a one-second window carries at
            // most 2% more.
            let now = Instant::now();
            let start = (*free).max(now.checked_sub(CREDIT).unwrap_or(now));
            *free = start + Duration::from_secs_f64(n as f64 / rate as f64);
            *free
        };
        sleep_until(done);
        done
    }

    /// Reads from `from` into `pipe`, stamped with the time to write.
    fn read_side(&self, dir: Dir, c: &Conn, mut from: TcpStream, pipe: &Pipe) {
        // At most 5 ms of the rate per read, so the pacing is smooth.
        let max = match self.link.rate_of(dir) {
            Some(r) => ((r / 200) as usize).clamp(1 << 10, READ_MAX),
            None => READ_MAX,
        };
        let mut buf = vec![0u8; max];
        let push = |item: Item| {
            let mut q = lock(&pipe.queue);
            if let Item::Data(_, d) = &item {
                q.bytes += d.len();
            }
            q.items.push_back(item);
            pipe.ready.notify_all();
        };
        while !self.over(c) {
            if self.frozen(c) {
                std::thread::sleep(POLL);
                continue;
            }
            {
                let q = lock(&pipe.queue);
                if q.bytes >= self.link.queue_bytes {
                    let _ = pipe.ready.wait_timeout(q, POLL);
                    continue;
                }
            }
            match from.read(&mut buf) {
                Ok(0) => {
                    push(Item::Eof(Instant::now() + self.link.delay));
                    return;
                }
                Ok(n) => {
                    let passed = self.pace(dir, n);
                    push(Item::Data(passed + self.link.delay, buf[..n].to_vec()));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => {
                    push(Item::Reset);
                    return;
                }
            }
        }
        c.close();
    }

    /// Writes what `pipe` holds to `to`, each piece at its time.
    fn write_side(&self, dir: Dir, c: &Conn, mut to: TcpStream, pipe: &Pipe) {
        while !self.over(c) {
            let item = {
                let mut q = lock(&pipe.queue);
                match q.items.pop_front() {
                    Some(i) => {
                        if let Item::Data(_, d) = &i {
                            q.bytes -= d.len();
                        }
                        pipe.ready.notify_all();
                        i
                    }
                    None => {
                        let _ = pipe.ready.wait_timeout(q, POLL);
                        continue;
                    }
                }
            };
            match item {
                Item::Data(at, data) => {
                    if !self.wait_for(c, at) {
                        break;
                    }
                    // Logged as the bytes are released, before the write:
                    // whoever has seen them at the far end must find them
                    // counted (an echo could otherwise answer first).
                    lock(&self.logs[dir.index()]).push((self.epoch.elapsed(), data.len() as u64));
                    if !self.write_all(c, &mut to, &data) {
                        break;
                    }
                }
                Item::Eof(at) => {
                    if self.wait_for(c, at) {
                        let _ = to.shutdown(Shutdown::Write);
                    }
                    return;
                }
                Item::Reset => break,
            }
        }
        c.close();
    }

    /// Sleeps until `at` and while the connection is frozen; false when
    /// the connection ends meanwhile.
    fn wait_for(&self, c: &Conn, at: Instant) -> bool {
        loop {
            if self.over(c) {
                return false;
            }
            if self.frozen(c) {
                std::thread::sleep(POLL);
                continue;
            }
            let now = Instant::now();
            if now >= at {
                return true;
            }
            std::thread::sleep((at - now).min(POLL));
        }
    }

    /// Writes all of `data`, unless the connection ends or fails first.
    fn write_all(&self, c: &Conn, to: &mut TcpStream, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            if self.over(c) {
                return false;
            }
            if self.frozen(c) {
                std::thread::sleep(POLL);
                continue;
            }
            match to.write(data) {
                Ok(0) => return false,
                Ok(n) => data = &data[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return false,
            }
        }
        true
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback: every byte read is written back.
    fn echo() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for c in l.incoming().take(16) {
                let Ok(mut c) = c else { continue };
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 << 10];
                    let mut w = c.try_clone().unwrap();
                    loop {
                        match c.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if w.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    fn client(s: &Shaper) -> TcpStream {
        let c = TcpStream::connect(s.addr()).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c
    }

    #[test]
    fn a_round_trip_takes_the_rtt_and_bytes_arrive_intact() {
        let s = Shaper::start(echo(), Link::rtt(Duration::from_millis(100))).unwrap();
        let mut c = client(&s);
        let t = Instant::now();
        c.write_all(b"ping").unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).unwrap();
        let rtt = t.elapsed();
        assert_eq!(&got, b"ping");
        assert!(rtt >= Duration::from_millis(100), "{rtt:?}");
        assert!(rtt < Duration::from_millis(1000), "{rtt:?}");
        assert_eq!(s.bytes(Dir::Up), 4);
        assert_eq!(s.bytes(Dir::Down), 4);
    }

    /// Latency does not cap throughput: 32 MiB cross a 200 ms RTT link in
    /// far less than the 512 round trips a sleep per 64 KiB read costs.
    #[test]
    fn latency_does_not_cap_throughput() {
        let s = Shaper::start(echo(), Link::rtt(Duration::from_millis(200))).unwrap();
        let c = client(&s);
        let data: Vec<u8> = (0..32u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut w = c.try_clone().unwrap();
        let sent = data.clone();
        let t = Instant::now();
        let writer = std::thread::spawn(move || w.write_all(&sent).unwrap());
        let mut got = vec![0u8; data.len()];
        (&c).read_exact(&mut got).unwrap();
        writer.join().unwrap();
        assert!(got == data);
        assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    }

    #[test]
    fn a_rate_caps_every_window() {
        let rate = 4 << 20;
        let s = Shaper::start(echo(), Link::default().rate(rate)).unwrap();
        let c = client(&s);
        let mut w = c.try_clone().unwrap();
        let n = 10 << 20;
        let writer = std::thread::spawn(move || w.write_all(&vec![7u8; n]).unwrap());
        let mut got = vec![0u8; n];
        (&c).read_exact(&mut got).unwrap();
        writer.join().unwrap();
        let up = s.traffic(Dir::Up);
        assert_eq!(up.total(), n as u64);
        let peak = up.peak(Duration::from_secs(1));
        assert!(peak <= rate + rate / 20, "{peak} bytes in one second");
        let (a, b) = up.span().unwrap();
        assert!(b - a >= Duration::from_millis(2000), "{:?}", b - a);
    }

    #[test]
    fn a_frozen_connection_stays_open_and_silent_and_new_ones_pass() {
        let s = Shaper::start(echo(), Link::default()).unwrap();
        let mut c = client(&s);
        c.write_all(b"a").unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        s.freeze();
        c.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        c.write_all(b"b").unwrap();
        let e = c.read(&mut b).unwrap_err();
        assert!(
            matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
            "{e}"
        );
        let mut d = client(&s);
        d.write_all(b"c").unwrap();
        d.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"c");
    }

    #[test]
    fn a_cut_closes_connections_and_cut_for_refuses_new_ones() {
        let s = Shaper::start(echo(), Link::default()).unwrap();
        let mut c = client(&s);
        s.cut_for(Duration::from_millis(500));
        let mut b = [0u8; 1];
        assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
        let mut d = client(&s);
        let _ = d.write_all(b"x");
        assert!(matches!(d.read(&mut b), Ok(0) | Err(_)));
        std::thread::sleep(Duration::from_millis(600));
        let mut e = client(&s);
        e.write_all(b"y").unwrap();
        e.read_exact(&mut b).unwrap();
        assert_eq!(&b, b"y");
    }

    #[test]
    fn peaks_are_found_in_any_window() {
        let ms = Duration::from_millis;
        let t = Traffic(vec![
            (ms(0), 5),
            (ms(900), 5),
            (ms(1500), 10),
            (ms(1800), 1),
        ]);
        assert_eq!(t.peak(ms(1000)), 16);
        assert_eq!(t.total(), 21);
        assert_eq!(t.since(ms(1000)).total(), 11);
    }
}
