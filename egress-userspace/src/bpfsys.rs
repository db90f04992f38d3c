//! The few bpf(2) commands aya 0.14 does not expose: opening a pinned object, replacing a link's
//! program atomically (BPF_LINK_UPDATE), detaching a link (BPF_LINK_DETACH), and reading which
//! program a link runs.

use std::{
    ffi::CString,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_UPDATE: libc::c_long = 29;
const BPF_LINK_DETACH: libc::c_long = 34;

/// bpf(2) with a zeroed 128-byte attribute buffer that `fill` writes into.
fn bpf(cmd: libc::c_long, fill: impl FnOnce(&mut [u8; 128])) -> io::Result<libc::c_long> {
    let mut attr = [0u8; 128];
    fill(&mut attr);
    // SAFETY: the kernel reads at most `size` bytes of a buffer we own.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn put_u32(attr: &mut [u8; 128], off: usize, v: u32) {
    attr[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(attr: &mut [u8; 128], off: usize, v: u64) {
    attr[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// Opens a pinned object (map, program or link).
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
    let fd = bpf(BPF_OBJ_GET, |a| put_u64(a, 0, c.as_ptr() as u64))?;
    // SAFETY: BPF_OBJ_GET returned a new fd that we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replaces the program a link runs, in one step: no moment without a program.
pub fn link_update(link: BorrowedFd<'_>, new_prog: BorrowedFd<'_>) -> io::Result<()> {
    bpf(BPF_LINK_UPDATE, |a| {
        put_u32(a, 0, link.as_raw_fd() as u32);
        put_u32(a, 4, new_prog.as_raw_fd() as u32);
    })
    .map(drop)
}

/// Detaches a link now, whoever else holds it open or pinned.
pub fn link_detach(link: BorrowedFd<'_>) -> io::Result<()> {
    bpf(BPF_LINK_DETACH, |a| put_u32(a, 0, link.as_raw_fd() as u32)).map(drop)
}

/// The id of the program a link runs (0 once it is detached).
pub fn link_prog_id(link: impl AsFd) -> io::Result<u32> {
    let mut info = [0u8; 64];
    let fd = link.as_fd().as_raw_fd();
    let ptr = info.as_mut_ptr() as u64;
    bpf(BPF_OBJ_GET_INFO_BY_FD, |a| {
        put_u32(a, 0, fd as u32);
        put_u32(a, 4, 64);
        put_u64(a, 8, ptr);
    })?;
    // struct bpf_link_info { __u32 type; __u32 id; __u32 prog_id; ... }
    Ok(u32::from_ne_bytes([info[8], info[9], info[10], info[11]]))
}
