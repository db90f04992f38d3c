//! Deny/audit events: decoding the datapath's `Event` records into JSON lines, and the async
//! pump that drains the ring buffer into a writer.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use egress_common::{
    EVENT_AUDIT, Event, HOOK_CONNECT4, HOOK_CONNECT6, HOOK_SENDMSG4, HOOK_SENDMSG6, HOOK_TC,
    IPPROTO_TCP, IPPROTO_UDP,
};
use serde::Serialize;
use tokio::io::{AsyncWrite, AsyncWriteExt, unix::AsyncFd};

use crate::policy::compile::CompiledPolicy;

/// One event as written to the JSON stream.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct JsonEvent {
    /// RFC 3339 wall-clock time, nanoseconds.
    pub ts: String,
    /// `"deny"`, or `"audit"` for a would-be deny in audit mode.
    pub event: String,
    /// Process id (tgid).
    pub pid: u32,
    /// Thread id.
    pub tid: u32,
    pub comm: String,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    /// `connect4`, `connect6`, `sendmsg4` or `sendmsg6`.
    pub hook: String,
    /// `ipv4` or `ipv6`: the family of the socket.
    pub family: String,
    /// `tcp`, `udp`, or the IP protocol number.
    pub protocol: String,
    /// Destination as the process gave it.
    pub dst: String,
    pub port: u16,
    /// True when `dst` is `::ffff:a.b.c.d` and was judged as IPv4.
    pub v4_mapped: bool,
    /// The deciding block or service, or `"default"`.
    pub rule: String,
    /// Policy generation in force.
    pub generation: u32,
    /// Content hash of that policy (see `egress status`).
    #[serde(default)]
    pub policy_hash: String,
}

/// Converts CLOCK_BOOTTIME nanoseconds (as `bpf_ktime_get_boot_ns` reports) to wall time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time minus boot time, sampled at start.
    offset: Duration,
}

impl Clock {
    pub fn new() -> Clock {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: valid pointer to a timespec.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        let boot = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Clock {
            offset: wall.saturating_sub(boot),
        }
    }

    pub fn wall(&self, boot_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + self.offset + Duration::from_nanos(boot_ns)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

fn hook_name(hook: u8) -> &'static str {
    match hook {
        HOOK_CONNECT4 => "connect4",
        HOOK_CONNECT6 => "connect6",
        HOOK_SENDMSG4 => "sendmsg4",
        HOOK_SENDMSG6 => "sendmsg6",
        HOOK_TC => "tc",
        _ => "unknown",
    }
}

pub fn protocol_name(p: u8) -> String {
    match p {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        other => other.to_string(),
    }
}

pub fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

impl JsonEvent {
    pub fn from_raw(ev: &Event, policy: &CompiledPolicy, clock: &Clock) -> JsonEvent {
        let dst: IpAddr = if ev.family == 4 {
            Ipv4Addr::new(ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3]).into()
        } else {
            Ipv6Addr::from(ev.addr).into()
        };
        JsonEvent {
            ts: humantime::format_rfc3339_nanos(clock.wall(ev.ts_ns)).to_string(),
            event: if ev.action == EVENT_AUDIT {
                "audit"
            } else {
                "deny"
            }
            .into(),
            pid: ev.tgid,
            tid: ev.pid,
            comm: cstr(&ev.comm),
            uid: ev.uid,
            gid: ev.gid,
            cgroup_id: ev.cgroup_id,
            hook: hook_name(ev.hook).into(),
            family: if ev.family == 4 { "ipv4" } else { "ipv6" }.into(),
            protocol: protocol_name(ev.protocol),
            dst: dst.to_string(),
            port: ev.port,
            v4_mapped: ev.v4_mapped != 0,
            rule: policy.rule_name(ev.rule_id).to_string(),
            policy_hash: String::new(),
            generation: ev.generation,
        }
    }
}

