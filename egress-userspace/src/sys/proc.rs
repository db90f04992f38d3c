//! Processes, as /proc describes them (read with the `procfs` crate): what accounting, alerts and
//! events report about a sender, and whether it still runs. Behind [`ProcSource`] so that the
//! accounting, the alerts and the [`ExeCache`] are unit-tested without a kernel.
//!
//! A pid alone does not name a process: the kernel gives a freed pid to the next process that
//! needs one. So what is read about a process is kept with its start time (`/proc/PID/stat`
//! field 22), and every read of one process goes through one handle on `/proc/PID` (the
//! `procfs` crate opens the directory once): a handle on a process that exited reads nothing,
//! never the process that took its pid.

use std::collections::HashMap;

/// What /proc tells about a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub comm: String,
    /// The full path of the executable, as the kernel gives it (a ` (deleted)` suffix kept);
    /// None when it could not be read (the process was gone, or is a kernel thread).
    pub exe: Option<String>,
    pub cmdline: String,
    /// Real uid.
    pub uid: Option<u32>,
    /// Real gid.
    pub gid: Option<u32>,
    pub ppid: Option<u32>,
    /// When the process started (clock ticks since boot): with the pid, what tells it from a
    /// later process given the same pid.
    pub start_time: Option<u64>,
}

/// A process's executable, read with its start time through one handle on `/proc/PID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExeRead {
    /// Clock ticks since boot.
    pub start_time: u64,
    /// None: the process has no executable to read (it is exiting, or a kernel thread).
    pub exe: Option<String>,
}

/// Where process details come from (/proc in production).
pub trait ProcSource {
    /// Everything known about the live process `tgid`; None when it is gone.
    fn info(&self, tgid: u32) -> Option<ProcInfo>;
    /// The start time of the live process `tgid` (clock ticks since boot); None when it is gone
    /// or a zombie (a zombie sends nothing more).
    fn start_time(&self, tgid: u32) -> Option<u64>;
    /// The executable of the live process `tgid`, with its start time; None when it is gone.
    fn exe(&self, tgid: u32) -> Option<ExeRead>;
    /// Whether `tgid` is a live process.
    fn alive(&self, tgid: u32) -> bool {
        self.start_time(tgid).is_some()
    }
}

/// The real /proc.
pub struct Procfs;

fn process(tgid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(tgid).ok()?).ok()
}

/// The executable of the live process `tgid` (its full path), None when it cannot be read.
pub fn exe_of(tgid: u32) -> Option<String> {
    exe_path(&process(tgid)?)
}

fn exe_path(p: &procfs::process::Process) -> Option<String> {
    p.exe().ok().map(|e| e.display().to_string())
}

impl ProcSource for Procfs {
    fn info(&self, tgid: u32) -> Option<ProcInfo> {
        let p = process(tgid)?;
        let stat = p.stat().ok()?;
        let status = p.status().ok();
        Some(ProcInfo {
            comm: stat.comm,
            exe: exe_path(&p),
            cmdline: p.cmdline().map(|args| args.join(" ")).unwrap_or_default(),
            uid: status.as_ref().map(|s| s.ruid),
            gid: status.as_ref().map(|s| s.rgid),
            ppid: u32::try_from(stat.ppid).ok(),
            start_time: Some(stat.starttime),
        })
    }

    fn start_time(&self, tgid: u32) -> Option<u64> {
        process(tgid)
            .and_then(|p| p.stat().ok())
            .filter(|s| s.state != 'Z')
            .map(|s| s.starttime)
    }

    fn exe(&self, tgid: u32) -> Option<ExeRead> {
        let p = process(tgid)?;
        let stat = p.stat().ok()?;
        Some(ExeRead {
            start_time: stat.starttime,
            exe: exe_path(&p),
        })
    }
}

/// The live processes (thread-group leaders, not zombies) whose executable is `exe`, as
/// `/proc/PID/exe` gives it.
pub fn running(exe: &str) -> Vec<u32> {
    let Ok(all) = procfs::process::all_processes() else {
        return Vec::new();
    };
    all.filter_map(Result::ok)
        .filter(|p| exe_path(p).as_deref() == Some(exe))
        .filter(|p| p.stat().is_ok_and(|s| s.state != 'Z'))
        .filter_map(|p| u32::try_from(p.pid).ok())
        .collect()
}

