//! An ARRAY map created with `BPF_F_MMAPABLE`, mapped into the controller: the range tables
//! (`DIR_V4_n`, `RANGES_V4_n`) are written with one memcpy instead of one bpf(2) call per line.

use std::os::fd::{AsFd as _, AsRawFd as _};

use aya::maps::{Map, MapData};

use super::DatapathError;

/// A mapped ARRAY.
pub(super) struct MappedArray {
    name: &'static str,
    /// Keeps the map (and so the mapping's object) alive.
    map: MapData,
    ptr: *mut u8,
    /// Bytes mapped: the array's values, whole pages.
    len: usize,
    /// The array's `max_entries`.
    entries: u32,
    /// Bytes per element (the value size: 8 or 64 here, so no rounding between values).
    value_size: usize,
}

// SAFETY: the mapping is owned by this value alone and only written through `&mut self`.
unsafe impl Send for MappedArray {}
// SAFETY: as above; `&self` reads nothing through the pointer.
unsafe impl Sync for MappedArray {}

impl MappedArray {
    pub fn new(map: Map, name: &'static str) -> Result<MappedArray, DatapathError> {
        let Map::Array(map) = map else {
            return Err(DatapathError::Pin(format!("{name} is not an ARRAY map")));
        };
        let info = map.info().map_err(super::maps::err(name))?;
        // The kernel lays elements out every round_up(value_size, 8) bytes: only sizes that are
        // multiples of 8 make the mapping a plain array of values.
        let value_size = info.value_size() as usize;
        if value_size == 0 || !value_size.is_multiple_of(8) {
            return Err(DatapathError::Pin(format!(
                "{name} has {value_size}-byte values, not a multiple of 8"
            )));
        }
        let entries = info.max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let len = (entries as usize * value_size).div_ceil(page) * page;
        let fd = map.fd().as_fd().as_raw_fd();
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks length and flags
        // (EINVAL unless the map was created BPF_F_MMAPABLE).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::Pin(format!(
                "mapping {name} ({len} bytes): {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(MappedArray {
            name,
            map,
            ptr: ptr.cast(),
            len,
            entries,
            value_size,
        })
    }

    /// The array's capacity in elements.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    pub fn map(&self) -> &MapData {
        &self.map
    }

    /// Writes `bytes` at the start of the array (what follows keeps its content).
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), DatapathError> {
        if bytes.len() > self.entries as usize * self.value_size {
            return Err(DatapathError::Pin(format!(
                "{}: {} bytes do not fit its {} elements",
                self.name,
                bytes.len(),
                self.entries
            )));
        }
        // SAFETY: `ptr` maps `len` >= `bytes.len()` writable bytes that nothing else in this
        // process aliases; the kernel's readers see plain memory (the buffer written is not the
        // one in force).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr, bytes.len()) };
        Ok(())
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
