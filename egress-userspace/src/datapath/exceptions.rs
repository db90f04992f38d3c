//! Break-glass exceptions in the kernel: `EXCEPTIONS` holds exactly the entries the controller
//! compiled (`crate::exceptions::compile`), and `Config::exceptions`/`exc_cg_levels` say
//! whether the hooks look and at which cgroup levels. When to grant, revoke and expire is the
//! controller's (`controller/exceptions.rs`).

use egress_common::map_names;

use super::{Datapath, DatapathError, maps};
use crate::exceptions::Entries;

impl Datapath {
    /// Makes `EXCEPTIONS` hold exactly `entries`: new and changed entries first (each write
    /// atomic for a reader), then the ones gone, then the count and levels the hooks read (so
    /// that no entry is ever in the map while the hooks are told there is none to look for,
    /// nor the reverse for longer than the writes between).
    pub fn set_exceptions(
        &mut self,
        entries: &Entries,
        cg_levels: u32,
    ) -> Result<(), DatapathError> {
        let name = map_names::EXCEPTIONS;
        let map = &mut self.maps.exceptions;
        for (k, value) in entries {
            if map.get(k, 0).ok().as_ref() != Some(value) {
                map.insert(k, value, 0).map_err(maps::err(name))?;
            }
        }
        let gone: Vec<u64> = map
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !entries.contains_key(k))
            .collect();
        for k in &gone {
            let _ = map.remove(k);
        }
        let n = entries.len() as u32;
        // The levels of exceptions still in the map are kept until they are gone.
        let levels = if n == 0 { 0 } else { cg_levels };
        if n == self.config.exceptions && levels == self.config.exc_cg_levels {
            return Ok(());
        }
        self.config.exceptions = n;
        self.config.exc_cg_levels = levels;
        self.write_configs()
    }

    /// The ids of the exceptions `EXCEPTIONS` holds that have not ended at `now_ns`.
    pub fn exception_ids(&self, now_ns: u64) -> std::collections::BTreeSet<u32> {
        self.maps
            .exceptions
            .iter()
            .filter_map(Result::ok)
            .flat_map(|(_, v)| v.entries)
            .filter(|e| e.until_ns > now_ns)
            .map(|e| e.id)
            .collect()
    }

    /// How many entries `EXCEPTIONS` holds.
    pub fn exception_entries(&self) -> usize {
        self.maps.exceptions.keys().filter_map(Result::ok).count()
    }
}

impl super::pins::Pins {
    /// The live break-glass exceptions without a controller: those recorded beside the state
    /// that the pinned `EXCEPTIONS` map still holds unexpired (the kernel's word on what is in
    /// force; the record adds reason, scope and who).
    pub fn exceptions(&self) -> Vec<crate::exceptions::Exception> {
        use aya::maps::{HashMap, Map, MapData};
        use egress_common::ExceptionList;
        let recorded =
            crate::exceptions::read(&crate::exceptions::file_for(&self.state_path())).exceptions;
        if recorded.is_empty() {
            return recorded;
        }
        let Ok(map) = maps::open_pinned::<HashMap<MapData, u64, ExceptionList>>(
            &self.map(map_names::EXCEPTIONS),
            map_names::EXCEPTIONS,
            Map::HashMap,
        ) else {
            return Vec::new();
        };
        let now = crate::sys::clock::boot_ns();
        let live: std::collections::BTreeSet<u32> = map
            .iter()
            .filter_map(Result::ok)
            .flat_map(|(_, v)| v.entries)
            .filter(|s| s.until_ns > now)
            .map(|s| s.id)
            .collect();
        recorded
            .into_iter()
            .filter(|e| live.contains(&e.id))
            .collect()
    }
}
