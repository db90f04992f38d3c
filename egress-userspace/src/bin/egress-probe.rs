//! egress-probe: tries outbound calls and prints, per call, one JSON line with the result.
//! A diagnostic for users ("is this destination allowed from here?") and the client that the
//! kernel and end-to-end tests drive.
//!
//! Usage: egress-probe [--cgroup DIR] [--count N] OP ADDR:PORT [ARGS] [OP ADDR:PORT [ARGS] ...]
//!   OP: tcp (connect), udp-connect (connected UDP, then send), udp-sendto (unconnected UDP),
//!       tcp-send ADDR:PORT BYTES (connect, write BYTES, shut down, wait for the peer to close),
//!       udp-send ADDR:PORT COUNT SIZE (COUNT unconnected datagrams of SIZE payload bytes),
//!       raw-udp ADDR:PORT (one IPv4 UDP datagram through a raw socket, which no cgroup hook sees),
//!       sleep MS, wait-file PATH (pause; for tests that act between two calls),
//!       storm ALLOWED DENIED MS (for MS milliseconds, alternate UDP connects to an address that
//!       must pass and one that must be denied; print the counts and the wrong verdicts)
//!   --timeout S   I/O timeout of tcp-send, in seconds (default 30)
//!   --rate BPS    pace tcp-send at about BPS bytes per second (default: as fast as possible)
//!   --cgroup DIR  join this cgroup2 directory first (sockets belong to the cgroup they are made in)
//!   --count N     repeat each call N times and print a summary line per call instead
//!
//! The result is "ok", or the errno name ("EPERM" is a policy deny; "ECONNREFUSED" means the
//! connect passed the firewall and reached a closed port).

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    process::ExitCode,
    time::Duration,
};

fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::ECONNREFUSED) => "ECONNREFUSED".into(),
        Some(libc::ENETUNREACH) => "ENETUNREACH".into(),
        Some(libc::EHOSTUNREACH) => "EHOSTUNREACH".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::EADDRNOTAVAIL) => "EADDRNOTAVAIL".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(n) => format!("errno{n}"),
        None if e.kind() == io::ErrorKind::TimedOut => "ETIMEDOUT".into(),
        None => e.to_string(),
    }
}

fn unspecified_for(addr: &SocketAddr) -> SocketAddr {
    if addr.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    }
}

/// Calls with their extra arguments.
#[derive(Clone)]
struct Call {
    op: String,
    addr: SocketAddr,
    args: Vec<u64>,
    path: String,
}

static TIMEOUT_SECS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(30);
static RATE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn io_timeout() -> Duration {
    Duration::from_secs(TIMEOUT_SECS.load(std::sync::atomic::Ordering::Relaxed))
}

