//! Which pod and container a cgroup belongs to, from its path alone (pure).
//!
//! kubelet names cgroups after the pod UID and the container runtime after the container id,
//! but the shape of the path depends on the cgroup driver, the QoS class, the runtime, the
//! kubelet's `cgroupRoot` (kind uses `/kubelet`) and even on misconfiguration (containerd with
//! `SystemdCgroup = false` under a systemd kubelet puts containers under `containerd.service`).
//! No single template covers them, so each path component is matched on its own against a few
//! patterns, and the path is read left to right: the first component naming a pod gives the UID
//! (and the QoS class, when the name carries it), the first one after it naming a container gives
//! the container id, and anything deeper (crun's sub-cgroup) is ignored.
//!
//! | driver | pod cgroup | container cgroup |
//! |---|---|---|
//! | systemd | `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice` | `<rt>-<64hex>.scope`, rt ∈ `cri-containerd`, `crio`, `docker` |
//! | cgroupfs | `kubepods/<qos>/pod<uid>` | `<64hex>` (containerd, Docker), `crio-<64hex>` |
//!
//! Guaranteed pods have no QoS level (`kubepods.slice/kubepods-pod<uid_>.slice`,
//! `kubepods/pod<uid>`). CRI-O's `crio-conmon-<id>.scope` sibling is the pod's monitor process,
//! not a container: it belongs to the pod with no container. Static pods carry kubelet's config
//! hash (32 hex digits) where other pods have their UID; `PodIndex` maps it to the mirror pod.

use std::path::PathBuf;

/// What a cgroup path says about the pod it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupRef {
    /// The pod UID with dashes (`0a1b2c3d-...`), or a static pod's config hash.
    pub pod_uid: String,
    /// The QoS class when the path names it: `"burstable"`, `"besteffort"`, or `"guaranteed"`
    /// when the pod cgroup sits directly under the kubepods root.
    pub qos: Option<String>,
    /// The container id (64 hex digits) when the cgroup is a container's (or below one).
    pub container_id: Option<String>,
    pub driver: Driver,
}

/// kubelet's cgroup driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// Slices and scopes named `<parent>-<child>.slice`.
    Systemd,
    /// Plain directories: `kubepods/<qos>/pod<uid>/<id>`.
    Cgroupfs,
}

/// Parses `path`, relative to the cgroup2 root (a leading `/` is allowed): the pod and container
/// it belongs to, or None when no component names a pod.
pub fn parse(path: &str) -> Option<CgroupRef> {
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let mut out: Option<CgroupRef> = None;
    let mut prev: Option<&str> = None;
    for comp in comps {
        if let Some(r) = out.as_mut() {
            // crun's sub-cgroup (and anything a container makes below itself) keeps the
            // container found first.
            if r.container_id.is_none() {
                r.container_id = container_component(comp);
            }
            if r.container_id.is_some() {
                break;
            }
        } else if let Some(mut r) = pod_component(comp) {
            if r.qos.is_none() {
                r.qos = qos_of_parent(prev, r.driver);
            }
            out = Some(r);
        }
        prev = Some(comp);
    }
    out
}

/// The QoS class a pod component does not carry, from its parent: `burstable` /
/// `kubepods-burstable.slice`, or guaranteed when the parent is the kubepods root itself.
fn qos_of_parent(parent: Option<&str>, driver: Driver) -> Option<String> {
    let parent = parent?;
    let name = match driver {
        Driver::Systemd => parent.strip_suffix(".slice")?,
        Driver::Cgroupfs => parent,
    };
    for qos in ["burstable", "besteffort"] {
        if name == qos || name.ends_with(&format!("-{qos}")) {
            return Some(qos.into());
        }
    }
    (name == "kubepods" || name.ends_with("-kubepods")).then(|| "guaranteed".into())
}

/// A component naming a pod: `pod<uid>` (cgroupfs), `<prefix>-pod<uid_>.slice` (systemd,
/// `<prefix>` being `kubepods`, `kubepods-<qos>`, `kubelet-kubepods-<qos>`, ...), or a
/// misconfigured containerd's `<prefix>-pod<uid_>.slice:<rt>:<id>` (pod and container in one
/// name).
fn pod_component(comp: &str) -> Option<CgroupRef> {
    if let Some(uid) = comp.strip_prefix("pod").and_then(uid_dashed) {
        return Some(CgroupRef {
            pod_uid: uid,
            qos: None,
            container_id: None,
            driver: Driver::Cgroupfs,
        });
    }
    let mut parts = comp.splitn(3, ':');
    let slice = parts.next()?;
    let (rt, id) = (parts.next(), parts.next());
    let stem = slice.strip_suffix(".slice")?;
    let (prefix, uid) = stem.rsplit_once("-pod")?;
    if !prefix.split('-').any(|w| w == "kubepods") {
        return None;
    }
    let uid = uid_underscored(uid)?;
    let qos = ["burstable", "besteffort"]
        .into_iter()
        .find(|q| prefix.ends_with(&format!("-{q}")))
        .map(str::to_string);
    let container_id = match (rt, id) {
        (Some(rt), Some(id)) if runtime_name(rt) && hex64(id) => Some(id.to_string()),
        (None, None) => None,
        _ => return None,
    };
    Some(CgroupRef {
        pod_uid: uid,
        qos,
        container_id,
        driver: Driver::Systemd,
    })
}