/// Nanoseconds per clock tick of `/proc/PID/stat` times (`sysconf(_SC_CLK_TCK)`).
fn ns_per_tick() -> u64 {
    1_000_000_000 / procfs::ticks_per_second().max(1)
}

/// Entries an [`ExeCache`] holds at most (a deny flood from many short-lived processes must not
/// grow it without bound; past it, executables are read without being kept).
pub const EXE_CACHE_CAPACITY: usize = 65_536;

#[derive(Debug, Clone)]
struct CachedExe {
    start_time: u64,
    exe: Option<String>,
}

/// The executables of the processes that sent events, by tgid, each with the start time of the
/// process it was read from: read from `/proc/PID/exe` the first time a process is seen,
/// served from here after, and dropped when the process exits ([`ExeCache::prune`]). An event
/// whose process is gone before its executable could be read gets none, never the executable
/// of whoever holds the pid now: a process that started after the event cannot have sent it.
#[derive(Debug)]
pub struct ExeCache {
    entries: HashMap<u32, CachedExe>,
    ns_per_tick: u64,
    capacity: usize,
}

impl Default for ExeCache {
    fn default() -> Self {
        ExeCache::new(ns_per_tick(), EXE_CACHE_CAPACITY)
    }
}

impl ExeCache {
    /// An empty cache for start times counted in ticks of `ns_per_tick`, holding at most
    /// `capacity` processes.
    pub fn new(ns_per_tick: u64, capacity: usize) -> ExeCache {
        ExeCache {
            entries: HashMap::new(),
            ns_per_tick,
            capacity,
        }
    }

    /// Whether a process that started at `start_time` (ticks) started after `ts_ns`
    /// (CLOCK_BOOTTIME, as the kernel stamps events; the start time counts from boot on the
    /// same clock). Start times are rounded down to a tick, so this never says "after" of the
    /// process that sent an event.
    fn started_after(&self, start_time: u64, ts_ns: u64) -> bool {
        start_time.saturating_mul(self.ns_per_tick) > ts_ns
    }

    /// The executable of process `tgid` as of an event it sent at `ts_ns` (CLOCK_BOOTTIME);
    /// None when it cannot be known (the process is gone and was never read, or the pid now
    /// belongs to a later process).
    pub fn resolve(&mut self, procs: &dyn ProcSource, tgid: u32, ts_ns: u64) -> Option<String> {
        if tgid == 0 {
            return None;
        }
        let now = procs.start_time(tgid);
        if let Some(e) = self.entries.get(&tgid) {
            let same = now == Some(e.start_time);
            // Gone, or replaced by a process that started after the event: the cached process
            // (which started before the event) sent it.
            let replaced_since = match now {
                None => true,
                Some(s) => self.started_after(s, ts_ns),
            };
            if same || (replaced_since && !self.started_after(e.start_time, ts_ns)) {
                return e.exe.clone();
            }
        }
        let read = procs.exe(tgid)?;
        if self.started_after(read.start_time, ts_ns) {
            return None;
        }
        if self.entries.len() < self.capacity || self.entries.contains_key(&tgid) {
            self.entries.insert(
                tgid,
                CachedExe {
                    start_time: read.start_time,
                    exe: read.exe.clone(),
                },
            );
        }
        read.exe
    }

    /// Takes what another reader of /proc (the accounting) learned about a live process: an
    /// event it sends after exiting too fast to be read here is still named. An entry of the
    /// same process is kept as it is.
    pub fn learn(&mut self, tgid: u32, start_time: u64, exe: Option<&str>) {
        if tgid == 0
            || self
                .entries
                .get(&tgid)
                .is_some_and(|e| e.start_time == start_time)
        {
            return;
        }
        if self.entries.len() < self.capacity || self.entries.contains_key(&tgid) {
            self.entries.insert(
                tgid,
                CachedExe {
                    start_time,
                    exe: exe.map(str::to_string),
                },
            );
        }
    }

    /// Drops the entries of processes that have exited (or whose pid another process holds now),
    /// and reads again the executable of those that live: a process that executed another
    /// program is named by it from then on.
    pub fn prune(&mut self, procs: &dyn ProcSource) {
        self.entries.retain(|&tgid, e| match procs.exe(tgid) {
            Some(read) if read.start_time == e.start_time => {
                if read.exe.is_some() {
                    e.exe = read.exe;
                }
                true
            }
            _ => false,
        });
    }

