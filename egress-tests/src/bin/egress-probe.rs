//! egress-probe: tries outbound calls and prints, per call, one JSON line with the result.
//! A diagnostic for users ("is this destination allowed from here?") and the client that the
//! kernel and end-to-end tests drive. The lines are the types of `egress_tests::probe`.
//! (Over 500 lines: one tool, its operations and their socket-level plumbing.)

use std::{
    collections::BTreeMap,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{CommandFactory as _, Parser, error::ErrorKind};
use egress_tests::probe::{CallLine, StormReport, SummaryLine, Verdict};

const OPS: &str = "\
Calls (OP ADDR:PORT [ARGS]), run in order:
  tcp ADDR:PORT                   TCP connect
  udp-connect ADDR:PORT           connected UDP: connect, then send
  udp-sendto ADDR:PORT            unconnected UDP: one sendto
  udp-connect-cmsg ADDR:PORT [--then PATH]
                                  connected UDP, then a sendmsg with a cmsg (IP_TOS or
                                  IPV6_TCLASS) and no address; with --then PATH, after the
                                  connect create PATH.connected and wait for PATH before sending
  udp-lsrr ADDR:PORT              setsockopt(IP_OPTIONS) with a loose source route via ADDR,
                                  then one datagram
  udp-lsrr-cmsg ADDR:PORT         one datagram carrying the same source route as an
                                  IP_RETOPTS cmsg
  setsockopt-large                setsockopt(IP_FREEBIND) with an 8 KiB buffer (the kernel reads
                                  4 bytes): larger than the page a sockopt hook sees
  udp-rthdr [ADDR]:PORT           setsockopt(IPV6_RTHDR) with a segment routing header (type 4)
                                  via ADDR, then one datagram
  socket KIND                     create one socket: raw4, raw6 (SOCK_RAW), ping4, ping6 (ping
                                  sockets), udplite, mptcp, sctp
  ping ADDR:PORT                  one ICMP echo request through an unconnected ping socket
  ping-laundered ADDR:PORT        the same through a ping socket first connected to loopback
                                  (an owner recorded), then disconnected (AF_UNSPEC)
  tcp-send ADDR:PORT BYTES        connect, write BYTES, shut down, wait for the peer to close
  tcp-send-close ADDR:PORT BYTES  connect, write BYTES, close at once: the kernel sends what is
                                  still in the send buffer after close()
  udp-send ADDR:PORT COUNT SIZE   COUNT unconnected datagrams of SIZE payload bytes
  raw-udp ADDR:PORT               one IPv4 UDP datagram through a raw socket (no cgroup hook
                                  sees it)
  hold tcp|udp ADDR:PORT N        open N sockets connected to ADDR:PORT (UDP: connect only, no
                                  datagram) and keep them open until `release` or the end;
                                  prints one summary line
  release                         close every held socket
  held-send BYTES                 write BYTES on the first held TCP socket, shut it down, wait
                                  for the peer to close
  flood ADDR:PORT N               N short-lived UDP sockets: socket, connect twice (no
                                  datagram), close; prints one summary line
  sleep MS | wait-file PATH       pause (for tests that act between two calls)
  storm ALLOWED DENIED MS         for MS milliseconds, alternate UDP connects to an address
                                  that must pass and one that must be denied; print the counts:
                                  only EPERM counts as denied, other errors are counted apart

The result is \"ok\" or the errno name: EPERM is a policy deny; ECONNREFUSED means the connect
passed the firewall and reached a closed port.";

/// Tries outbound calls and prints one JSON line per call with its result.
#[derive(Parser, Debug)]
#[command(name = "egress-probe", after_help = OPS)]
struct Cli {
    /// Join this cgroup2 directory first (sockets belong to the cgroup they are made in).
    #[arg(long, value_name = "DIR")]
    cgroup: Option<PathBuf>,
    /// Repeat each call N times and print one summary line per call instead.
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    /// I/O timeout of tcp-send, in seconds.
    #[arg(long, value_name = "S", default_value_t = 30)]
    timeout: u64,
    /// Pace tcp-send at about BPS bytes per second (default: as fast as possible).
    #[arg(long, value_name = "BPS")]
    rate: Option<u64>,
    /// End a storm early once FILE exists (checked every 1,000 rounds).
    #[arg(long, value_name = "FILE", env = "EGRESS_PROBE_STOP")]
    stop_file: Option<PathBuf>,
    /// The calls: OP ADDR:PORT [ARGS], one after another (see below).
    #[arg(
        value_name = "OP ADDR:PORT [ARGS]",
        required = true,
        trailing_var_arg = true,
        num_args = 1..
    )]
    calls: Vec<String>,
}