fn wait_file(path: &str) -> io::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::path::Path::new(path).exists() {
        if std::time::Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "file never appeared",
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn tcp_send(addr: SocketAddr, total: u64) -> io::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_write_timeout(Some(io_timeout()))?;
    s.set_read_timeout(Some(io_timeout()))?;
    let chunk = vec![0x5au8; 64 * 1024];
    let rate = RATE.load(std::sync::atomic::Ordering::Relaxed);
    let start = std::time::Instant::now();
    let mut left = total;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        s.write_all(&chunk[..n])?;
        left -= n as u64;
        if rate > 0 {
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
    // SAFETY: plain syscalls on a socket we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_UDP);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
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

fn attempt(call: &Call) -> Result<(), io::Error> {
    let (op, addr) = (call.op.as_str(), call.addr);
    match op {
        "tcp-send" => tcp_send(addr, call.args[0]),
        "udp-send" => udp_send(addr, call.args[0], call.args[1]),
        "raw-udp" => raw_udp(addr),
        "sleep" => {
            std::thread::sleep(Duration::from_millis(call.args[0]));
            Ok(())
        }
        "wait-file" => wait_file(&call.path),
        "tcp" => TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(drop),
        "udp-connect" => {
            let s = UdpSocket::bind(unspecified_for(&addr))?;
            s.connect(addr)?;
            s.send(b"egress-probe").map(drop)
        }
        "udp-sendto" => {
            let s = UdpSocket::bind(unspecified_for(&addr))?;
            s.send_to(b"egress-probe", addr).map(drop)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unknown op {op}"),
        )),
    }
}

/// One UDP connect on a fresh socket: true if the firewall let it through.
fn udp_connect_passes(addr: SocketAddr) -> bool {
    let Ok(s) = UdpSocket::bind(unspecified_for(&addr)) else {
        return false;
    };
    s.connect(addr).is_ok()
}

fn storm(allowed: SocketAddr, denied: SocketAddr, ms: u64) -> String {
    let end = std::time::Instant::now() + Duration::from_millis(ms);
    let start = std::time::Instant::now();
    let (mut allowed_ok, mut allowed_denied, mut denied_ok, mut denied_denied) =
        (0u64, 0u64, 0u64, 0u64);
    // EGRESS_PROBE_STOP=FILE ends the storm early once FILE exists (checked every 1,000 rounds).
    let stop = std::env::var_os("EGRESS_PROBE_STOP").map(std::path::PathBuf::from);
    let mut rounds = 0u64;
    while std::time::Instant::now() < end {
        rounds += 1;
        if rounds.is_multiple_of(1000) && stop.as_ref().is_some_and(|p| p.exists()) {
            break;
        }
        if udp_connect_passes(allowed) {
            allowed_ok += 1
        } else {
            allowed_denied += 1
        }
        if udp_connect_passes(denied) {
            denied_ok += 1
        } else {
            denied_denied += 1
        }
    }
    let attempts = allowed_ok + allowed_denied + denied_ok + denied_denied;
    let per_sec = attempts as f64 / start.elapsed().as_secs_f64();
    format!(
        "{{\"op\":\"storm\",\"attempts\":{attempts},\"per_sec\":{per_sec:.0},\"wrong\":{},\"allowed_ok\":{allowed_ok},\"allowed_denied\":{allowed_denied},\"denied_ok\":{denied_ok},\"denied_denied\":{denied_denied},\"pid\":{}}}",
        allowed_denied + denied_ok,
        std::process::id()
    )
}

fn usage() -> ExitCode {
    eprintln!("usage: egress-probe [--cgroup DIR] [--count N] OP ADDR:PORT [ARGS] ...");
    eprintln!(
        "  OP: tcp | udp-connect | udp-sendto | tcp-send ADDR:PORT BYTES | udp-send ADDR:PORT COUNT SIZE | raw-udp ADDR:PORT"
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let mut count: u64 = 1;
    let mut summary = false;
    let mut calls: Vec<Call> = Vec::new();
    let mut stormed = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cgroup" => {
                let Some(dir) = args.next() else {
                    return usage();
                };
                let path = std::path::Path::new(&dir).join("cgroup.procs");
                if let Err(e) = std::fs::write(&path, std::process::id().to_string()) {
                    eprintln!("egress-probe: joining {}: {e}", path.display());
                    return ExitCode::from(3);
                }
            }
            "--count" => {
                let Some(n) = args.next().and_then(|n| n.parse().ok()) else {
                    return usage();
                };
                count = n;
                summary = true;
            }
            "--rate" => {
                let Some(n) = args.next().and_then(|n| n.parse::<u64>().ok()) else {
                    return usage();
                };
                RATE.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            "--timeout" => {
                let Some(n) = args.next().and_then(|n| n.parse::<u64>().ok()) else {
                    return usage();
                };
                TIMEOUT_SECS.store(n, std::sync::atomic::Ordering::Relaxed);
            }
            "storm" => {
                let (Some(a), Some(d), Some(ms)) = (
                    args.next().and_then(|a| a.parse::<SocketAddr>().ok()),
                    args.next().and_then(|a| a.parse::<SocketAddr>().ok()),
                    args.next().and_then(|a| a.parse::<u64>().ok()),
                ) else {
                    return usage();
                };
                println!("{}", storm(a, d, ms));
                stormed = true;
                continue;
            }
            "sleep" | "wait-file" => {
                let Some(arg) = args.next() else {
                    return usage();
                };
                let (ms, path) = if a == "sleep" {
                    let Ok(ms) = arg.parse::<u64>() else {
                        return usage();
                    };
                    (vec![ms], String::new())
                } else {
                    (vec![], arg)
                };
                let addr = "0.0.0.0:0".parse().expect("valid");
                calls.push(Call {
                    op: a.clone(),
                    addr,
                    args: ms,
                    path,
                });
            }
            "-h" | "--help" => return usage(),
            op => {
                let Some(addr) = args.next().and_then(|a| a.parse::<SocketAddr>().ok()) else {
                    return usage();
                };
                let nargs = match op {
                    "tcp" | "udp-connect" | "udp-sendto" | "raw-udp" => 0,
                    "tcp-send" => 1,
                    "udp-send" => 2,
                    _ => return usage(),
                };
                let mut extra = Vec::new();
                for _ in 0..nargs {
                    let Some(n) = args.next().and_then(|a| a.parse::<u64>().ok()) else {
                        return usage();
                    };
                    extra.push(n);
                }
                calls.push(Call {
                    op: op.to_string(),
                    addr,
                    args: extra,
                    path: String::new(),
                });
            }
        }
    }
    if calls.is_empty() {
        return if stormed { ExitCode::SUCCESS } else { usage() };
    }
    let mut out = io::stdout().lock();
    let pid = std::process::id();
    for call in &calls {
        let (op, addr) = (&call.op, call.addr);
        if !summary {
            let result = match attempt(call) {
                Ok(()) => "ok".to_string(),
                Err(e) => errno_name(&e),
            };
            let _ = writeln!(
                out,
                "{{\"op\":\"{op}\",\"dst\":\"{addr}\",\"result\":\"{result}\",\"pid\":{pid}}}"
            );
            continue;
        }
        let mut results: std::collections::BTreeMap<String, u64> = Default::default();
        for _ in 0..count {
            let r = match attempt(call) {
                Ok(()) => "ok".to_string(),
                Err(e) => errno_name(&e),
            };
            *results.entry(r).or_default() += 1;
        }
        let parts: Vec<String> = results
            .iter()
            .map(|(k, v)| format!("\"{k}\":{v}"))
            .collect();
        let _ = writeln!(
            out,
            "{{\"op\":\"{op}\",\"dst\":\"{addr}\",\"count\":{count},\"results\":{{{}}}}}",
            parts.join(",")
        );
    }
    ExitCode::SUCCESS
}
