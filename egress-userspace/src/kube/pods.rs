//! The pods of this node, as the watch last saw them, and which pod a cgroup belongs to.
//!
//! A cgroup id (what the kernel reports) becomes a pod in two steps: its path, found by a
//! bounded walk of the kubepods subtree (a cgroup2 directory's inode is its id; the walk's
//! answers are kept, and an id it does not know walks again once: cgroup ids are never reused
//! and a cgroup never leaves its parent, so an id the walk after its first sighting did not find
//! is not a pod's, and is remembered as such), then the pod UID and
//! container id the path names ([`super::cgroup_path::parse`]), matched against the watched
//! pods. The path is known as soon as kubelet creates the cgroup; the pod's name and labels only
//! once the watch has delivered it.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use tracing::warn;

use super::cgroup_path::{self, CgroupRef, Driver};

/// A pod of this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// `"guaranteed"`, `"burstable"` or `"besteffort"` (empty until the API server has set
    /// `status.qosClass`).
    pub qos: String,
    /// (name, runtime id) of every container that has one (init and ephemeral containers
    /// included), the runtime's prefix (`containerd://`) stripped.
    pub containers: Vec<(String, String)>,
    /// A static pod's `kubernetes.io/config.hash`: the UID its cgroup carries.
    pub config_hash: Option<String>,
}

impl PodInfo {
    /// The pod as the API server describes it; None without a UID.
    pub fn from_pod(pod: &Pod) -> Option<PodInfo> {
        let meta = &pod.metadata;
        let status = pod.status.as_ref();
        let statuses = status.into_iter().flat_map(|s| {
            [
                &s.container_statuses,
                &s.init_container_statuses,
                &s.ephemeral_container_statuses,
            ]
            .into_iter()
            .flatten()
            .flatten()
        });
        Some(PodInfo {
            uid: meta.uid.clone()?,
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
            node: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            labels: meta.labels.clone().unwrap_or_default(),
            qos: status
                .and_then(|s| s.qos_class.as_deref())
                .map(str::to_ascii_lowercase)
                .unwrap_or_default(),
            containers: statuses.filter_map(container_id).collect(),
            config_hash: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get("kubernetes.io/config.hash"))
                .cloned(),
        })
    }
}

/// `containerd://9d1b...` → (name, `9d1b...`).
fn container_id(s: &ContainerStatus) -> Option<(String, String)> {
    let id = s.container_id.as_deref()?;
    let id = id.split_once("://").map_or(id, |(_, id)| id);
    (!id.is_empty()).then(|| (s.name.clone(), id.to_string()))
}

/// Cgroups remembered as not pods' (the set is emptied when it reaches this size).
const MISSES_MAX: usize = 65_536;

/// Directories one walk visits at most (a node runs at most a few hundred pods, each with a
/// handful of cgroups).
const WALK_LIMIT: usize = 65_536;

/// Where the pods' cgroups are.
#[derive(Debug, Clone)]
pub struct CgroupLayout {
    /// The cgroup2 mount.
    pub cgroup2_root: PathBuf,
    /// The kubepods root (absolute), None until one exists (auto-detection looks again).
    pub kubepods: Option<PathBuf>,
    /// Given with `--kubernetes-cgroup-root`: never re-detected.
    pub fixed: bool,
}

/// The kubepods roots kubelet makes, by driver and `cgroupRoot`, in the order looked for.
pub const KUBEPODS_ROOTS: [&str; 4] = [
    "kubepods.slice",
    "kubepods",
    "kubelet.slice/kubelet-kubepods.slice",
    "kubelet/kubepods",
];

impl CgroupLayout {
    /// `kubepods` given (relative to the cgroup2 root, or absolute below it), or detected.
    pub fn new(cgroup2_root: &Path, kubepods: Option<&Path>) -> CgroupLayout {
        let mut l = CgroupLayout {
            cgroup2_root: cgroup2_root.to_path_buf(),
            kubepods: kubepods.map(|k| cgroup2_root.join(k.strip_prefix("/").unwrap_or(k))),
            fixed: kubepods.is_some(),
        };
        if let Some(k) = kubepods
            && k.is_absolute()
            && k.starts_with(cgroup2_root)
        {
            l.kubepods = Some(k.to_path_buf());
        }
        l.detect();
        l
    }

    fn detect(&mut self) {
        if self.fixed || self.kubepods.is_some() {
            return;
        }
        let found: Vec<PathBuf> = KUBEPODS_ROOTS
            .iter()
            .map(|r| self.cgroup2_root.join(r))
            .filter(|p| p.is_dir())
            .collect();
        if found.len() > 1 {
            // Leftovers of another driver (cilium/tetragon#1959): the first is taken.
            warn!(roots = ?found, "more than one kubepods cgroup root; using the first");
        }
        self.kubepods = found.into_iter().next();
    }