    /// Processes held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no process is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// True when `pid` is a live process (the leader of its thread group, not a zombie), not a
/// thread of another process and not gone.
pub fn is_process(pid: u32) -> bool {
    process(pid).is_some_and(|p| {
        p.status()
            .is_ok_and(|s| u32::try_from(s.tgid) == Ok(pid) && !s.state.starts_with('Z'))
    })
}

/// The cgroup2 path of a process relative to the cgroup2 root (`/system.slice/x.service`), from
/// `/proc/<pid>/cgroup`.
pub fn cgroup_of(tgid: u32) -> Option<String> {
    process(tgid)?
        .cgroups()
        .ok()?
        .into_iter()
        .find(|c| c.hierarchy == 0)
        .map(|c| c.pathname)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let info = Procfs.info(me).expect("our own /proc entry");
        assert!(!info.comm.is_empty());
        let exe = info.exe.clone().expect("our own executable");
        assert_eq!(exe, std::env::current_exe().unwrap().display().to_string());
        assert_eq!(info.uid, Some(rustix::process::getuid().as_raw()));
        assert_eq!(info.gid, Some(rustix::process::getgid().as_raw()));
        let start = info.start_time.expect("a start time");
        assert_eq!(Procfs.start_time(me), Some(start));
        assert_eq!(
            Procfs.exe(me),
            Some(ExeRead {
                start_time: start,
                exe: Some(exe.clone())
            })
        );
        assert_eq!(Procfs.exe(u32::MAX - 1), None);
        assert!(Procfs.alive(me));
        assert!(cgroup_of(me).is_some_and(|c| c.starts_with('/')));
        assert!(!Procfs.alive(u32::MAX - 1));
        assert!(is_process(me));
        assert!(running(&exe).contains(&me), "we run our own executable");
        assert!(running("/nonexistent/exe").is_empty());
        assert!(!is_process(u32::MAX - 1));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tid_tx.send(unsafe { libc::gettid() } as u32).unwrap();
            let _ = done_rx.recv();
        });
        let tid = tid_rx.recv().unwrap();
        assert!(Procfs.alive(tid), "a live thread has a /proc entry");
        assert!(!is_process(tid), "but a thread of ours is not a process");
        done_tx.send(()).unwrap();
        thread.join().unwrap();
    }
}

#[cfg(test)]
mod exe_cache_tests {
    use std::cell::RefCell;

    use super::*;

    /// Processes by tgid: (start time in ticks, executable).
    #[derive(Default)]
    struct Fake(RefCell<HashMap<u32, (u64, Option<String>)>>);

    impl Fake {
        fn set(&self, tgid: u32, start: u64, exe: &str) {
            self.0.borrow_mut().insert(tgid, (start, Some(exe.into())));
        }
        fn exit(&self, tgid: u32) {
            self.0.borrow_mut().remove(&tgid);
        }
    }

    impl ProcSource for Fake {
        fn info(&self, _: u32) -> Option<ProcInfo> {
            unreachable!("the cache reads executables only")
        }
        fn start_time(&self, tgid: u32) -> Option<u64> {
            self.0.borrow().get(&tgid).map(|p| p.0)
        }
        fn exe(&self, tgid: u32) -> Option<ExeRead> {
            self.0.borrow().get(&tgid).map(|(s, e)| ExeRead {
                start_time: *s,
                exe: e.clone(),
            })
        }
    }

    /// 10 ms ticks: tick t starts at t * 10 ms.
    const TICK: u64 = 10_000_000;

    fn some(s: &str) -> Option<String> {
        Some(s.into())
    }

    #[test]
    fn read_once_and_kept_after_the_process_exits() {
        let procs = Fake::default();
        let mut c = ExeCache::new(TICK, 16);
        procs.set(7, 100, "/usr/bin/curl");
        assert_eq!(c.resolve(&procs, 7, 150 * TICK), some("/usr/bin/curl"));
        // It exits; an event it sent before is still drained later.
        procs.exit(7);
        assert_eq!(c.resolve(&procs, 7, 151 * TICK), some("/usr/bin/curl"));
        assert_eq!(c.resolve(&procs, 0, 151 * TICK), None, "no process");
    }

