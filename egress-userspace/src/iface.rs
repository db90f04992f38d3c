//! Network interfaces: which ones the TC program goes on, and their link-layer header length.

use std::{ffi::CString, fs, io};

/// ARPHRD_ETHER and ARPHRD_LOOPBACK frames carry a 14-byte Ethernet header at TC.
const ARPHRD_ETHER: u32 = 1;
const ARPHRD_LOOPBACK: u32 = 772;
const IFF_UP: u32 = 0x1;

pub fn index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
    // SAFETY: valid NUL-terminated string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 { Err(io::Error::new(io::ErrorKind::NotFound, "no such interface")) } else { Ok(idx) }
}

fn sysfs_u32(name: &str, file: &str) -> Option<u32> {
    let text = fs::read_to_string(format!("/sys/class/net/{name}/{file}")).ok()?;
    let t = text.trim();
    match t.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).ok(),
        None => t.parse().ok(),
    }
}

/// Bytes before the IP header in a packet leaving `name`: 14 for Ethernet-like devices, 0 for
/// L3 devices (tun, wireguard, ...).
pub fn l2_header_len(name: &str) -> u32 {
    match sysfs_u32(name, "type") {
        Some(ARPHRD_ETHER) | Some(ARPHRD_LOOPBACK) | None => 14,
        Some(_) => 0,
    }
}

/// Every interface that is up, except loopback: the default for `--iface`.
pub fn default_ifaces() -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/sys/class/net")? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        let up = sysfs_u32(&name, "flags").is_some_and(|f| f & IFF_UP != 0);
        let loopback = sysfs_u32(&name, "type") == Some(ARPHRD_LOOPBACK);
        if up && !loopback {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}
