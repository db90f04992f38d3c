//! Pinned state under bpffs (`/sys/fs/bpf/egress` by default), so that enforcement outlives the
//! controller: `maps/<NAME>` for every map, `links/<hook>` and `links/tc-<iface>` for every
//! attachment. A pinned link stays attached until `egress stop` detaches it. The controller's
//! own bookkeeping ([`State`]: policy file, hash, generation, where it attached) is kept twice: in
//! a small JSON state file under /run/egress, and in `state`, a one-entry array map pinned beside
//! the links, since bpffs holds only BPF objects. The pinned copy lives and dies with the pins: a
//! service manager that empties /run on stop, or a stale file of pins removed by hand, cannot
//! make a restarted controller forget (or misremember) which policy the kernel enforces.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use egress_common::{Config, GrantKey, GrantValue, map_names};
use serde::{Deserialize, Serialize};

use super::{Counters, DatapathError, bpfsys, maps};

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/egress";
const BPFFS: &str = "/sys/fs/bpf";

/// Kernel name of the map holding the pinned copy of the [`State`]. It is not in the eBPF object
/// (no program reads it): the controller creates it.
const STATE_MAP: &str = "EGRESS_STATE";
/// Bytes of the pinned [`State`]: a little-endian u32 length, then that much JSON.
const STATE_MAP_VALUE: usize = 16 * 1024;
type StateValue = [u8; STATE_MAP_VALUE];

