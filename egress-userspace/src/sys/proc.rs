//! Processes, as /proc describes them (read with the `procfs` crate): what accounting and alerts
//! report about a sender, and whether it still runs. Behind [`ProcSource`] so that the
//! accounting is unit-tested without a kernel.

/// What /proc tells about a process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub comm: String,
    pub exe: String,
    pub cmdline: String,
    pub uid: Option<u32>,
    pub ppid: Option<u32>,
}

/// Where process details come from (/proc in production).
pub trait ProcSource {
    fn info(&self, tgid: u32) -> Option<ProcInfo>;
    fn alive(&self, tgid: u32) -> bool;
}

/// The real /proc.
pub struct Procfs;

fn process(tgid: u32) -> Option<procfs::process::Process> {
    procfs::process::Process::new(i32::try_from(tgid).ok()?).ok()
}

impl ProcSource for Procfs {
    fn info(&self, tgid: u32) -> Option<ProcInfo> {
        let p = process(tgid)?;
        let stat = p.stat().ok()?;
        Some(ProcInfo {
            comm: stat.comm,
            exe: p.exe().map(|e| e.display().to_string()).unwrap_or_default(),
            cmdline: p.cmdline().map(|args| args.join(" ")).unwrap_or_default(),
            uid: p.status().ok().map(|s| s.ruid),
            ppid: u32::try_from(stat.ppid).ok(),
        })
    }

    fn alive(&self, tgid: u32) -> bool {
        // A zombie has no exe and sends nothing more: state Z counts as exited.
        process(tgid)
            .and_then(|p| p.stat().ok())
            .is_some_and(|s| s.state != 'Z')
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
        assert!(info.exe.starts_with('/'), "{}", info.exe);
        assert_eq!(info.uid, Some(rustix::process::getuid().as_raw()));
        assert!(Procfs.alive(me));
        assert!(cgroup_of(me).is_some_and(|c| c.starts_with('/')));
        assert!(!Procfs.alive(u32::MAX - 1));
        assert!(is_process(me));
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