/// One call, parsed.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Tcp(SocketAddr),
    UdpConnect(SocketAddr),
    UdpSendto(SocketAddr),
    UdpConnectCmsg(SocketAddr, Option<PathBuf>),
    UdpLsrr(SocketAddr),
    UdpLsrrCmsg(SocketAddr),
    UdpRthdr(SocketAddr),
    Socket(String),
    SetsockoptLarge,
    Ping(SocketAddr),
    PingLaundered(SocketAddr),
    TcpSend(SocketAddr, u64),
    TcpSendClose(SocketAddr, u64),
    UdpSend(SocketAddr, u64, u64),
    RawUdp(SocketAddr),
    Hold(HoldKind, SocketAddr, u64),
    Release,
    HeldSend(u64),
    Flood(SocketAddr, u64),
    Sleep(u64),
    WaitFile(PathBuf),
    Storm {
        allowed: SocketAddr,
        denied: SocketAddr,
        ms: u64,
    },
}

impl Call {
    fn op(&self) -> &'static str {
        match self {
            Call::Tcp(_) => "tcp",
            Call::UdpConnect(_) => "udp-connect",
            Call::UdpSendto(_) => "udp-sendto",
            Call::UdpConnectCmsg(..) => "udp-connect-cmsg",
            Call::UdpLsrr(_) => "udp-lsrr",
            Call::UdpLsrrCmsg(_) => "udp-lsrr-cmsg",
            Call::UdpRthdr(_) => "udp-rthdr",
            Call::Socket(_) => "socket",
            Call::SetsockoptLarge => "setsockopt-large",
            Call::Ping(_) => "ping",
            Call::PingLaundered(_) => "ping-laundered",
            Call::TcpSend(..) => "tcp-send",
            Call::TcpSendClose(..) => "tcp-send-close",
            Call::UdpSend(..) => "udp-send",
            Call::RawUdp(_) => "raw-udp",
            Call::Hold(..) => "hold",
            Call::Release => "release",
            Call::HeldSend(_) => "held-send",
            Call::Flood(..) => "flood",
            Call::Sleep(_) => "sleep",
            Call::WaitFile(_) => "wait-file",
            Call::Storm { .. } => "storm",
        }
    }

    /// The destination, as the line shows it (`0.0.0.0:0` for the pauses).
    fn dst(&self) -> SocketAddr {
        match self {
            Call::Tcp(a)
            | Call::UdpConnect(a)
            | Call::UdpSendto(a)
            | Call::UdpConnectCmsg(a, _)
            | Call::UdpLsrr(a)
            | Call::UdpLsrrCmsg(a)
            | Call::UdpRthdr(a)
            | Call::Ping(a)
            | Call::PingLaundered(a)
            | Call::TcpSend(a, _)
            | Call::TcpSendClose(a, _)
            | Call::UdpSend(a, ..)
            | Call::Hold(_, a, _)
            | Call::Flood(a, _)
            | Call::RawUdp(a) => *a,
            Call::Storm { allowed, .. } => *allowed,
            Call::Sleep(_)
            | Call::WaitFile(_)
            | Call::Socket(_)
            | Call::SetsockoptLarge
            | Call::Release
            | Call::HeldSend(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

/// Parses the call words into calls.
fn parse_calls(words: &[String]) -> Result<Vec<Call>, String> {
    let mut words = words.iter().peekable();
    let mut calls = Vec::new();
    fn next<'w>(
        words: &mut impl Iterator<Item = &'w String>,
        op: &str,
        what: &str,
    ) -> Result<&'w String, String> {
        words.next().ok_or_else(|| format!("{op}: missing {what}"))
    }
    fn num<'w>(
        words: &mut impl Iterator<Item = &'w String>,
        op: &str,
        what: &str,
    ) -> Result<u64, String> {
        let w = next(words, op, what)?;
        w.parse()
            .map_err(|_| format!("{op}: {what} must be a number, not {w:?}"))
    }
    fn addr<'w>(
        words: &mut impl Iterator<Item = &'w String>,
        op: &str,
    ) -> Result<SocketAddr, String> {
        let w = next(words, op, "ADDR:PORT")?;
        w.parse()
            .map_err(|_| format!("{op}: {w:?} is not ADDR:PORT (IPv6 as [ADDR]:PORT)"))
    }
    while let Some(op) = words.next() {
        let call = match op.as_str() {
            "tcp" => Call::Tcp(addr(&mut words, op)?),
            "udp-connect" => Call::UdpConnect(addr(&mut words, op)?),
            "udp-sendto" => Call::UdpSendto(addr(&mut words, op)?),
            "udp-lsrr" => Call::UdpLsrr(addr(&mut words, op)?),
            "udp-lsrr-cmsg" => Call::UdpLsrrCmsg(addr(&mut words, op)?),
            "udp-rthdr" => Call::UdpRthdr(addr(&mut words, op)?),
            "socket" => Call::Socket(next(&mut words, op, "KIND")?.clone()),
            "setsockopt-large" => Call::SetsockoptLarge,
            "ping" => Call::Ping(addr(&mut words, op)?),
            "ping-laundered" => Call::PingLaundered(addr(&mut words, op)?),
            "udp-connect-cmsg" => {
                let a = addr(&mut words, op)?;
                let then = match words.peek() {
                    Some(w) if w.as_str() == "--then" => {
                        words.next();
                        Some(next(&mut words, op, "PATH")?.into())
                    }
                    _ => None,
                };
                Call::UdpConnectCmsg(a, then)
            }
            "raw-udp" => Call::RawUdp(addr(&mut words, op)?),
            "tcp-send" => Call::TcpSend(addr(&mut words, op)?, num(&mut words, op, "BYTES")?),
            "tcp-send-close" => {
                Call::TcpSendClose(addr(&mut words, op)?, num(&mut words, op, "BYTES")?)
            }
            "udp-send" => Call::UdpSend(
                addr(&mut words, op)?,
                num(&mut words, op, "COUNT")?,
                num(&mut words, op, "SIZE")?,
            ),
            "hold" => {
                let kind = match next(&mut words, op, "tcp|udp")?.as_str() {
                    "tcp" => HoldKind::Tcp,
                    "udp" => HoldKind::Udp,
                    other => return Err(format!("hold: {other:?} is not tcp or udp")),
                };
                Call::Hold(kind, addr(&mut words, op)?, num(&mut words, op, "N")?)
            }
            "release" => Call::Release,
            "held-send" => Call::HeldSend(num(&mut words, op, "BYTES")?),
            "flood" => Call::Flood(addr(&mut words, op)?, num(&mut words, op, "N")?),
            "sleep" => Call::Sleep(num(&mut words, op, "MS")?),
            "wait-file" => Call::WaitFile(next(&mut words, op, "PATH")?.into()),
            "storm" => Call::Storm {
                allowed: addr(&mut words, op)?,
                denied: addr(&mut words, op)?,
                ms: num(&mut words, op, "MS")?,
            },
            other => return Err(format!("unknown op {other:?}")),
        };
        calls.push(call);
    }
    Ok(calls)
}