/// What the controller applied, kept beside the pins for restarts and `egress status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct State {
    pub pin_dir: String,
    pub cgroup: String,
    pub ifaces: Vec<String>,
    /// Where the policy came from, as reported (a path, or the embedded default's name).
    pub policy: String,
    /// The policy file, absolute, that a restarted controller reads back (None: the embedded
    /// default, or a state written before this field existed; then `policy` is the path).
    #[serde(default)]
    pub policy_path: Option<PathBuf>,
    /// Content hash of the policy of `generation` (empty: unknown).
    pub policy_hash: String,
    /// Hash of the entries its blocklists' feeds had when it was applied (empty: none, or a
    /// state written before blocklists existed).
    #[serde(default)]
    pub feeds_hash: String,
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
            rustix::mount::mount(
                "bpf",
                BPFFS,
                "bpf",
                rustix::mount::MountFlags::empty(),
                c"mode=0700",
            )
            .map_err(std::io::Error::from)
            .with_context(|| format!("mounting bpffs at {BPFFS}"))?;
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

    /// True when every map of the object is pinned here.
    pub fn maps_complete(&self) -> bool {
        map_names::ALL.iter().all(|n| self.map(n).exists())
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
    /// two controllers must never drive the same pinned maps. The lock is on the pin directory
    /// itself (bpffs), so controllers that share the pins but not /run (containers) exclude each
    /// other too.
    pub fn lock(&self) -> anyhow::Result<fs::File> {
        self.ensure()?;
        let dir =
            fs::File::open(&self.dir).with_context(|| format!("opening {}", self.dir.display()))?;
        if rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            bail!(
                "another egress controller is running on {}",
                self.dir.display()
            );
        }
        Ok(dir)
    }

    /// Whether a controller holds [`Pins::lock`] now.
    pub fn is_locked(&self) -> bool {
        let Ok(dir) = fs::File::open(&self.dir) else {
            return false;
        };
        // Released when `dir` closes.
        rustix::fs::flock(&dir, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err()
    }

    /// The pinned copy of the [`State`].
    pub fn state_pin(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// Records `state` in the pinned copy and in the state file. Both are attempted; the first
    /// failure is returned.
    pub fn write_state(&self, state: &State) -> anyhow::Result<()> {
        let pinned = self.write_state_pin(state);
        let path = self.state_path();
        if let Some(d) = path.parent() {
            fs::create_dir_all(d)?;
        }
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, serde_json::to_vec_pretty(state)?)?;
        fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        pinned
    }

    /// What the last controller recorded: the pinned copy, else the state file.
    pub fn read_state(&self) -> Option<State> {
        self.read_state_pin()
            .or_else(|| serde_json::from_slice(&fs::read(self.state_path()).ok()?).ok())
    }

    fn write_state_pin(&self, state: &State) -> anyhow::Result<()> {
        use aya::maps::{Array, Map, MapData};
        let json = serde_json::to_vec(state)?;
        let Some(value) = encode_state(&json) else {
            bail!(
                "the state ({} bytes) does not fit the pinned copy ({STATE_MAP_VALUE} bytes)",
                json.len()
            );
        };
        let path = self.state_pin();
        let data = match MapData::from_pin(&path) {
            Ok(d) => d,
            Err(_) => {
                let d = MapData::create(state_map_def(), STATE_MAP, None)
                    .with_context(|| format!("creating the {STATE_MAP} map"))?;
                d.pin(&path)
                    .with_context(|| format!("pinning {}", path.display()))?;
                d
            }
        };
        let mut map: Array<MapData, StateValue> = Array::try_from(Map::Array(data))
            .with_context(|| format!("{} is not the state map", path.display()))?;
        map.set(0, *value, 0)
            .with_context(|| format!("writing {}", path.display()))
    }

    fn read_state_pin(&self) -> Option<State> {
        use aya::maps::{Array, Map};
        let map: Array<_, StateValue> =
            maps::open_pinned(&self.state_pin(), STATE_MAP, Map::Array).ok()?;
        let value: Box<StateValue> = Box::new(map.get(&0, 0).ok()?);
        serde_json::from_slice(decode_state(&value)?).ok()
    }

    /// Removes the map pins (leftovers without links: the next load starts from fresh maps).
    pub fn remove_maps(&self) {
        for name in map_names::ALL {
            let _ = fs::remove_file(self.map(name));
        }
    }

    /// Checks every pinned map against the shape this controller's object gives it: another
    /// version's map with another layout is refused by name, with what differs. The maps named
    /// in `any_size` may have any `max_entries` (sizes chosen when they were created).
    pub(super) fn check_maps(
        &self,
        expected: &std::collections::HashMap<String, MapShape>,
        any_size: &[&str],
    ) -> Result<(), DatapathError> {
        for name in map_names::ALL {
            let Some(want) = expected.get(name) else {
                continue;
            };
            let info = aya::maps::MapInfo::from_pin(self.map(name))
                .map_err(|e| DatapathError::Pin(format!("reading pinned map {name}: {e}")))?;
            let have = MapShape {
                map_type: info
                    .map_type()
                    .map_err(|e| DatapathError::Pin(format!("pinned map {name}: {e}")))?
                    as u32,
                key_size: info.key_size(),
                value_size: info.value_size(),
                max_entries: info.max_entries(),
            };
            if let Err(differs) = have.fits(want, any_size.contains(&name)) {
                return Err(DatapathError::Pin(format!(
                    "the map {name} pinned under {} has another {differs} ({have:?}) than this egress uses ({want:?}): it was made by another version or with another size; `egress stop --pin-dir {}` first (the enforcement in place stays until then)",
                    self.dir.display(),
                    self.dir.display()
                )));
            }
        }
        Ok(())
    }

    /// Every pinned link with the id of the program it runs (0: detached).
    pub fn link_statuses(&self) -> Vec<LinkStatus> {
        self.links()
            .into_iter()
            .map(|(name, path)| {
                let prog_id = aya::programs::links::PinnedLink::from_pin(&path)
                    .ok()
                    .and_then(|l| aya::programs::links::FdLink::from(l).info().ok())
                    .map_or(0, |i| i.program_id());
                LinkStatus {
                    name,
                    prog_id,
                    attached: prog_id != 0,
                }
            })
            .collect()
    }

    /// What the pins say without a controller: the config in force, the counters, the links
    /// and the state file.
    pub fn status(&self) -> anyhow::Result<PinnedStatus> {
        use aya::maps::{Array, Map, PerCpuArray};
        if !self.adoptable() {
            bail!(
                "no controller is running and nothing is pinned under {}: egress is not enforcing",
                self.dir.display()
            );
        }
        let active: Array<_, u32> =
            maps::open_pinned(&self.map(map_names::ACTIVE), map_names::ACTIVE, Map::Array)?;
        let configs: Array<_, Config> =
            maps::open_pinned(&self.map(map_names::CONFIG), map_names::CONFIG, Map::Array)?;
        let stats: PerCpuArray<_, u64> = maps::open_pinned(
            &self.map(map_names::STATS),
            map_names::STATS,
            Map::PerCpuArray,
        )?;
        let buffer = active.get(&0, 0)? & 1;
        let now = crate::sys::clock::boot_ns();
        Ok(PinnedStatus {
            state: self.read_state().unwrap_or_default(),
            config: configs.get(&buffer, 0)?,
            counters: maps::sum_stats(&stats)?,
            links: self.link_statuses(),
            // Status is about the rest too: a grant map that cannot be read counts none.
            grants_live: self.grants().map_or(0, |g| {
                g.iter().filter(|(_, v)| v.until_ns > now).count() as u64
            }),
        })
    }

    /// Every entry of the pinned grant map (`GRANTS`), expired ones included: `egress grants`
    /// without a controller. The kernel knows addresses, cgroups and expiries, not names.
    pub fn grants(&self) -> anyhow::Result<Vec<(GrantKey, GrantValue)>> {
        use aya::maps::{HashMap, Map};
        if !self.adoptable() {
            bail!(
                "no controller is running and nothing is pinned under {}: egress is not enforcing",
                self.dir.display()
            );
        }
        let grants: HashMap<_, GrantKey, GrantValue> = maps::open_pinned(
            &self.map(map_names::GRANTS),
            map_names::GRANTS,
            Map::HashMap,
        )?;
        Ok(grants
            .iter()
            .collect::<Result<_, _>>()
            .map_err(maps::err(map_names::GRANTS))?)
    }

    /// Detaches every pinned link and removes every pin and the state file: enforcement stops.
    pub fn remove_all(&self) -> anyhow::Result<Removed> {
        let mut removed = Removed::default();
        for (name, path) in self.links() {
            if let Ok(fd) = bpfsys::obj_get(&path) {
                use std::os::fd::AsFd as _;
                match bpfsys::link_detach(fd.as_fd()) {
                    // A tracepoint (perf event) link cannot be detached by command: it goes with
                    // its last reference, the pin removed below.
                    Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {}
                    r => r.with_context(|| format!("detaching {}", path.display()))?,
                }
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
        let _ = fs::remove_file(self.state_pin());
        let _ = fs::remove_dir(&self.dir);
        let _ = fs::remove_file(self.state_path());
        Ok(removed)
    }
}

/// The definition of the map holding the pinned [`State`]: one array entry of bytes.
fn state_map_def() -> aya_obj::Map {
    aya_obj::Map::Legacy(aya_obj::maps::LegacyMap {
        def: aya_obj::maps::bpf_map_def {
            map_type: aya_obj::generated::bpf_map_type::BPF_MAP_TYPE_ARRAY as u32,
            key_size: size_of::<u32>() as u32,
            value_size: STATE_MAP_VALUE as u32,
            max_entries: 1,
            map_flags: 0,
            id: 0,
            pinning: aya_obj::maps::PinningType::None,
        },
        inner_def: None,
        section_index: 0,
        section_kind: aya_obj::EbpfSectionKind::Maps,
        symbol_index: None,
        data: Vec::new(),
    })
}

/// `json` as the pinned state's value; None when it does not fit.
fn encode_state(json: &[u8]) -> Option<Box<StateValue>> {
    let len = u32::try_from(json.len()).ok()?;
    let end = 4 + json.len();
    if end > STATE_MAP_VALUE {
        return None;
    }
    let mut value = Box::new([0u8; STATE_MAP_VALUE]);
    value[..4].copy_from_slice(&len.to_le_bytes());
    value[4..end].copy_from_slice(json);
    Some(value)
}

/// The JSON in a pinned state's value; None when there is none (never written) or it is damaged.
fn decode_state(value: &StateValue) -> Option<&[u8]> {
    let len = u32::from_le_bytes(value[..4].try_into().ok()?) as usize;
    (len > 0).then(|| value.get(4..4 + len)).flatten()
}

/// What makes two maps interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapShape {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
}

impl MapShape {
    /// Whether a map of this shape can be used as one of shape `want`; `any_size`: whatever its
    /// `max_entries`. The error names what differs: `layout` (type, key or value size) or
    /// `size`.
    pub fn fits(&self, want: &MapShape, any_size: bool) -> Result<(), &'static str> {
        let layout = (self.map_type, self.key_size, self.value_size)
            == (want.map_type, want.key_size, want.value_size);
        if !layout {
            Err("layout")
        } else if !any_size && self.max_entries != want.max_entries {
            Err("size")
        } else {
            Ok(())
        }
    }
}

