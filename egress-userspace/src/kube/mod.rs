//! Pod awareness: which pod and container a cgroup (and so a process, an event, a flow) belongs
//! to, on a Kubernetes node.
//!
//! - `cgroup_path.rs` (pure): the pod UID and container id a cgroup path names, for both kubelet
//!   cgroup drivers, every QoS class and the container runtimes;
//! - `pods.rs`: the [`PodIndex`] of this node's pods, and cgroup id → pod;
//! - `watch.rs`: the list+watch of this node's Pods with kube-rs that keeps the index current.
//!
//! The index is shared as [`Pods`]: an `Arc<RwLock<PodIndex>>` and a generation
//! (`tokio::sync::watch`) bumped on every change. Reports gain a [`PodMeta`] (`namespace`,
//! `pod`, `container`, `node`) where the cgroup is a pod's; nothing of this is on the
//! enforcement path.

pub mod cgroup_path;
pub mod pods;
pub mod watch;

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
};

use serde::{Deserialize, Serialize};

pub use self::pods::{CgroupLayout, PodIndex, PodInfo};

/// `egress run --kubernetes`: where the pods come from and where their cgroups are.
#[derive(Debug, Clone, Default)]
pub struct KubeOptions {
    /// This node's name (`--node-name`, or `NODE_NAME` from the downward API).
    pub node: String,
    pub api: watch::ApiSource,
    /// The kubepods root relative to the cgroup2 root (None: detected).
    pub cgroup_root: Option<PathBuf>,
}

/// The shared pod index and its change notification.
#[derive(Clone)]
pub struct Pods {
    pub index: Arc<RwLock<PodIndex>>,
    /// Bumped on every change the watch applies.
    pub changed: tokio::sync::watch::Receiver<u64>,
    pub node: String,
}

impl Pods {
    /// Starts the watch of `opts.node`'s pods (in the background; it never fails the caller).
    pub fn spawn(opts: &KubeOptions, cgroup2_root: &Path) -> Pods {
        let layout = CgroupLayout::new(cgroup2_root, opts.cgroup_root.as_deref());
        tracing::info!(
            node = %opts.node,
            kubepods = ?layout.kubepods,
            "pod awareness: watching this node's pods"
        );
        let index = Arc::new(RwLock::new(PodIndex::new(layout)));
        let (tx, rx) = tokio::sync::watch::channel(0);
        tokio::spawn(watch::run(
            opts.api.clone(),
            opts.node.clone(),
            index.clone(),
            tx,
        ));
        Pods {
            index,
            changed: rx,
            node: opts.node.clone(),
        }
    }

    /// A read guard on the index (poisoning ignored: the index is plain data).
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, PodIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The metadata of cgroup `cgroup_id`, when it is a pod's.
    pub fn meta(&self, cgroup_id: u64) -> Option<PodMeta> {
        PodMeta::of(&self.read(), cgroup_id)
    }
}

/// The pod fields of events, stats rows and alerts: present only when the process's cgroup is a
/// known pod's (flattened into the enclosing JSON object).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodMeta {
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub pod: Option<String>,
    /// The container's name (absent for a pod's own cgroup, its sandbox or CRI-O's conmon).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub container: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub node: Option<String>,
}

impl PodMeta {
    pub fn of(index: &PodIndex, cgroup_id: u64) -> Option<PodMeta> {
        let (pod, container) = index.by_cgroup(cgroup_id)?;
        Some(PodMeta {
            namespace: Some(pod.namespace.clone()),
            pod: Some(pod.name.clone()),
            container: container.map(str::to_string),
            node: (!pod.node.is_empty()).then(|| pod.node.clone()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.pod.is_none()
    }
}

/// Bytes and packets sent by one pod's processes (`egress stats` `pods`, and the
/// `egress_pod_*` metrics labelled by namespace and pod only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodTotals {
    pub namespace: String,
    pub pod: String,
    pub bytes: u64,
    pub packets: u64,
    pub payload_bytes: u64,
}

/// Per-pod totals, monotonic while the pod exists: the deltas of flows whose cgroup is a pod's
/// are added, and a deleted pod's entry (and so its metric series) is dropped.
#[derive(Debug, Default)]
pub struct PodAccounting {
    by_uid: HashMap<String, PodTotals>,
}

impl PodAccounting {
    /// Adds one tick's flow deltas.
    pub fn add(
        &mut self,
        index: &PodIndex,
        deltas: &[(egress_common::FlowKey, egress_common::FlowValue)],
    ) {
        for (k, v) in deltas {
            if k.cgroup_id == 0 {
                continue;
            }
            let Some((pod, _)) = index.by_cgroup(k.cgroup_id) else {
                continue;
            };
            let t = self
                .by_uid
                .entry(pod.uid.clone())
                .or_insert_with(|| PodTotals {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    ..PodTotals::default()
                });
            t.bytes += v.bytes;
            t.packets += v.packets;
            t.payload_bytes += v.payload;
        }
    }

    /// The totals of pods that still exist, by namespace and name; forgets the others.
    pub fn snapshot(&mut self, index: &PodIndex) -> Vec<PodTotals> {
        self.by_uid.retain(|uid, _| index.by_uid(uid).is_some());
        let sorted: BTreeMap<(&str, &str), &PodTotals> = self
            .by_uid
            .values()
            .map(|t| ((t.namespace.as_str(), t.pod.as_str()), t))
            .collect();
        sorted.into_values().cloned().collect()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    pod: String,
}

/// `egress_pod_bytes` and `egress_pod_packets`, labelled by namespace and pod only (bounded by
/// the pods of this node; a deleted pod's series ends), present only with `--kubernetes`.
pub fn register_metrics(reg: &mut prometheus_client::registry::Registry, pods: &[PodTotals]) {
    use prometheus_client::metrics::{counter::Counter, family::Family};
    if pods.is_empty() {
        return;
    }
    let bytes = Family::<PodLabels, Counter>::default();
    let packets = Family::<PodLabels, Counter>::default();
    for p in pods {
        let labels = PodLabels {
            namespace: p.namespace.clone(),
            pod: p.pod.clone(),
        };
        bytes.get_or_create(&labels).inc_by(p.bytes);
        packets.get_or_create(&labels).inc_by(p.packets);
    }
    reg.register(
        "pod_bytes",
        "Bytes sent by the processes of a pod of this node (wire bytes)",
        bytes,
    );
    reg.register(
        "pod_packets",
        "Packets sent by the processes of a pod of this node",
        packets,
    );
}
