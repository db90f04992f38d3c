//! Network interfaces: which ones the TC program goes on, and their link-layer header length.
//!
//! Everything is asked of the kernel through sockets (if_nameindex, SIOCGIFFLAGS,
//! SIOCGIFHWADDR), which answer for the caller's network namespace. /sys/class/net would not:
//! it shows the namespace of whoever mounted /sys, which differs under `nsenter --net`.

use std::{ffi::CStr, ffi::CString, io, os::fd::OwnedFd};

const ARPHRD_ETHER: u16 = 1;
const ARPHRD_LOOPBACK: u16 = 772;

pub fn index(name: &str) -> io::Result<u32> {
    let c = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 {
        Err(io::Error::new(
            io::ErrorKind::NotFound,
            "no such interface in this network namespace",
        ))
    } else {
        Ok(idx)
    }
}

fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the fd is owned by the returned OwnedFd.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.len() >= req.ifr_name.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn ioctl(name: &str, request: libc::c_ulong) -> io::Result<libc::ifreq> {
    let sock = ioctl_socket()?;
    let mut req = ifreq(name)?;
    // The request's type is c_ulong on glibc, c_int on musl (the image's static build).
    let request = request as libc::Ioctl;
    // SAFETY: valid socket and ifreq for these SIOCGIF* requests.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&sock), request, &mut req) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(req)
    }
}

fn link_type(name: &str) -> Option<u16> {
    // SAFETY: SIOCGIFHWADDR fills ifru_hwaddr.
    ioctl(name, libc::SIOCGIFHWADDR)
        .ok()
        .map(|r| unsafe { r.ifr_ifru.ifru_hwaddr.sa_family })
}

fn is_up(name: &str) -> bool {
    // SAFETY: SIOCGIFFLAGS fills ifru_flags.
    ioctl(name, libc::SIOCGIFFLAGS)
        .is_ok_and(|r| unsafe { r.ifr_ifru.ifru_flags } as i32 & libc::IFF_UP != 0)
}

/// Bytes before the IP header in a packet leaving `name`: 14 for Ethernet-like devices, 0 for
/// L3 devices (tun, wireguard, ...).
pub fn l2_header_len(name: &str) -> u32 {
    match link_type(name) {
        Some(ARPHRD_ETHER) | Some(ARPHRD_LOOPBACK) | None => 14,
        Some(_) => 0,
    }
}

/// The interfaces of this network namespace.
pub fn names() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex returns a NULL-terminated array we free with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut out = Vec::new();
        let mut p = list;
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.push(CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
        Ok(out)
    }
}

/// The sysfs directory of `name`, when /sys shows this network namespace (under
/// `nsenter --net` it shows another one: then the ifindex does not match and we know nothing).
fn sysfs_dir(name: &str) -> Option<std::path::PathBuf> {
    let dir = std::path::PathBuf::from(format!("/sys/class/net/{name}"));
    let idx: u32 = std::fs::read_to_string(dir.join("ifindex"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    (index(name).ok()? == idx).then_some(dir)
}

/// A device whose packets also leave through another device we attach to, so that counting it
/// too would count them twice: a bridge port or bond slave (it has a master, which we count),
/// or a VLAN/macvlan-like upper device (it has lower devices it is not the master of).
fn is_stacked(name: &str) -> bool {
    let Some(dir) = sysfs_dir(name) else {
        return false;
    };
    if dir.join("master").exists() {
        return true;
    }
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return false;
    };
    entries.filter_map(Result::ok).any(|e| {
        let n = e.file_name().to_string_lossy().into_owned();
        n.strip_prefix("lower_").is_some_and(|lower| {
            let master = std::fs::read_link(format!("/sys/class/net/{lower}/master")).ok();
            master
                .and_then(|m| m.file_name().map(|f| f.to_string_lossy().into_owned()))
                .as_deref()
                != Some(name)
        })
    })
}

/// Every interface that is up, except loopback and stacked devices (see [`is_stacked`]): the
/// default for `--iface`. Each packet leaving the host is then counted once.
pub fn default_ifaces() -> io::Result<Vec<String>> {
    let mut out: Vec<String> = names()?
        .into_iter()
        .filter(|n| is_up(n) && link_type(n) != Some(ARPHRD_LOOPBACK) && !is_stacked(n))
        .collect();
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_is_listed_but_never_a_default() {
        let names = names().unwrap();
        assert!(names.iter().any(|n| n == "lo"), "{names:?}");
        assert!(!default_ifaces().unwrap().iter().any(|n| n == "lo"));
        assert_eq!(l2_header_len("lo"), 14);
        assert!(index("lo").unwrap() > 0);
        assert!(index("no-such-iface0").is_err());
    }
}