/// A pinned link and the program it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkStatus {
    pub name: String,
    /// 0 once the link is detached.
    pub prog_id: u32,
    pub attached: bool,
}

/// What [`Pins::status`] reads.
#[derive(Debug, Clone)]
pub struct PinnedStatus {
    pub state: State,
    /// The config of the buffer in force.
    pub config: Config,
    pub counters: Counters,
    pub links: Vec<LinkStatus>,
    /// Unexpired entries of the grant map.
    pub grants_live: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_state_reads_back_as_written() {
        let state = State {
            policy: "/etc/egress/policy.toml".into(),
            policy_path: Some("/etc/egress/policy.toml".into()),
            policy_hash: "00ff00ff00ff00ff".into(),
            feeds_hash: String::new(),
            generation: 7,
            mode: "enforce".into(),
            ..State::default()
        };
        let json = serde_json::to_vec(&state).unwrap();
        let value = encode_state(&json).expect("a state fits");
        let back: State = serde_json::from_slice(decode_state(&value).unwrap()).unwrap();
        assert_eq!(back, state);
    }

    #[test]
    fn a_state_that_does_not_fit_is_refused_and_a_blank_one_is_none() {
        assert!(encode_state(&[b' '; STATE_MAP_VALUE - 4]).is_some());
        assert!(encode_state(&[b' '; STATE_MAP_VALUE - 3]).is_none());
        assert_eq!(decode_state(&[0; STATE_MAP_VALUE]), None);
        let mut damaged = [0u8; STATE_MAP_VALUE];
        damaged[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode_state(&damaged), None);
    }

    #[test]
    fn a_state_written_before_policy_path_existed_still_reads() {
        let old = r#"{"pin_dir":"/sys/fs/bpf/egress","cgroup":"/sys/fs/cgroup","ifaces":[],
            "policy":"/etc/p.toml","policy_hash":"ab","generation":2,"applied_at":"",
            "mode":"enforce","default":"deny","controller_pid":1,"socket":""}"#;
        let s: State = serde_json::from_str(old).unwrap();
        assert_eq!(s.policy_path, None);
        assert_eq!(s.generation, 2);
    }
}
