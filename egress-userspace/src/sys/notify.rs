//! The service manager's notification protocol (`sd_notify(3)`): one datagram of `KEY=value`
//! lines to the unix socket `$NOTIFY_SOCKET` names (a path, or `@name` in the abstract
//! namespace). Without `$NOTIFY_SOCKET` (not started by systemd as `Type=notify` or
//! `notify-reload`) every call does nothing. A few lines over a datagram socket, as the protocol
//! is meant to be spoken: no library needed.
//!
//! The watchdog: with `WatchdogSec=`, systemd sets `$WATCHDOG_USEC` (and `$WATCHDOG_PID`, this
//! process) and restarts the service when no `WATCHDOG=1` arrives within it. [`Notifier::watchdog`]
//! says how often to ping (half the timeout); the controller pings from its main loop, so a loop
//! that hangs stops pinging.

use std::{
    os::unix::net::{SocketAddr, UnixDatagram},
    time::Duration,
};

/// Where notifications go, if anywhere.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`. A socket that cannot be
    /// opened is logged once and ignored: notifications never stop enforcement.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        let target = socket.and_then(|s| match open(&s) {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(socket = ?s, error = %e, "NOTIFY_SOCKET is set but cannot be used: no readiness notifications");
                None
            }
        });
        Notifier {
            watchdog: watchdog.filter(|_| target.is_some()),
            target,
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`, when the service manager asks for it.
    pub fn watchdog(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends `state` (`KEY=value` lines). Failures are logged at debug level only: the manager
    /// may be restarting, and the next notification says everything again.
    pub fn notify(&self, state: &str) {
        let Some((sock, addr)) = &self.target else {
            return;
        };
        if let Err(e) = sock.send_to_addr(state.as_bytes(), addr) {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    /// Startup is complete: the programs are attached and the policy applied.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}\n", one_line(status)));
    }

    /// A reload starts (systemd matches it to the reload it asked for by the time).
    pub fn reloading(&self) {
        self.notify(&format!(
            "RELOADING=1\nSTATUS=reloading the policy\nMONOTONIC_USEC={}\n",
            monotonic_usec()
        ));
    }

    /// The service is stopping.
    pub fn stopping(&self) {
        self.notify("STOPPING=1\nSTATUS=stopping the controller\n");
    }

    pub fn ping(&self) {
        self.notify("WATCHDOG=1\n");
    }
}

/// `STATUS=` is one line.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

fn open(socket: &std::ffi::OsStr) -> std::io::Result<(UnixDatagram, SocketAddr)> {
    use std::os::{linux::net::SocketAddrExt as _, unix::ffi::OsStrExt as _};
    let bytes = socket.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name)?,
        None if bytes.starts_with(b"/") => SocketAddr::from_pathname(socket)?,
        None => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "neither an absolute path nor @abstract",
            ));
        }
    };
    let sock = UnixDatagram::unbound()?;
    Ok((sock, addr))
}

/// Half the watchdog timeout `usec` asks for, when it is meant for `pid` (no `WATCHDOG_PID`: it
/// is).
fn watchdog_interval(usec: Option<&str>, for_pid: Option<&str>, pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = for_pid
        && p.trim().parse::<u32>().ok() != Some(pid)
    {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// CLOCK_MONOTONIC in microseconds, as systemd reads it.
fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    (t.tv_sec as u64) * 1_000_000 + (t.tv_nsec as u64) / 1_000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watchdog_interval_is_half_the_timeout_for_this_process_only() {
        assert_eq!(
            watchdog_interval(Some("30000000"), None, 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_interval(Some("30000000"), Some("7"), 7),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_interval(Some("30000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval(Some("x"), None, 7), None);
        assert_eq!(watchdog_interval(None, None, 7), None);
    }

    /// Over a real socket, both a path and an abstract name.
    #[test]
    fn notifications_reach_the_socket() {
        let dir = std::env::temp_dir().join(format!("egress-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixDatagram::bind(&path).unwrap();
        let (sock, addr) = open(path.as_os_str()).unwrap();
        let n = Notifier {
            target: Some((sock, addr)),
            watchdog: None,
        };
        n.ready("enforcing generation 1 (hash ab)\nsecond line");
        let mut buf = [0u8; 512];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..len]).unwrap(),
            "READY=1\nSTATUS=enforcing generation 1 (hash ab) second line\n"
        );
        n.reloading();
        let len = listener.recv(&mut buf).unwrap();
        let text = std::str::from_utf8(&buf[..len]).unwrap();
        assert!(text.starts_with("RELOADING=1\n"), "{text}");
        let usec: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0 && usec <= monotonic_usec());
        std::fs::remove_dir_all(&dir).unwrap();

        let name = format!("egress-notify-test-{}", std::process::id());
        let abs = {
            use std::os::linux::net::SocketAddrExt as _;
            SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
        };
        let listener = UnixDatagram::bind_addr(&abs).unwrap();
        let (sock, addr) = open(std::ffi::OsStr::new(&format!("@{name}"))).unwrap();
        Notifier {
            target: Some((sock, addr)),
            watchdog: None,
        }
        .ping();
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1\n");
        assert!(open(std::ffi::OsStr::new("relative")).is_err());
    }
}
