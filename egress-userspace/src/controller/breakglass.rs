//! Break-glass exceptions, the controller's part: `egress allow` and `egress revoke` over the
//! control socket, expiry noticed at each tick (the kernel has already stopped honouring an
//! expired exception by then: this only reports it and tidies the map), a process scope ended
//! when its process exits (its pid could be reused), the metadata kept beside the controller's
//! state, and one `exception` event (and log line) for each grant, revoke and expiry. What an
//! exception is and how it compiles to map entries is `crate::exceptions`.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use tokio::sync::mpsc;
use tracing::{info, warn};

use super::Controller;
use crate::{
    api::{Response, server::Caller},
    dns::grants::{HostExceptions, HostRule, Learn},
    events::{EventMeta, ExceptionEvent, timestamp},
    exceptions::{self, Ask, Exception, Scope, Target},
    sys::{clock, nss},
};

/// The controller's exceptions in force.
#[derive(Debug)]
pub struct BreakGlass {
    pub list: Vec<Exception>,
    /// Where their metadata is kept (None: an ephemeral run keeps it in memory only, as its
    /// maps are not pinned either).
    pub file: Option<PathBuf>,
    /// The longest `--for` this controller grants.
    pub max_for: Duration,
    /// The last id given (never reused, across restarts too).
    pub last_id: u32,
    /// Addresses the DNS proxy learned for host exceptions: the sink's end, and ours (taken
    /// by the run loop).
    learn_tx: mpsc::Sender<Learn>,
    learn_rx: Option<mpsc::Receiver<Learn>>,
}

/// What an `egress allow` asks, as the control socket carries it.
pub struct AllowRequest {
    pub dest: String,
    pub port: Option<String>,
    pub protocol: Option<String>,
    pub pid: Option<u32>,
    pub cgroup: Option<String>,
    pub user: Option<String>,
    pub for_secs: u64,
    pub reason: String,
}

impl BreakGlass {
    pub fn new(file: Option<PathBuf>, max_for: Duration) -> BreakGlass {
        let (learn_tx, learn_rx) = mpsc::channel(256);
        BreakGlass {
            list: Vec::new(),
            file,
            max_for,
            last_id: 0,
            learn_tx,
            learn_rx: Some(learn_rx),
        }
    }

    /// The receiving end of what the DNS proxy learns (for the run loop; once).
    pub fn take_learn_rx(&mut self) -> Option<mpsc::Receiver<Learn>> {
        self.learn_rx.take()
    }

    /// A new id, never given before.
    fn next_id(&mut self) -> u32 {
        let max = self.list.iter().map(|e| e.id).max().unwrap_or(0);
        self.last_id = self.last_id.max(max) + 1;
        self.last_id
    }
}

/// The RFC 3339 time (seconds) of CLOCK_BOOTTIME instant `boot_ns`.
fn rfc3339_of(boot_ns: u64) -> String {
    humantime::format_rfc3339_seconds(clock::wall_of(boot_ns)).to_string()
}

impl Controller {
    /// Reads back the exceptions an earlier controller recorded (a restart over pins) and puts
    /// exactly the live ones in the kernel; those that ended while no controller ran are
    /// reported as expired.
    pub(super) async fn adopt_exceptions(&mut self) {
        let Some(file) = self.breakglass.file.clone() else {
            return;
        };
        let now = clock::boot_ns();
        let record = exceptions::read(&file);
        // The kernel's map says what is still in force: a record of exceptions whose map went
        // away (`egress stop`, then a fresh start) restores nothing.
        let in_kernel = self.dp.exception_ids(now);
        let (live, ended): (Vec<_>, Vec<_>) = record.exceptions.into_iter().partition(|e| {
            // A host exception has no entry until its name is resolved.
            !exceptions::expired(e, now)
                && (in_kernel.contains(&e.id) || (e.host.is_some() && e.addresses.is_empty()))
        });
        self.breakglass.list = live;
        self.breakglass.last_id = record.last_id;
        if let Err(e) = self.sync_exceptions() {
            warn!(error = %format!("{e:#}"), "could not restore the break-glass exceptions");
        }
        for e in &ended {
            let why = (!exceptions::expired(e, now))
                .then(|| "no longer in the kernel (enforcement was stopped)".to_string());
            self.exception_event(e, "expired", None, why).await;
        }
        if !self.breakglass.list.is_empty() {
            info!(
                count = self.breakglass.list.len(),
                "break-glass exceptions restored"
            );
        }
    }

    /// Compiles the list, writes it to the kernel, then records it. The kernel is written only
    /// once the whole list compiled: a list that does not (too many overlapping exceptions)
    /// changes nothing.
    fn sync_exceptions(&mut self) -> anyhow::Result<()> {
        let (entries, levels) =
            exceptions::compile(&self.breakglass.list).map_err(anyhow::Error::msg)?;
        self.dp.set_exceptions(&entries, levels)?;
        if let Some(f) = &self.breakglass.file {
            let record = exceptions::Record {
                last_id: self.breakglass.last_id,
                exceptions: self.breakglass.list.clone(),
            };
            exceptions::write(f, &record)?;
        }
        self.share_host_exceptions();
        Ok(())
    }