/// What `hold` opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HoldKind {
    Tcp,
    Udp,
}

/// A socket `hold` keeps open.
enum Held {
    Tcp(TcpStream),
    Udp(#[expect(dead_code, reason = "held only to stay open until `release`")] UdpSocket),
}

fn unspecified_for(addr: &SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

/// What the calls share.
struct Probe {
    timeout: Duration,
    rate: Option<u64>,
    stop_file: Option<PathBuf>,
    /// The sockets `hold` keeps open, oldest first.
    held: std::cell::RefCell<Vec<Held>>,
}

/// One datagram on a connected socket through sendmsg(2) with no address and one cmsg (IP_TOS,
/// or IPV6_TCLASS on IPv6): the form that reaches the sendmsg hook with no destination.
fn send_with_cmsg(s: &UdpSocket, ipv4: bool) -> io::Result<()> {
    let tos = 0x10_i32.to_ne_bytes();
    if ipv4 {
        send_msg(s, None, libc::IPPROTO_IP, libc::IP_TOS, &tos)
    } else {
        send_msg(s, None, libc::IPPROTO_IPV6, libc::IPV6_TCLASS, &tos)
    }
}

/// One datagram through sendmsg(2), to `to` (None: the connected peer), with one cmsg of
/// `level`/`kind` carrying `data` (at most 40 bytes).
fn send_msg(
    s: &UdpSocket,
    to: Option<&SocketAddr>,
    level: libc::c_int,
    kind: libc::c_int,
    data: &[u8],
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let payload = *b"egress-probe";
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let name = to.map(sockaddr);
    // Room for one cmsg of up to 40 bytes, 8-byte aligned.
    let mut control = [0u64; 8];
    assert!(data.len() <= 40, "cmsg data too long");
    // SAFETY: msghdr and cmsghdr are plain C structs; every pointer set here points into buffers
    // that outlive the sendmsg call, and CMSG_* are used as the kernel ABI defines them.
    let rc = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        if let Some((storage, len)) = &name {
            msg.msg_name = std::ptr::from_ref(storage).cast_mut().cast();
            msg.msg_namelen = *len;
        }
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(data.len() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = level;
        (*cmsg).cmsg_type = kind;
        (*cmsg).cmsg_len = libc::CMSG_LEN(data.len() as u32) as usize;
        std::ptr::copy_nonoverlapping(data.as_ptr(), libc::CMSG_DATA(cmsg), data.len());
        libc::sendmsg(s.as_raw_fd(), &msg, 0)
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `addr` as a C socket address.
fn sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is valid, and it is large enough for
    // either address family written into it.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(std::ptr::from_mut(&mut storage).cast(), sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn setsockopt(
    s: &UdpSocket,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: value is a live buffer of the given length.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            value.as_ptr().cast(),
            value.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// An IPv4 loose source route option through `via` (type 0x83, length 7, pointer 4), padded
/// to 8 bytes with END.
fn lsrr_option(via: &SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = via else {
        return Vec::new();
    };
    let mut opt = vec![0x83, 7, 4];
    opt.extend_from_slice(&v4.ip().octets());
    opt.push(0);
    opt
}

/// An IPv6 segment routing header (type 4) with one segment, `via`.
fn srh(via: &SocketAddr) -> Vec<u8> {
    let SocketAddr::V6(v6) = via else {
        return Vec::new();
    };
    // next header (filled by the kernel), hdrlen 2 (24 bytes), type 4, segments left 0, first
    // segment 0, flags 0, tag 0, then the segment.
    let mut h = vec![0, 2, 4, 0, 0, 0, 0, 0];
    h.extend_from_slice(&v6.ip().octets());
    h
}

/// socket(2) of one of the kinds `socket KIND` names.
fn socket_of(kind: &str) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd as _;
    let (family, ty, proto) = match kind {
        "raw4" => (libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP),
        "raw6" => (libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_UDP),
        "ping4" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_ICMP),
        "ping6" => (libc::AF_INET6, libc::SOCK_DGRAM, libc::IPPROTO_ICMPV6),
        "udplite" => (libc::AF_INET, libc::SOCK_DGRAM, libc::IPPROTO_UDPLITE),
        "mptcp" => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP),
        "sctp" => (libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP),
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unknown socket kind {other}"),
            ));
        }
    };
    // SAFETY: plain syscall; the fd, if any, is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(family, ty | libc::SOCK_CLOEXEC, proto) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// One ICMP echo request to `addr` through an unconnected ping socket (`sendto`, which no