    fn root_name(&self) -> Option<&str> {
        self.kubepods.as_ref()?.file_name()?.to_str()
    }

    /// Where the subtrees of pods' cgroups are walked: the kubepods root, and where a
    /// containerd that does not use systemd puts them under a systemd kubelet.
    fn walk_roots(&self) -> Vec<PathBuf> {
        let mut roots: Vec<PathBuf> = self.kubepods.iter().cloned().collect();
        if !self.fixed {
            roots.push(self.cgroup2_root.join("system.slice/containerd.service"));
        }
        roots
    }
}

#[derive(Debug, Default)]
struct CgroupCache {
    by_id: HashMap<u64, CgroupRef>,
    /// Ids a walk after their first sighting did not find: not pods' cgroups. A flood of events
    /// from a host process walks the subtree once, not once per event.
    misses: HashSet<u64>,
}

/// The pods of this node and the cgroups of their containers.
#[derive(Debug)]
pub struct PodIndex {
    pods: BTreeMap<String, PodInfo>,
    /// Static pods: config hash → UID.
    hashes: HashMap<String, String>,
    layout: CgroupLayout,
    cache: Mutex<CgroupCache>,
    /// The watch has listed the pods at least once.
    synced: bool,
}

impl PodIndex {
    pub fn new(layout: CgroupLayout) -> PodIndex {
        PodIndex {
            pods: BTreeMap::new(),
            hashes: HashMap::new(),
            layout,
            cache: Mutex::default(),
            synced: false,
        }
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values()
    }

    /// The pod of UID `uid`, or the static pod whose config hash it is.
    pub fn by_uid(&self, uid: &str) -> Option<&PodInfo> {
        self.pods
            .get(uid)
            .or_else(|| self.pods.get(self.hashes.get(uid)?))
    }

    /// The pod (and container name, if the id is a container's) a cgroup belongs to, from the
    /// cgroup's path (parsed, cached by cgroup id).
    pub fn by_cgroup(&self, cgroup_id: u64) -> Option<(&PodInfo, Option<&str>)> {
        let r = self.cgroup_ref(cgroup_id)?;
        let pod = self.by_uid(&r.pod_uid)?;
        let container = r.container_id.as_deref().and_then(|cid| {
            pod.containers
                .iter()
                .find(|(_, id)| id == cid)
                .map(|(name, _)| name.as_str())
        });
        Some((pod, container))
    }

