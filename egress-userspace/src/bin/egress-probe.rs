//! egress-probe: tries outbound calls and prints, per call, one JSON line with the result.
//! A diagnostic for users ("is this destination allowed from here?") and the client that the
//! kernel and end-to-end tests drive.
//!
//! Usage: egress-probe [--cgroup DIR] [--count N] OP ADDR:PORT [OP ADDR:PORT ...]
//!   OP: tcp (connect), udp-connect (connected UDP, then send), udp-sendto (unconnected UDP)
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

fn attempt(op: &str, addr: SocketAddr) -> Result<(), io::Error> {
    match op {
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

fn usage() -> ExitCode {
    eprintln!("usage: egress-probe [--cgroup DIR] [--count N] OP ADDR:PORT [OP ADDR:PORT ...]");
    eprintln!("  OP: tcp | udp-connect | udp-sendto");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    let mut count: u64 = 1;
    let mut summary = false;
    let mut calls: Vec<(String, SocketAddr)> = Vec::new();
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
            "-h" | "--help" => return usage(),
            op => {
                let Some(addr) = args.next().and_then(|a| a.parse::<SocketAddr>().ok()) else {
                    return usage();
                };
                if !matches!(op, "tcp" | "udp-connect" | "udp-sendto") {
                    return usage();
                }
                calls.push((op.to_string(), addr));
            }
        }
    }
    if calls.is_empty() {
        return usage();
    }
    let mut out = io::stdout().lock();
    for (op, addr) in &calls {
        if !summary {
            let result = match attempt(op, *addr) {
                Ok(()) => "ok".to_string(),
                Err(e) => errno_name(&e),
            };
            let _ = writeln!(
                out,
                "{{\"op\":\"{op}\",\"dst\":\"{addr}\",\"result\":\"{result}\"}}"
            );
            continue;
        }
        let mut results: std::collections::BTreeMap<String, u64> = Default::default();
        for _ in 0..count {
            let r = match attempt(op, *addr) {
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
