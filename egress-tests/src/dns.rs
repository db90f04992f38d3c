//! A DNS server for the name tests: dnsmasq (Debian's `dnsmasq-base`, installed by `.ci/run`)
//! serving fixed records, in a test namespace, on an address of the test's choosing; and the
//! per-namespace resolv.conf that `ip netns exec` shows the processes it starts (the machine's
//! own /etc/resolv.conf is never touched).

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use crate::{ChildGuard, LoopNs, in_netns, wait_for};

/// One record dnsmasq serves.
pub enum Record<'a> {
    /// An A or AAAA record (by the address's family) with a TTL in seconds.
    Addr(&'a str, IpAddr, u32),
    /// `name` is a CNAME of `target` (a name with an `Addr` record), with a TTL.
    Cname(&'a str, &'a str, u32),
    /// A TXT record.
    Txt(&'a str, &'a str),
    /// Every name under a domain (and the domain itself) resolves to one address (dnsmasq's
    /// `--address=/DOMAIN/ADDR`): a tunnel's server answers every name it is asked.
    Domain(&'a str, IpAddr),
}

/// dnsmasq answering in `ns` on `listen`:53 (UDP and TCP), stopped on drop.
pub struct DnsServer {
    _proc: ChildGuard,
    pub addr: SocketAddr,
}

impl DnsServer {
    pub fn start(ns: &LoopNs, listen: IpAddr, records: &[Record<'_>]) -> DnsServer {
        DnsServer::spawn(ns, listen, records, None)
    }

    /// A caching stub in the path, as systemd-resolved's 127.0.0.53 is: it answers from
    /// `upstream` (and its own `records`, none usually).
    pub fn forwarder(ns: &LoopNs, listen: IpAddr, upstream: SocketAddr) -> DnsServer {
        DnsServer::spawn(ns, listen, &[], Some(upstream))
    }

    fn spawn(
        ns: &LoopNs,
        listen: IpAddr,
        records: &[Record<'_>],
        upstream: Option<SocketAddr>,
    ) -> DnsServer {
        let mut cmd = ns.cmd("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
            "--conf-file=/dev/null",
            "--bind-interfaces",
            "--port=53",
            "--pid-file=",
            "--user=root",
            "--log-facility=-",
        ])
        .arg(format!("--listen-address={listen}"));
        if let Some(u) = upstream {
            cmd.arg(format!("--server={}#{}", u.ip(), u.port()));
        }
        for r in records {
            match r {
                Record::Addr(name, ip, ttl) => cmd.arg(format!("--host-record={name},{ip},{ttl}")),
                Record::Cname(name, target, ttl) => {
                    cmd.arg(format!("--cname={name},{target},{ttl}"))
                }
                Record::Txt(name, text) => cmd.arg(format!("--txt-record={name},{text}")),
                Record::Domain(domain, ip) => cmd.arg(format!("--address=/{domain}/{ip}")),
            };
        }
        let proc = ChildGuard::spawn(&mut cmd);
        let addr = SocketAddr::new(listen, 53);
        wait_for("dnsmasq to listen", Duration::from_secs(10), || {
            in_netns(ns, move || {
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            })
        });
        DnsServer { _proc: proc, addr }
    }
}

/// `/etc/netns/<ns>/resolv.conf`: what processes started by `ip netns exec <ns>` read as
/// /etc/resolv.conf (a bind mount in their own mount namespace). Removed on drop.
pub struct NetnsResolvConf {
    dir: PathBuf,
}

impl NetnsResolvConf {
    pub fn new(ns: &LoopNs, nameservers: &[IpAddr], options: &str) -> NetnsResolvConf {
        let dir = PathBuf::from("/etc/netns").join(ns.name());
        std::fs::create_dir_all(&dir).expect("creating /etc/netns/<ns>");
        let mut text = String::new();
        for n in nameservers {
            text.push_str(&format!("nameserver {n}\n"));
        }
        if !options.is_empty() {
            text.push_str(&format!("options {options}\n"));
        }
        std::fs::write(dir.join("resolv.conf"), text).expect("writing the namespace's resolv.conf");
        NetnsResolvConf { dir }
    }
}

impl Drop for NetnsResolvConf {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