/// cgroup hook sees). `launder`: connect the socket to loopback first (the connect hook approves
/// it and records the socket's owner), then dissolve the association with AF_UNSPEC.
fn ping(addr: &SocketAddr, launder: bool) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let fd = socket_of(if addr.is_ipv4() { "ping4" } else { "ping6" })?;
    if launder {
        let lo: SocketAddr = if addr.is_ipv4() {
            "127.0.0.1:0".parse().expect("an address")
        } else {
            "[::1]:0".parse().expect("an address")
        };
        let (storage, len) = sockaddr(&lo);
        // SAFETY: valid sockaddr buffers for the calls' duration.
        unsafe {
            if libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut unspec: libc::sockaddr = std::mem::zeroed();
            unspec.sa_family = libc::AF_UNSPEC as libc::sa_family_t;
            if libc::connect(
                fd.as_raw_fd(),
                &unspec,
                size_of::<libc::sockaddr>() as libc::socklen_t,
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
        }
    }
    // Echo request: type 8 (ICMP) or 128 (ICMPv6), code 0; the kernel fills checksum and id.
    let echo: [u8; 16] = [
        if addr.is_ipv4() { 8 } else { 128 },
        0,
        0,
        0,
        0,
        0,
        0,
        1,
        b'e',
        b'g',
        b'r',
        b'e',
        b's',
        b's',
        0,
        0,
    ];
    let (storage, len) = sockaddr(addr);
    // SAFETY: valid buffers for the call's duration.
    let rc = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            echo.as_ptr().cast(),
            echo.len(),
            0,
            std::ptr::from_ref(&storage).cast(),
            len,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn wait_file(path: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "file never appeared",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

impl Probe {
    fn tcp_send(&self, addr: SocketAddr, total: u64) -> io::Result<()> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        self.send_on(&mut s, total)
    }

    /// Writes `total` bytes on `s` (paced by `--rate`), shuts it down, and waits for the peer to
    /// close.
    fn send_on(&self, s: &mut TcpStream, total: u64) -> io::Result<()> {
        s.set_write_timeout(Some(self.timeout))?;
        s.set_read_timeout(Some(self.timeout))?;
        let chunk = vec![0x5au8; 64 * 1024];
        let start = Instant::now();
        let mut left = total;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            s.write_all(&chunk[..n])?;
            left -= n as u64;
            if let Some(rate) = self.rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64((total - left) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
        }
        s.shutdown(std::net::Shutdown::Write)?;
        // The peer closes once it has read everything: then every byte has left this host.
        let mut sink = [0u8; 256];
        while s.read(&mut sink)? > 0 {}
        Ok(())
    }

    fn attempt(&self, call: &Call) -> io::Result<()> {
        match call {
            Call::TcpSend(addr, bytes) => self.tcp_send(*addr, *bytes),
            Call::TcpSendClose(addr, bytes) => {
                let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(5))?;
                s.set_write_timeout(Some(self.timeout))?;
                let chunk = vec![0x5au8; 64 * 1024];
                let mut left = *bytes;
                while left > 0 {
                    let n = left.min(chunk.len() as u64) as usize;
                    s.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
                Ok(())
            }
            Call::UdpSend(addr, count, size) => udp_send(*addr, *count, *size),
            Call::RawUdp(addr) => raw_udp(*addr),
            Call::Sleep(ms) => {
                std::thread::sleep(Duration::from_millis(*ms));
                Ok(())
            }
            Call::WaitFile(path) => wait_file(path),
            Call::Hold(kind, addr, _) => {
                let held = match kind {
                    HoldKind::Tcp => {
                        Held::Tcp(TcpStream::connect_timeout(addr, Duration::from_secs(2))?)
                    }
                    HoldKind::Udp => {
                        let s = UdpSocket::bind(unspecified_for(addr))?;
                        s.connect(addr)?;
                        Held::Udp(s)
                    }
                };
                self.held.borrow_mut().push(held);
                Ok(())
            }
            Call::Release => {
                self.held.borrow_mut().clear();
                Ok(())
            }
            Call::HeldSend(bytes) => {
                let mut held = self.held.borrow_mut();
                let s = held
                    .iter_mut()
                    .find_map(|h| match h {
                        Held::Tcp(s) => Some(s),
                        Held::Udp(_) => None,
                    })
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no held TCP socket"))?;
                self.send_on(s, *bytes)
            }
            Call::Flood(addr, _) => short_lived_udp(addr),
            Call::Tcp(addr) => TcpStream::connect_timeout(addr, Duration::from_secs(2)).map(drop),
            Call::UdpConnect(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                s.connect(addr)?;
                s.send(b"egress-probe").map(drop)
            }
            Call::UdpSendto(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                s.send_to(b"egress-probe", addr).map(drop)
            }
            Call::Socket(kind) => socket_of(kind).map(drop),
            Call::SetsockoptLarge => {
                let s = UdpSocket::bind("127.0.0.1:0")?;
                let mut value = vec![0u8; 8192];
                value[..4].copy_from_slice(&1i32.to_ne_bytes());
                setsockopt(&s, libc::IPPROTO_IP, libc::IP_FREEBIND, &value)
            }
            Call::Ping(addr) => ping(addr, false),
            Call::PingLaundered(addr) => ping(addr, true),
            Call::UdpLsrr(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                setsockopt(&s, libc::IPPROTO_IP, libc::IP_OPTIONS, &lsrr_option(addr))?;
                s.send_to(b"egress-probe", addr).map(drop)
            }
            Call::UdpLsrrCmsg(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                let opt = lsrr_option(addr);
                send_msg(&s, Some(addr), libc::IPPROTO_IP, libc::IP_RETOPTS, &opt)
            }
            Call::UdpRthdr(addr) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                setsockopt(&s, libc::IPPROTO_IPV6, libc::IPV6_RTHDR, &srh(addr))?;
                s.send_to(b"egress-probe", addr).map(drop)
            }
            Call::UdpConnectCmsg(addr, then) => {
                let s = UdpSocket::bind(unspecified_for(addr))?;
                s.connect(addr)?;
                if let Some(path) = then {
                    let mut marker = path.clone().into_os_string();
                    marker.push(".connected");
                    std::fs::write(&marker, b"")?;
                    wait_file(path)?;
                }
                send_with_cmsg(&s, addr.is_ipv4())
            }
            Call::Storm { .. } => unreachable!("a storm is not a single attempt"),
        }
    }

    fn storm(&self, allowed: SocketAddr, denied: SocketAddr, ms: u64) -> StormReport {
        let start = Instant::now();
        let end = start + Duration::from_millis(ms);
        let mut r = StormReport {
            op: "storm".into(),
            attempts: 0,
            per_sec: 0.0,
            wrong: 0,
            allowed_ok: 0,
            allowed_denied: 0,
            denied_ok: 0,
            denied_denied: 0,
            errors: BTreeMap::new(),
            pid: std::process::id(),
        };
        let mut rounds = 0u64;
        while Instant::now() < end {
            rounds += 1;
            if rounds.is_multiple_of(1000) && self.stop_file.as_ref().is_some_and(|p| p.exists()) {
                break;
            }
            for (addr, must_pass) in [(allowed, true), (denied, false)] {
                match (Verdict::of(&udp_connect(addr)), must_pass) {
                    (Verdict::Succeeded, true) => r.allowed_ok += 1,
                    (Verdict::Succeeded, false) => r.denied_ok += 1,
                    (Verdict::Denied, true) => r.allowed_denied += 1,
                    (Verdict::Denied, false) => r.denied_denied += 1,
                    // Not a verdict of the firewall (a UDP connect is never refused): counted
                    // apart, so that a broken setup cannot pass for a clean storm.
                    (other, _) => *r.errors.entry(other.name().to_string()).or_default() += 1,
                }
            }
        }
        r.attempts =
            r.allowed_ok + r.allowed_denied + r.denied_ok + r.denied_denied + r.error_count();
        r.wrong = r.allowed_denied + r.denied_ok;
        r.per_sec = (r.attempts as f64 / start.elapsed().as_secs_f64()).round();
        r
    }
}