    /// What the path of cgroup `cgroup_id` says (pod UID, container id), whether or not the
    /// watch knows the pod yet: a walk of the kubepods subtree the first time an id is not known.
    pub fn cgroup_ref(&self, cgroup_id: u64) -> Option<CgroupRef> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = cache.by_id.get(&cgroup_id) {
            return Some(r.clone());
        }
        if cgroup_id == 0 || cache.misses.contains(&cgroup_id) {
            return None;
        }
        cache.by_id = self.walk();
        let found = cache.by_id.get(&cgroup_id).cloned();
        if found.is_none() {
            if cache.misses.len() >= MISSES_MAX {
                cache.misses.clear();
            }
            cache.misses.insert(cgroup_id);
        }
        found
    }

    /// Every pod cgroup (and below) under the walk roots, by id.
    fn walk(&self) -> HashMap<u64, CgroupRef> {
        let mut out = HashMap::new();
        let root = &self.layout.cgroup2_root;
        let mut todo = self.layout.walk_roots();
        let mut seen = 0;
        while let Some(dir) = todo.pop() {
            seen += 1;
            if seen > WALK_LIMIT {
                warn!(
                    limit = WALK_LIMIT,
                    "kubepods cgroup walk stopped at its limit"
                );
                break;
            }
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for e in rd.flatten() {
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let p = e.path();
                if let (Ok(m), Ok(rel)) = (fs::metadata(&p), p.strip_prefix(root))
                    && let Some(r) = rel.to_str().and_then(cgroup_path::parse)
                {
                    out.insert(m.ino(), r);
                }
                todo.push(p);
            }
        }
        out
    }

    /// The pod-level cgroup directory of a pod on this node (absolute), if it exists now.
    pub fn pod_cgroup(&self, uid: &str) -> Option<PathBuf> {
        let pod = self.by_uid(uid)?;
        let kubepods = self.layout.kubepods.as_ref()?;
        let name = self.layout.root_name()?;
        let driver = cgroup_path::driver_of_root(name);
        // Static pods' cgroups carry the config hash.
        let uid = pod.config_hash.as_deref().unwrap_or(&pod.uid);
        let qos = if pod.qos.is_empty() {
            // Not set yet: whichever of the three exists.
            ["guaranteed", "burstable", "besteffort"]
                .into_iter()
                .map(|q| kubepods.join(cgroup_path::pod_cgroup_dir(uid, q, driver, name)))
                .find(|p| p.is_dir())?
        } else {
            kubepods.join(cgroup_path::pod_cgroup_dir(uid, &pod.qos, driver, name))
        };
        qos.is_dir().then_some(qos)
    }

    /// The kubelet's cgroup driver, from the kubepods root's name.
    pub fn driver(&self) -> Option<Driver> {
        self.layout.root_name().map(cgroup_path::driver_of_root)
    }

    /// The watch has listed this node's pods at least once.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// A pod added or changed.
    pub fn upsert(&mut self, pod: PodInfo) {
        if let Some(old) = self.pods.get(&pod.uid)
            && let Some(h) = &old.config_hash
        {
            self.hashes.remove(h);
        }
        if let Some(h) = &pod.config_hash {
            self.hashes.insert(h.clone(), pod.uid.clone());
        }
        self.pods.insert(pod.uid.clone(), pod);
    }

    /// A pod deleted.
    pub fn remove(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid)
            && let Some(h) = &old.config_hash
        {
            self.hashes.remove(h);
        }
    }

    /// The complete list after a (re)list: pods missing from it were deleted meanwhile.
    pub fn replace_all(&mut self, pods: Vec<PodInfo>) {
        self.pods.clear();
        self.hashes.clear();
        for p in pods {
            self.upsert(p);
        }
        self.synced = true;
        self.layout.detect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CID: &str = "9d1bd3c8a0e5f6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";

    fn pod_json(uid: &str, qos: &str) -> Pod {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "api-7d4b9", "namespace": "payments", "uid": uid,
                         "labels": {"app": "api"}, "resourceVersion": "10"},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "x"}]},
            "status": {"qosClass": qos, "containerStatuses": [{
                "name": "app", "containerID": format!("containerd://{CID}"), "image": "x",
                "imageID": "", "ready": true, "restartCount": 0}]}
        }))
        .unwrap()
    }

    #[test]
    fn pods_from_the_api_servers_json() {
        let p = PodInfo::from_pod(&pod_json("u-1", "BestEffort")).unwrap();
        assert_eq!(p.namespace, "payments");
        assert_eq!(p.name, "api-7d4b9");
        assert_eq!(p.node, "n1");
        assert_eq!(p.qos, "besteffort");
        assert_eq!(p.labels["app"], "api");
        assert_eq!(p.containers, vec![("app".to_string(), CID.to_string())]);
    }

    #[test]
    fn cgroups_become_pods_and_containers_through_a_walk() {
        let tmp = std::env::temp_dir().join(format!("egress-podindex-{}", std::process::id()));
        let uid = "5f3a9b1c-2d4e-4f60-8a7b-9c0d1e2f3a4b";
        let pod_dir = tmp.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice",
            uid.replace('-', "_")
        ));
        let ctr = pod_dir.join(format!("cri-containerd-{CID}.scope"));
        fs::create_dir_all(&ctr).unwrap();
        let ino = |p: &Path| fs::metadata(p).unwrap().ino();
        let mut idx = PodIndex::new(CgroupLayout::new(&tmp, None));
        assert_eq!(
            idx.layout.kubepods.as_deref(),
            Some(tmp.join("kubepods.slice").as_path())
        );
        // The path is known before the pod is.
        assert!(idx.by_cgroup(ino(&ctr)).is_none());
        assert_eq!(idx.cgroup_ref(ino(&ctr)).unwrap().pod_uid, uid);
        idx.replace_all(vec![
            PodInfo::from_pod(&pod_json(uid, "BestEffort")).unwrap(),
        ]);
        let (p, c) = idx.by_cgroup(ino(&ctr)).unwrap();
        assert_eq!((p.name.as_str(), c), ("api-7d4b9", Some("app")));
        let (p, c) = idx.by_cgroup(ino(&pod_dir)).unwrap();
        assert_eq!((p.namespace.as_str(), c), ("payments", None));
        assert_eq!(idx.pod_cgroup(uid), Some(pod_dir.clone()));
        assert!(idx.by_cgroup(ino(&tmp)).is_none());
        idx.remove(uid);
        assert!(idx.by_cgroup(ino(&ctr)).is_none());
        assert!(idx.pod_cgroup(uid).is_none());
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn static_pods_are_found_by_their_config_hash() {
        let hash = "3b5c1e2a9f0d4c7b8a6e5d4c3b2a1f0e";
        let mut p = PodInfo::from_pod(&pod_json("mirror-uid", "Burstable")).unwrap();
        p.config_hash = Some(hash.into());
        let mut idx = PodIndex::new(CgroupLayout::new(Path::new("/nonexistent"), None));
        idx.upsert(p);
        assert_eq!(idx.by_uid(hash).unwrap().uid, "mirror-uid");
        idx.remove("mirror-uid");
        assert!(idx.by_uid(hash).is_none());
    }
}