    #[test]
    fn a_reused_pid_is_never_named_by_the_wrong_process() {
        let procs = Fake::default();
        let mut c = ExeCache::new(TICK, 16);
        procs.set(7, 100, "/usr/bin/curl");
        assert_eq!(c.resolve(&procs, 7, 150 * TICK), some("/usr/bin/curl"));
        // curl exits and pid 7 goes to another program at tick 500.
        procs.set(7, 500, "/usr/bin/rsync");
        // An event curl sent before it exited, drained now: still curl.
        assert_eq!(c.resolve(&procs, 7, 160 * TICK), some("/usr/bin/curl"));
        // An event of the new process: rsync, read afresh and kept.
        assert_eq!(c.resolve(&procs, 7, 510 * TICK), some("/usr/bin/rsync"));
        procs.exit(7);
        assert_eq!(c.resolve(&procs, 7, 520 * TICK), some("/usr/bin/rsync"));
    }

    #[test]
    fn a_process_gone_before_it_was_read_has_no_executable() {
        let procs = Fake::default();
        let mut c = ExeCache::new(TICK, 16);
        // Gone: nothing to read.
        assert_eq!(c.resolve(&procs, 9, 100 * TICK), None);
        // Gone, and its pid already taken by a process that started after the event: that
        // process's executable is not the sender's.
        procs.set(9, 300, "/usr/bin/other");
        assert_eq!(c.resolve(&procs, 9, 200 * TICK), None);
        assert!(c.is_empty(), "nothing wrong was kept");
        // The new process's own events name it.
        assert_eq!(c.resolve(&procs, 9, 301 * TICK), some("/usr/bin/other"));
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn what_the_accounting_learned_names_a_process_that_exited_unread() {
        let procs = Fake::default();
        let mut c = ExeCache::new(TICK, 16);
        c.learn(5, 100, Some("/usr/bin/curl"));
        // Gone before the event was drained: named all the same.
        assert_eq!(c.resolve(&procs, 5, 120 * TICK), some("/usr/bin/curl"));
        // Learned again for the same process: kept; for a later one in the pid: replaced.
        c.learn(5, 100, Some("/other"));
        assert_eq!(c.resolve(&procs, 5, 121 * TICK), some("/usr/bin/curl"));
        c.learn(5, 300, Some("/usr/bin/rsync"));
        assert_eq!(c.resolve(&procs, 5, 301 * TICK), some("/usr/bin/rsync"));
        // An event older than the process now known: not named by it.
        assert_eq!(c.resolve(&procs, 5, 200 * TICK), None);
    }

    #[test]
    fn a_deleted_executable_keeps_the_kernels_suffix() {
        let procs = Fake::default();
        let mut c = ExeCache::new(TICK, 16);
        procs.set(3, 1, "/opt/app/bin/app (deleted)");
        assert_eq!(
            c.resolve(&procs, 3, 2 * TICK),
            some("/opt/app/bin/app (deleted)")
        );
    }

    #[test]
    fn prune_drops_exited_and_replaced_processes_and_follows_an_exec() {
        let procs = Fake::default();
        let mut c = ExeCache::new(TICK, 16);
        for (tgid, exe) in [(1, "/bin/a"), (2, "/bin/b"), (3, "/bin/sh")] {
            procs.set(tgid, 10, exe);
            assert_eq!(c.resolve(&procs, tgid, 20 * TICK), some(exe));
        }
        procs.exit(1);
        procs.set(2, 40, "/bin/c");
        // 3 executes curl: same process, another program.
        procs.set(3, 10, "/usr/bin/curl");
        c.prune(&procs);
        assert_eq!(c.len(), 1);
        assert_eq!(c.resolve(&procs, 3, 50 * TICK), some("/usr/bin/curl"));
        assert_eq!(c.resolve(&procs, 1, 50 * TICK), None, "forgotten");
    }

    #[test]
    fn a_full_cache_still_answers_without_keeping() {
        let procs = Fake::default();
        let mut c = ExeCache::new(TICK, 2);
        for tgid in 1..=3 {
            procs.set(tgid, 1, &format!("/bin/p{tgid}"));
            assert_eq!(c.resolve(&procs, tgid, TICK), Some(format!("/bin/p{tgid}")));
        }
        assert_eq!(c.len(), 2);
    }
}