/// One short-lived UDP socket: socket, connect twice (no datagram), close. Plain syscalls: a
/// flood of them should cost as little as it can.
fn short_lived_udp(addr: &SocketAddr) -> io::Result<()> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall; the fd, if any, is owned (and closed) by `fd`.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let (storage, len) = sockaddr(addr);
    // Twice: the second connect finds the owner the first recorded, as a socket in use is looked
    // up again (a map that keeps what is used most would keep these, and drop an idle upload's).
    for _ in 0..2 {
        // SAFETY: a valid sockaddr buffer for the call's duration.
        let rc = unsafe { libc::connect(fd.as_raw_fd(), std::ptr::from_ref(&storage).cast(), len) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One UDP connect on a fresh socket.
fn udp_connect(addr: SocketAddr) -> io::Result<()> {
    UdpSocket::bind(unspecified_for(&addr))?.connect(addr)
}

fn udp_send(addr: SocketAddr, count: u64, size: u64) -> io::Result<()> {
    let s = UdpSocket::bind(unspecified_for(&addr))?;
    let payload = vec![0xa5u8; size as usize];
    for _ in 0..count {
        s.send_to(&payload, addr)?;
    }
    Ok(())
}

/// One UDP datagram through `socket(AF_INET, SOCK_RAW, IPPROTO_UDP)`: the kernel adds the IP
/// header, we write the UDP header (checksum 0: none, valid for IPv4).
fn raw_udp(addr: SocketAddr) -> io::Result<()> {
    let SocketAddr::V4(v4) = addr else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "raw-udp is IPv4 only",
        ));
    };
    let payload = b"egress-probe raw";
    let mut pkt = Vec::with_capacity(8 + payload.len());
    pkt.extend_from_slice(&40000u16.to_be_bytes());
    pkt.extend_from_slice(&v4.port().to_be_bytes());
    pkt.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    pkt.extend_from_slice(&0u16.to_be_bytes());
    pkt.extend_from_slice(payload);
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(v4.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: plain syscalls on a socket we own, with buffers that outlive them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if n < 0 { Err(err) } else { Ok(()) }
    }
}