    /// The receiving end of what the DNS proxy learns for host exceptions (once).
    pub(super) fn take_learn_rx(&mut self) -> Option<mpsc::Receiver<Learn>> {
        self.breakglass.take_learn_rx()
    }

    /// Tells the DNS proxy's sink the host exceptions in force (after each change, and when
    /// the proxy starts).
    pub(super) fn share_host_exceptions(&self) {
        let Some(n) = &self.names else { return };
        let rules = self
            .breakglass
            .list
            .iter()
            .filter_map(|e| {
                Some(HostRule {
                    id: e.id,
                    host: e.host.clone()?,
                    scope: e.scope.clone(),
                    until_ns: e.until_ns,
                })
            })
            .collect();
        n.sink.set_exceptions(HostExceptions {
            rules,
            tx: Some(self.breakglass.learn_tx.clone()),
            root: self.target.root.clone(),
        });
    }

    /// Addresses the proxy learned for host exception `l.id` from a covered asker: added to
    /// it (entries ending with it), in the kernel before the reply goes out.
    pub(super) fn learn_request(&mut self, l: Learn) {
        let r = self.learn(l.id, &l.addrs);
        let _ = l.reply.send(r);
    }

    fn learn(&mut self, id: u32, addrs: &[std::net::IpAddr]) -> Result<(), String> {
        let now = clock::boot_ns();
        let Some(i) = self
            .breakglass
            .list
            .iter()
            .position(|e| e.id == id && e.host.is_some() && !exceptions::expired(e, now))
        else {
            return Err("it has ended".into());
        };
        let e = &mut self.breakglass.list[i];
        let before = e.addresses.clone();
        for a in addrs {
            let a = a.to_string();
            if !e.addresses.contains(&a) {
                e.addresses.push(a);
            }
        }
        if e.addresses == before {
            return Ok(());
        }
        let added: Vec<String> = e.addresses[before.len()..].to_vec();
        if let Err(err) = self.sync_exceptions() {
            self.breakglass.list[i].addresses = before;
            let _ = self.sync_exceptions();
            warn!(id, error = %format!("{err:#}"), "break-glass exception: learned addresses not added");
            return Err(format!("{err:#}"));
        }
        let e = &self.breakglass.list[i];
        info!(
            id,
            host = e.host.as_deref().unwrap_or_default(),
            added = %added.join(","),
            scope = %e.scope,
            "break-glass exception: addresses learned"
        );
        Ok(())
    }

    /// `egress allow`: checks the request, resolves its scope, grants it in the kernel and
    /// reports it. Nothing changes unless all of that succeeds.
    pub(super) async fn allow_request(&mut self, r: AllowRequest, caller: Caller) -> Response {
        let ask = Ask {
            dest: &r.dest,
            port: r.port.as_deref(),
            protocol: r.protocol.as_deref(),
            for_secs: r.for_secs,
            reason: &r.reason,
        };
        let checked = match exceptions::check(&ask, self.breakglass.max_for) {
            Ok(c) => c,
            Err(e) => return Response::Refused(e),
        };
        if matches!(checked.target, Target::Host(_)) && self.names.is_none() {
            return Response::Refused(format!(
                "`{}` is a host name: a host exception needs the DNS proxy, which runs only while the policy uses names (a `[dns]` table or a service or block with `hosts`); grant an address or CIDR instead",
                r.dest.trim()
            ));
        }
        let scope = match self.exception_scope(&r) {
            Ok(s) => s,
            Err(e) => return Response::Refused(e),
        };
        let now = clock::boot_ns();
        let until_ns = exceptions::until_ns(now, checked.duration);
        let e = Exception {
            id: self.breakglass.next_id(),
            dest: match &checked.target {
                Target::Dest(d) => d.to_string(),
                Target::Host(_) => String::new(),
            },
            host: match checked.target {
                Target::Host(h) => Some(h),
                Target::Dest(_) => None,
            },
            addresses: Vec::new(),
            port: checked.port.map(|p| p.to_string()),
            protocol: r.protocol.as_ref().map(|p| p.trim().to_ascii_lowercase()),
            scope,
            reason: checked.reason,
            by_uid: caller.uid,
            by_user: nss::user_name(caller.uid),
            granted: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
            until: rfc3339_of(until_ns),
            until_ns,
        };
        self.breakglass.list.push(e.clone());
        if let Err(err) = self.sync_exceptions() {
            self.breakglass.list.retain(|x| x.id != e.id);
            // Back to what was in force (the failed write may have been partial).
            let _ = self.sync_exceptions();
            return Response::Refused(format!("{err:#}"));
        }
        self.exception_event(&e, "granted", None, None).await;
        Response::Exception(Box::new(e))
    }