/// Decodes one ring buffer record; `None` if it is not an `Event`.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is plain old data; length checked; read_unaligned copes with alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Event>()) })
}

/// The event stream: the ring buffer, and where its JSON lines go.
pub struct EventStream<W> {
    fd: AsyncFd<RingBuf<MapData>>,
    /// The policies of recent generations, to name the rules of events still in flight from
    /// before a reload.
    policies: std::collections::BTreeMap<u32, (std::sync::Arc<CompiledPolicy>, String)>,
    clock: Clock,
    out: W,
    written: u64,
    by_rule: std::collections::BTreeMap<String, u64>,
    /// The last drain stopped at a full batch: records are waiting.
    pending: bool,
}

/// Records written per [`EventStream::drain`] call.
pub const DRAIN_BATCH: usize = 4096;

impl<W: AsyncWrite + Unpin> EventStream<W> {
    pub fn new(
        ring: RingBuf<MapData>,
        policy: CompiledPolicy,
        hash: String,
        out: W,
    ) -> std::io::Result<Self> {
        // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd lives.
        let fd = unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from)?;
        Ok(EventStream {
            fd,
            policies: [(1, (std::sync::Arc::new(policy), hash))]
                .into_iter()
                .collect(),
            clock: Clock::new(),
            out,
            written: 0,
            by_rule: Default::default(),
            pending: false,
        })
    }

    /// Waits until there is something to drain (cancel-safe: it consumes nothing). Returns at
    /// once while an earlier [`EventStream::drain`] left records behind.
    pub async fn readable(&mut self) -> std::io::Result<()> {
        if self.pending {
            return Ok(());
        }
        let mut guard = self.fd.readable_mut().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Writes up to [`DRAIN_BATCH`] records as JSON lines and flushes. A deny flood must not
    /// starve the controller's other work or grow an unbounded buffer, so a full batch returns and
    /// leaves the rest for the next call (see [`EventStream::readable`]).
    pub async fn drain(&mut self) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        let ring = self.fd.get_mut();
        let mut n = 0;
        self.pending = false;
        while let Some(item) = ring.next() {
            if let Some(ev) = decode(&item) {
                let (policy, hash) = self
                    .policies
                    .get(&ev.generation)
                    .or_else(|| self.policies.values().next_back())
                    .expect("at least one policy");
                let mut json = JsonEvent::from_raw(&ev, policy, &self.clock);
                json.policy_hash.clone_from(hash);
                *self.by_rule.entry(json.rule.clone()).or_default() += 1;
                serde_json::to_writer(&mut buf, &json)?;
                buf.push(b'\n');
                self.written += 1;
            }
            n += 1;
            if n == DRAIN_BATCH {
                self.pending = true;
                break;
            }
        }
        if !buf.is_empty() {
            self.out.write_all(&buf).await?;
            self.out.flush().await?;
        }
        Ok(())
    }

    /// Names the rules of events of a new policy generation (after a reload).
    pub fn set_policy(&mut self, generation: u32, policy: CompiledPolicy, hash: String) {
        self.policies
            .insert(generation, (std::sync::Arc::new(policy), hash));
        while self.policies.len() > 4 {
            self.policies.pop_first();
        }
    }

    /// Writes other JSON lines (alerts, blocks) to the same stream.
    pub async fn write_line(&mut self, line: &[u8]) -> anyhow::Result<()> {
        self.out.write_all(line).await?;
        self.out.flush().await?;
        Ok(())
    }

    /// Drains until the ring buffer is empty (at exit).
    pub async fn drain_all(&mut self) -> anyhow::Result<()> {
        loop {
            self.drain().await?;
            if !self.pending {
                return Ok(());
            }
        }
    }

    /// Events received so far, by deciding rule.
    pub fn by_rule(&self) -> &std::collections::BTreeMap<String, u64> {
        &self.by_rule
    }

    /// Events written so far.
    pub fn written(&self) -> u64 {
        self.written
    }
}
