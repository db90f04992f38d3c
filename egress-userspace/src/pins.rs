//! Pinned state under bpffs (`/sys/fs/bpf/egress` by default), so that enforcement outlives the
//! controller: `maps/<NAME>` for every map, `links/<hook>` and `links/tc-<iface>` for every
//! attachment. A pinned link stays attached until `egress stop` detaches it. The controller's
//! own bookkeeping (policy file, hash, generation, where it attached) goes to a small JSON state
//! file under /run/egress, since bpffs holds only BPF objects.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use crate::bpfsys;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress";
const BPFFS: &str = "/sys/fs/bpf";

/// What the controller applied, kept beside the pins for restarts and `egress status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub pin_dir: String,
    pub cgroup: String,
    pub ifaces: Vec<String>,
    pub policy: String,
    pub policy_hash: String,
    pub generation: u32,
    pub applied_at: String,
    pub mode: String,
    pub default: String,
    pub controller_pid: u32,
    pub socket: String,
}

/// What `egress stop` removed.
#[derive(Debug, Default)]
pub struct Removed {
    pub links: Vec<String>,
    pub maps: usize,
}

#[derive(Debug, Clone)]
pub struct Pins {
    pub dir: PathBuf,
}

fn bpffs_mounted_at(dir: &Path) -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|m| {
        m.lines().any(|l| {
            let mut f = l.split_whitespace();
            let (_dev, mnt, fstype) = (f.next(), f.next(), f.next());
            fstype == Some("bpf") && mnt.is_some_and(|mnt| dir.starts_with(mnt))
        })
    })
}

impl Pins {
    pub fn new(dir: impl Into<PathBuf>) -> Pins {
        Pins { dir: dir.into() }
    }