fn print(out: &mut impl io::Write, line: &impl serde::Serialize) {
    let mut text = serde_json::to_vec(line).expect("a probe line serializes");
    text.push(b'\n');
    let _ = out.write_all(&text);
    let _ = out.flush();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let calls = match parse_calls(&cli.calls) {
        Ok(c) => c,
        Err(e) => Cli::command().error(ErrorKind::InvalidValue, e).exit(),
    };
    if let Some(dir) = &cli.cgroup
        && let Err(e) = egress_tests::cgroup::join(dir)
    {
        eprintln!("egress-probe: joining {}: {e}", dir.display());
        return ExitCode::from(3);
    }
    let probe = Probe {
        timeout: Duration::from_secs(cli.timeout),
        rate: cli.rate,
        stop_file: cli.stop_file,
        held: std::cell::RefCell::new(Vec::new()),
    };
    let pid = std::process::id();
    let mut out = io::stdout().lock();
    for call in &calls {
        let (op, dst) = (call.op().to_string(), call.dst().to_string());
        if let Call::Storm {
            allowed,
            denied,
            ms,
        } = call
        {
            print(&mut out, &probe.storm(*allowed, *denied, *ms));
            continue;
        }
        // `hold` and `flood` carry their own count.
        let count = match call {
            Call::Hold(_, _, n) | Call::Flood(_, n) => Some(*n),
            _ => cli.count,
        };
        match count {
            None => {
                let result = Verdict::of(&probe.attempt(call));
                print(
                    &mut out,
                    &CallLine {
                        op,
                        dst,
                        result,
                        pid,
                    },
                );
            }
            Some(count) => {
                let mut results: BTreeMap<String, u64> = BTreeMap::new();
                for _ in 0..count {
                    let r = Verdict::of(&probe.attempt(call));
                    *results.entry(r.name().to_string()).or_default() += 1;
                }
                print(
                    &mut out,
                    &SummaryLine {
                        op,
                        dst,
                        count,
                        results,
                        pid,
                    },
                );
            }
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_documented_command_line_parses() {
        let cli = Cli::try_parse_from(words(
            "egress-probe --cgroup /sys/fs/cgroup/x --count 3 --timeout 5 --rate 1000 tcp 127.0.0.2:80 tcp-send [::1]:9 100 sleep 10",
        ))
        .unwrap();
        assert_eq!(
            (cli.cgroup.unwrap(), cli.count, cli.timeout, cli.rate),
            (PathBuf::from("/sys/fs/cgroup/x"), Some(3), 5, Some(1000))
        );
        assert_eq!(
            parse_calls(&cli.calls).unwrap(),
            [
                Call::Tcp("127.0.0.2:80".parse().unwrap()),
                Call::TcpSend("[::1]:9".parse().unwrap(), 100),
                Call::Sleep(10)
            ]
        );
    }

    #[test]
    fn the_socket_holding_calls_parse() {
        assert_eq!(
            parse_calls(&words(
                "hold tcp 127.0.0.2:80 3 hold udp [::1]:9 2 flood 127.0.0.1:9 150000 held-send 100 release"
            ))
            .unwrap(),
            [
                Call::Hold(HoldKind::Tcp, "127.0.0.2:80".parse().unwrap(), 3),
                Call::Hold(HoldKind::Udp, "[::1]:9".parse().unwrap(), 2),
                Call::Flood("127.0.0.1:9".parse().unwrap(), 150_000),
                Call::HeldSend(100),
                Call::Release,
            ]
        );
        assert!(parse_calls(&words("hold sctp 127.0.0.1:1 1")).is_err());
    }

    #[test]
    fn bad_calls_are_refused() {
        for bad in [
            "tcp",
            "udp-send 127.0.0.1:1 3",
            "fly 127.0.0.1:1",
            "sleep soon",
        ] {
            assert!(parse_calls(&words(bad)).is_err(), "{bad}");
        }
        assert!(
            Cli::try_parse_from(words("egress-probe")).is_err(),
            "a call is required"
        );
    }

    #[test]
    fn lines_read_back_as_the_harness_types() {
        let line = CallLine {
            op: "tcp".into(),
            dst: "127.0.0.1:1".into(),
            result: Verdict::Denied,
            pid: 7,
        };
        let text = serde_json::to_string(&line).unwrap();
        assert!(text.contains(r#""result":"EPERM""#), "{text}");
        assert_eq!(egress_tests::probe::parse_calls(text.as_bytes()), [line]);
    }
}