/// A component naming a container: `<rt>-<64hex>.scope` (systemd; not CRI-O's
/// `crio-conmon-<id>`), `<64hex>` (cgroupfs with containerd or Docker), `crio-<64hex>` (cgroupfs
/// with CRI-O).
fn container_component(comp: &str) -> Option<String> {
    let stem = comp.strip_suffix(".scope").unwrap_or(comp);
    if hex64(stem) {
        return Some(stem.to_string());
    }
    let (rt, id) = stem.rsplit_once('-')?;
    (runtime_name(rt) && rt != "crio-conmon" && hex64(id)).then(|| id.to_string())
}

/// A runtime's scope prefix: `cri-containerd`, `crio`, `docker`, or another lowercase name
/// (`cri-o`, `containerd`): the id's shape is what identifies a container.
fn runtime_name(rt: &str) -> bool {
    !rt.is_empty()
        && rt
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn hex64(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A pod UID as cgroupfs writes it (`8-4-4-4-12` lowercase hex), or a static pod's config hash
/// (32 hex digits); returned with dashes.
fn uid_dashed(s: &str) -> Option<String> {
    uid_with(s, '-')
}

/// A pod UID as the systemd driver writes it (dashes escaped to underscores); returned with
/// dashes.
fn uid_underscored(s: &str) -> Option<String> {
    uid_with(s, '_').map(|u| u.replace('_', "-"))
}

fn uid_with(s: &str, sep: char) -> Option<String> {
    let hex = |p: &str| p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    let parts: Vec<&str> = s.split(sep).collect();
    let lens: Vec<usize> = parts.iter().map(|p| p.len()).collect();
    let ok = (lens == [8, 4, 4, 4, 12] || lens == [32]) && parts.iter().all(|p| hex(p));
    ok.then(|| s.to_string())
}

/// Where kubelet puts the cgroup of pod `uid` of QoS class `qos` (`guaranteed`, `burstable`,
/// `besteffort`), relative to the kubepods root (`kubepods.slice`, `kubepods`, kind's
/// `kubelet.slice/kubelet-kubepods.slice`). `root_name` is the root's last component: the systemd
/// driver prefixes every slice below it with the root's own name.
pub fn pod_cgroup_dir(uid: &str, qos: &str, driver: Driver, root_name: &str) -> PathBuf {
    let guaranteed = !matches!(qos, "burstable" | "besteffort");
    match driver {
        Driver::Cgroupfs => {
            let pod = format!("pod{uid}");
            if guaranteed {
                PathBuf::from(pod)
            } else {
                PathBuf::from(qos).join(pod)
            }
        }
        Driver::Systemd => {
            let prefix = root_name.strip_suffix(".slice").unwrap_or(root_name);
            let uid = uid.replace('-', "_");
            if guaranteed {
                PathBuf::from(format!("{prefix}-pod{uid}.slice"))
            } else {
                PathBuf::from(format!("{prefix}-{qos}.slice"))
                    .join(format!("{prefix}-{qos}-pod{uid}.slice"))
            }
        }
    }
}

/// The driver of a kubepods root, from its name.
pub fn driver_of_root(root_name: &str) -> Driver {
    if root_name.ends_with(".slice") {
        Driver::Systemd
    } else {
        Driver::Cgroupfs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f3a9b1c-2d4e-4f60-8a7b-9c0d1e2f3a4b";
    const UID_: &str = "5f3a9b1c_2d4e_4f60_8a7b_9c0d1e2f3a4b";
    const CID: &str = "9d1bd3c8a0e5f6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1";
    const HASH: &str = "3b5c1e2a9f0d4c7b8a6e5d4c3b2a1f0e";

    fn pod(qos: &str, driver: Driver, container: bool) -> CgroupRef {
        CgroupRef {
            pod_uid: UID.into(),
            qos: Some(qos.into()),
            container_id: container.then(|| CID.into()),
            driver,
        }
    }

    /// Every driver × QoS class × runtime, container and pod level, as kubelet and the runtimes
    /// lay them out (the paths of `/proc/PID/cgroup` on such nodes).
    #[test]
    fn both_drivers_every_qos_class_and_runtime() {
        for rt in ["cri-containerd", "crio", "docker"] {
            for (qos, dir) in [
                (
                    "guaranteed",
                    format!("kubepods.slice/kubepods-pod{UID_}.slice"),
                ),
                (
                    "burstable",
                    format!(
                        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice"
                    ),
                ),
                (
                    "besteffort",
                    format!(
                        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
                    ),
                ),
            ] {
                let c = format!("/{dir}/{rt}-{CID}.scope");
                assert_eq!(parse(&c), Some(pod(qos, Driver::Systemd, true)), "{c}");
                assert_eq!(parse(&dir), Some(pod(qos, Driver::Systemd, false)), "{dir}");
            }
        }
        for (qos, dir) in [
            ("guaranteed", format!("kubepods/pod{UID}")),
            ("burstable", format!("kubepods/burstable/pod{UID}")),
            ("besteffort", format!("kubepods/besteffort/pod{UID}")),
        ] {
            let c = format!("/{dir}/{CID}");
            assert_eq!(parse(&c), Some(pod(qos, Driver::Cgroupfs, true)), "{c}");
            assert_eq!(parse(&dir), Some(pod(qos, Driver::Cgroupfs, false)));
        }
    }

    #[test]
    fn kind_crun_conmon_and_misconfigured_containerd() {
        // kind: kubelet's cgroupRoot is /kubelet.
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(parse(&kind), Some(pod("besteffort", Driver::Systemd, true)));
        let kind_g = format!(
            "kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse(&kind_g),
            Some(pod("guaranteed", Driver::Systemd, true))
        );
        // crun's sub-cgroup below the container's scope.
        let crun = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope/container"
        );
        assert_eq!(parse(&crun), Some(pod("burstable", Driver::Systemd, true)));
        // CRI-O's conmon: the pod's, no container.
        let conmon = format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope"
        );
        assert_eq!(
            parse(&conmon),
            Some(pod("burstable", Driver::Systemd, false))
        );
        // containerd with SystemdCgroup = false under a systemd kubelet.
        let mis = format!(
            "system.slice/containerd.service/kubepods-besteffort-pod{UID_}.slice:cri-containerd:{CID}"
        );
        assert_eq!(parse(&mis), Some(pod("besteffort", Driver::Systemd, true)));
        let mis_g = format!(
            "system.slice/containerd.service/kubepods-pod{UID_}.slice:cri-containerd:{CID}"
        );
        let r = parse(&mis_g).unwrap();
        assert_eq!(
            (r.pod_uid.as_str(), r.container_id.as_deref()),
            (UID, Some(CID))
        );
        // Under a test cgroup: the pattern is found wherever the kubepods root is.
        let nested = format!(
            "egress-test-1/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse(&nested),
            Some(pod("besteffort", Driver::Systemd, true))
        );
    }

    #[test]
    fn static_pods_carry_the_config_hash() {
        let r = parse(&format!(
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{HASH}.slice/cri-containerd-{CID}.scope"
        ))
        .unwrap();
        assert_eq!(r.pod_uid, HASH);
        let r = parse(&format!("kubepods/burstable/pod{HASH}/{CID}")).unwrap();
        assert_eq!(r.pod_uid, HASH);
    }

    #[test]
    fn crio_under_the_cgroupfs_driver() {
        let r = parse(&format!("kubepods/burstable/pod{UID}/crio-{CID}")).unwrap();
        assert_eq!(r, pod("burstable", Driver::Cgroupfs, true));
    }

    #[test]
    fn what_is_not_a_pod() {
        for p in [
            "",
            "/",
            "user.slice/user-1000.slice/session-2.scope",
            "system.slice/containerd.service",
            "kubepods.slice",
            "kubepods.slice/kubepods-besteffort.slice",
            "kubepods/burstable",
            // Not a UID.
            "kubepods/burstable/podnotauid",
            "kubepods.slice/kubepods-pod1234.slice",
            // A pod-looking slice outside any kubepods prefix.
            &format!("system.slice/other-pod{UID_}.slice"),
            // Dashes where systemd escapes them.
            &format!("kubepods.slice/kubepods-pod{UID}.slice"),
            // Upper case is not how either driver writes ids.
            &format!("kubepods/pod{}", UID.to_uppercase()),
        ] {
            assert_eq!(parse(p), None, "{p}");
        }
        // A pod cgroup's non-container children: the pod's, no container.
        for p in [
            format!("kubepods/besteffort/pod{UID}/notacontainer"),
            format!("kubepods/besteffort/pod{UID}/crio-conmon-{CID}"),
            format!(
                "kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{}.scope",
                &CID[1..]
            ),
        ] {
            let r = parse(&p).unwrap();
            assert_eq!(r.container_id, None, "{p}");
        }
    }

    #[test]
    fn pod_cgroup_dirs_round_trip_through_the_parser() {
        for (root, driver) in [
            ("kubepods.slice", Driver::Systemd),
            ("kubepods", Driver::Cgroupfs),
            ("kubelet-kubepods.slice", Driver::Systemd),
        ] {
            assert_eq!(driver_of_root(root), driver);
            for qos in ["guaranteed", "burstable", "besteffort"] {
                let dir = PathBuf::from(root).join(pod_cgroup_dir(UID, qos, driver, root));
                let r = parse(dir.to_str().unwrap()).unwrap_or_else(|| panic!("{dir:?}"));
                assert_eq!((r.pod_uid.as_str(), r.qos.as_deref()), (UID, Some(qos)));
            }
        }
        assert_eq!(
            pod_cgroup_dir(UID, "besteffort", Driver::Systemd, "kubepods.slice"),
            PathBuf::from(format!(
                "kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice"
            ))
        );
        assert_eq!(
            pod_cgroup_dir(UID, "guaranteed", Driver::Cgroupfs, "kubepods"),
            PathBuf::from(format!("pod{UID}"))
        );
    }
}