    /// Mounts bpffs at /sys/fs/bpf when it is absent (as agents do) and creates the directories.
    pub fn ensure(&self) -> anyhow::Result<()> {
        if !bpffs_mounted_at(&self.dir) {
            if !self.dir.starts_with(BPFFS) {
                bail!("{} is not on a bpffs mount", self.dir.display());
            }
            fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
            // SAFETY: valid NUL-terminated strings.
            let rc = unsafe {
                libc::mount(
                    c"bpf".as_ptr(),
                    c"/sys/fs/bpf".as_ptr(),
                    c"bpf".as_ptr(),
                    0,
                    c"mode=0700".as_ptr().cast(),
                )
            };
            if rc != 0 {
                bail!(
                    "mounting bpffs at {BPFFS}: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        for sub in ["maps", "links"] {
            let d = self.dir.join(sub);
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        Ok(())
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join("maps").join(name)
    }

    pub fn link(&self, name: &str) -> PathBuf {
        self.dir.join("links").join(name)
    }

    /// The pinned links (name, path).
    pub fn links(&self) -> Vec<(String, PathBuf)> {
        let mut out: Vec<(String, PathBuf)> = fs::read_dir(self.dir.join("links"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// True when a previous controller left its programs attached here.
    pub fn adoptable(&self) -> bool {
        !self.links().is_empty()
    }

    pub fn state_path(&self) -> PathBuf {
        let tag: String = self
            .dir
            .display()
            .to_string()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        PathBuf::from("/run/egress").join(format!("{tag}.state.json"))
    }

    /// Takes the controller lock of this pin directory for as long as the returned file lives:
    /// two controllers must never drive the same pinned maps.
    pub fn lock(&self) -> anyhow::Result<fs::File> {
        use std::os::fd::AsRawFd as _;
        let path = self.state_path().with_extension("lock");
        if let Some(d) = path.parent() {
            fs::create_dir_all(d)?;
        }
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another egress controller is running on {} (lock {})",
                self.dir.display(),
                path.display()
            );
        }
        Ok(f)
    }

    pub fn write_state(&self, state: &State) -> anyhow::Result<()> {
        let path = self.state_path();
        if let Some(d) = path.parent() {
            fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    pub fn read_state(&self) -> Option<State> {
        serde_json::from_slice(&fs::read(self.state_path()).ok()?).ok()
    }

    /// Detaches every pinned link and removes every pin and the state file: enforcement stops.
    pub fn remove_all(&self) -> anyhow::Result<Removed> {
        let mut removed = Removed::default();
        for (name, path) in self.links() {
            if let Ok(fd) = bpfsys::obj_get(&path) {
                use std::os::fd::AsFd as _;
                bpfsys::link_detach(fd.as_fd())
                    .with_context(|| format!("detaching {}", path.display()))?;
            }
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed.links.push(name);
        }
        if let Ok(rd) = fs::read_dir(self.dir.join("maps")) {
            for e in rd.filter_map(Result::ok) {
                fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
                removed.maps += 1;
            }
        }
        for sub in ["links", "maps"] {
            let _ = fs::remove_dir(self.dir.join(sub));
        }
        let _ = fs::remove_dir(&self.dir);
        let _ = fs::remove_file(self.state_path());
        Ok(removed)
    }
}

/// Every pinned link with the id of the program it runs (0: detached).
pub fn link_report(pins: &Pins) -> serde_json::Value {
    let links: Vec<serde_json::Value> = pins
        .links()
        .into_iter()
        .map(|(name, path)| {
            let prog_id = bpfsys::obj_get(&path)
                .and_then(bpfsys::link_prog_id)
                .unwrap_or(0);
            serde_json::json!({ "name": name, "prog_id": prog_id, "attached": prog_id != 0 })
        })
        .collect();
    serde_json::Value::Array(links)
}

/// `egress status` without a controller: what the pins and the state file say.
pub fn status_from_pins(pins: &Pins) -> anyhow::Result<serde_json::Value> {
    use aya::maps::{Array, Map, MapData, PerCpuArray};
    if !pins.adoptable() {
        bail!(
            "no controller is running and nothing is pinned under {}: egress is not enforcing",
            pins.dir.display()
        );
    }
    let state = pins.read_state().unwrap_or_default();
    let open = |name: &str| {
        MapData::from_pin(pins.map(name)).with_context(|| format!("opening pinned map {name}"))
    };
    let active = {
        let m = Map::Array(open("ACTIVE")?);
        let a: Array<_, u32> = Array::try_from(m)?;
        a.get(&0, 0)? & 1
    };
    let config = {
        let m = Map::Array(open("CONFIG")?);
        let a: Array<_, egress_common::Config> = Array::try_from(m)?;
        a.get(&active, 0)?
    };
    let stats = {
        let m = Map::PerCpuArray(open("STATS")?);
        let a: PerCpuArray<_, u64> = PerCpuArray::try_from(m)?;
        let sum = |i: u32| a.get(&i, 0).map(|v| v.iter().sum::<u64>()).unwrap_or(0);
        serde_json::json!({
            "allowed": sum(egress_common::STAT_ALLOWED),
            "denied": sum(egress_common::STAT_DENIED),
            "audited": sum(egress_common::STAT_AUDITED),
            "events_lost": sum(egress_common::STAT_EVENTS_LOST),
            "tc_dropped": sum(egress_common::STAT_TC_DROPPED),
            "budget_dropped": sum(egress_common::STAT_BUDGET_DROPPED),
        })
    };
    Ok(serde_json::json!({
        "controller": { "running": false, "last_pid": state.controller_pid },
        "policy": {
            "source": state.policy,
            "generation": config.generation,
            "hash": state.policy_hash,
            "applied_at": state.applied_at,
            "mode": if config.mode == egress_common::MODE_AUDIT { "audit" } else { "enforce" },
            "default": if config.default_verdict == egress_common::DEFAULT_ALLOW { "allow" } else { "deny" },
        },
        "attached": {
            "cgroup": state.cgroup,
            "hooks": crate::datapath::HOOKS,
            "tc": { "program": crate::datapath::TC_PROGRAM, "ifaces": state.ifaces },
            "pinned": pins.dir.display().to_string(),
        },
        "links": link_report(pins),
        "counters": stats,
    }))
}
