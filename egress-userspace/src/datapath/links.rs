//! Attachments that outlive the controller: pinning a link, taking over a link a previous
//! controller pinned (BPF_LINK_UPDATE), and creating a pinnable cgroup link where aya's link type
//! cannot be pinned.

use std::{fs, path::Path};

use super::{DatapathError, bpfsys};

/// Pins an attachment's link at `path`, so that it outlives this process.
pub(super) fn pin_link<L>(link: L, path: &Path) -> Result<(), DatapathError>
where
    aya::programs::links::FdLink: TryFrom<L>,
    <aya::programs::links::FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let pin_err =
        |e: &dyn std::fmt::Display| DatapathError::Pin(format!("{}: {e}", path.display()));
    let fd = aya::programs::links::FdLink::try_from(link).map_err(|e| pin_err(&e))?;
    fd.pin(path).map(drop).map_err(|e| pin_err(&e))
}

/// Gives the link pinned at `path` (if any) our program in one step (BPF_LINK_UPDATE): the hook
/// never runs without a program, and the old one is released. False when there is no pinned
/// link to take over: the caller attaches afresh.
pub(super) fn take_over(
    path: Option<&Path>,
    prog: &aya::programs::ProgramFd,
) -> Result<bool, DatapathError> {
    use std::os::fd::AsFd as _;
    let Some(path) = path.filter(|p| p.exists()) else {
        return Ok(false);
    };
    let link = bpfsys::obj_get(path)
        .map_err(|e| DatapathError::Pin(format!("opening {}: {e}", path.display())))?;
    match bpfsys::link_update(link.as_fd(), prog.as_fd()) {
        Ok(()) => Ok(true),
        // The link's target went away (interface or cgroup deleted and recreated): it is
        // detached for good. Drop its pin; the caller attaches afresh.
        Err(e) if e.raw_os_error() == Some(libc::ENOLINK) => {
            tracing::warn!(link = %path.display(), "pinned link was detached by the kernel; attaching afresh");
            let _ = std::fs::remove_file(path);
            Ok(false)
        }
        Err(e) => Err(DatapathError::Pin(format!(
            "updating {}: {e}",
            path.display()
        ))),
    }
}

/// Attaches `prog` to `cgroup` with a new link and pins the link at `path` (for programs whose
/// aya link cannot be turned into a pinnable `FdLink`).
pub(super) fn pin_cgroup_link(
    prog: &aya::programs::ProgramFd,
    cgroup: &fs::File,
    attach_type: aya_obj::generated::bpf_attach_type,
    path: &Path,
) -> Result<(), DatapathError> {
    use std::os::fd::AsFd as _;
    let link = bpfsys::cgroup_link_create(prog.as_fd(), cgroup.as_fd(), attach_type)
        .map_err(|e| DatapathError::Pin(format!("attaching for {}: {e}", path.display())))?;
    bpfsys::obj_pin(link.as_fd(), path)
        .map_err(|e| DatapathError::Pin(format!("{}: {e}", path.display())))
}