    /// The scope of a request: exactly one of `--pid`, `--cgroup`, `--user`, resolved here
    /// (the controller's view of processes, cgroups and users is the one the kernel enforces).
    fn exception_scope(&self, r: &AllowRequest) -> Result<Scope, String> {
        match (r.pid, &r.cgroup, &r.user) {
            (Some(pid), None, None) => {
                if pid == 0 || !crate::sys::proc::is_process(pid) {
                    return Err(format!("--pid {pid}: no such process"));
                }
                Ok(Scope::Process { pid })
            }
            (None, Some(dir), None) => {
                let root = &self.target.root;
                let path = if Path::new(dir).is_absolute() {
                    PathBuf::from(dir)
                } else {
                    root.join(dir)
                };
                let path = path
                    .canonicalize()
                    .map_err(|e| format!("--cgroup {dir}: {e}"))?;
                let (id, level) = crate::sys::cgroup::id_and_level(root, &path)
                    .map_err(|e| format!("--cgroup {dir}: {e:#}"))?;
                if !path.join("cgroup.procs").exists() {
                    return Err(format!("--cgroup {dir}: not a cgroup2 directory"));
                }
                Ok(Scope::Cgroup {
                    path: path.display().to_string(),
                    id,
                    level,
                })
            }
            (None, None, Some(user)) => {
                let user = user.trim();
                let uid = match user.parse::<u32>() {
                    Ok(uid) => uid,
                    Err(_) => crate::policy::resolve::uid_of(user)
                        .map_err(|e| format!("--user {user}: {e}"))?,
                };
                Ok(Scope::User {
                    uid,
                    name: nss::user_name(uid),
                })
            }
            _ => Err("give exactly one of --pid, --cgroup, --user".into()),
        }
    }

    /// `egress revoke ID`.
    pub(super) async fn revoke_request(&mut self, id: u32, caller: Caller) -> Response {
        let Some(i) = self.breakglass.list.iter().position(|e| e.id == id) else {
            return Response::Refused(format!(
                "no live exception {id} (`egress grants` lists them)"
            ));
        };
        let e = self.breakglass.list.remove(i);
        if let Err(err) = self.sync_exceptions() {
            self.breakglass.list.insert(i, e);
            return Response::Refused(format!("{err:#}"));
        }
        let revoked = format!("revoked by uid {}", caller.uid);
        self.exception_event(&e, "revoked", Some(caller.uid), Some(revoked))
            .await;
        Response::Done(format!(
            "exception {id} revoked ({} for {})",
            e.what(),
            e.scope
        ))
    }

    /// At each tick: exceptions past their end (already ignored by the kernel), and process
    /// exceptions whose process exited, leave the map and are reported.
    pub(super) async fn expire_exceptions(&mut self) {
        if self.breakglass.list.is_empty() {
            return;
        }
        let now = clock::boot_ns();
        let ended: Vec<(Exception, Option<String>)> = self
            .breakglass
            .list
            .iter()
            .filter_map(|e| {
                if exceptions::expired(e, now) {
                    return Some((e.clone(), None));
                }
                match e.scope {
                    Scope::Process { pid } if !crate::sys::proc::is_process(pid) => {
                        Some((e.clone(), Some("the process exited".to_string())))
                    }
                    _ => None,
                }
            })
            .collect();
        if ended.is_empty() {
            return;
        }
        self.breakglass
            .list
            .retain(|e| !ended.iter().any(|(x, _)| x.id == e.id));
        if let Err(err) = self.sync_exceptions() {
            warn!(error = %format!("{err:#}"), "removing ended break-glass exceptions");
        }
        for (e, why) in ended {
            self.exception_event(&e, "expired", None, why).await;
        }
    }

    /// The live exceptions, for `egress grants` and `egress status`.
    pub(super) fn exception_rows(&self) -> Vec<Exception> {
        let now = clock::boot_ns();
        self.breakglass
            .list
            .iter()
            .filter(|e| !exceptions::expired(e, now))
            .cloned()
            .collect()
    }

    /// Writes the event (and log line) of a grant, revoke or expiry.
    async fn exception_event(
        &mut self,
        e: &Exception,
        action: &str,
        revoked_by: Option<u32>,
        ended: Option<String>,
    ) {
        let until = if action == "revoked" {
            humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
        } else {
            e.until.clone()
        };
        let ev = ExceptionEvent {
            ts: timestamp(SystemTime::now()),
            event: "exception".into(),
            meta: EventMeta::current(),
            action: action.into(),
            id: e.id,
            dest: e.dest.clone(),
            host: e.host.clone(),
            addresses: e.addresses.clone(),
            port: e.port.clone(),
            protocol: e.protocol.clone(),
            scope: e.scope.to_string(),
            reason: e.reason.clone(),
            until,
            by_uid: e.by_uid,
            by_user: e.by_user.clone(),
            revoked_by_uid: revoked_by,
            ended,
        };
        info!(
            id = e.id,
            action,
            dest = %e.what(),
            port = ?e.port,
            protocol = ?e.protocol,
            scope = %e.scope,
            reason = %e.reason,
            until = %ev.until,
            by_uid = e.by_uid,
            "break-glass exception {action}"
        );
        if let Some(w) = &self.webhook {
            w.send(&crate::webhook::Outgoing::Exception(Box::new(ev.clone())));
        }
        self.emit(&ev).await;
    }
}
