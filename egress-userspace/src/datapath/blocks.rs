//! Byte-budget blocks in the kernel: `BLOCKED` (whom the hooks refuse, until when) and
//! `BLOCK_TREE` (the processes a process block covers besides the process: those it creates
//! after the block, and theirs). When to set, lift and prune is the controller's
//! (`controller/blocks.rs`); how it looks in the maps is here.

use egress_common::{
    BLOCK_SCOPE_DESCENDANTS, BLOCK_SCOPE_PROCESS, BlockKey, BlockValue, map_names,
};

use super::{Datapath, DatapathError, maps};

impl Datapath {
    /// Blocks `key` in the kernel until `until_ns` (CLOCK_BOOTTIME), reporting `rule_id`. A
    /// process block is written in both scopes, and the process becomes the root of its tree in
    /// `BLOCK_TREE`, so that what it creates from now on is refused too. A process that is
    /// already in the tree of a block lasting at least as long stays there (that block covers
    /// what it creates for longer).
    pub fn block(
        &mut self,
        key: BlockKey,
        until_ns: u64,
        rule_id: u32,
    ) -> Result<(), DatapathError> {
        let key = key.in_scope(BLOCK_SCOPE_PROCESS);
        let value = BlockValue {
            until_ns,
            rule_id,
            _pad: 0,
        };
        let mut keys = vec![key];
        if !key.is_user() {
            keys.push(key.in_scope(BLOCK_SCOPE_DESCENDANTS));
        }
        for k in keys {
            self.maps
                .blocked
                .insert(k, value, 0)
                .map_err(maps::err(map_names::BLOCKED))?;
            self.blocked.insert(k);
        }
        if !key.is_user() {
            let root = self.maps.block_tree.get(&key.tgid, 0).ok();
            let keep = root.is_some_and(|r| r != key.tgid && self.tree_until(r) >= until_ns);
            if !keep {
                self.maps
                    .block_tree
                    .insert(key.tgid, key.tgid, 0)
                    .map_err(maps::err(map_names::BLOCK_TREE))?;
            }
        }
        self.sync_block_count()
    }

    /// Lifts a block, in both scopes, and the tree it rooted once no block of that process
    /// covers descendants any more; true if there was one.
    pub fn unblock(&mut self, key: &BlockKey) -> Result<bool, DatapathError> {
        let key = key.in_scope(BLOCK_SCOPE_PROCESS);
        let mut keys = vec![key];
        if !key.is_user() {
            keys.push(key.in_scope(BLOCK_SCOPE_DESCENDANTS));
        }
        let mut removed = false;
        for k in &keys {
            removed |= self.maps.blocked.remove(k).is_ok();
            self.blocked.remove(k);
        }
        if !key.is_user() && !self.roots_tree(key.tgid) {
            self.uproot(key.tgid)?;
        }
        self.sync_block_count()?;
        Ok(removed)
    }

    /// The blocked process of `key` has exited: the block no longer covers its pid (which the
    /// kernel may give to another process), only what it created.
    pub fn release_process(&mut self, key: &BlockKey) -> Result<(), DatapathError> {
        let own = key.in_scope(BLOCK_SCOPE_PROCESS);
        let _ = self.maps.blocked.remove(&own);
        self.blocked.remove(&own);
        if self.maps.block_tree.get(&own.tgid, 0).ok() == Some(own.tgid) {
            let _ = self.maps.block_tree.remove(&own.tgid);
        }
        self.sync_block_count()
    }

    /// Every block in the kernel, both scopes (what a restarted controller adopts).
    pub fn blocks(&self) -> Vec<(BlockKey, BlockValue)> {
        self.maps.blocked.iter().filter_map(Result::ok).collect()
    }

    /// Every `BLOCK_TREE` entry: (process, the blocked process whose block covers it).
    pub fn block_tree(&self) -> Vec<(u32, u32)> {
        self.maps.block_tree.iter().filter_map(Result::ok).collect()
    }

    /// Deletes the `BLOCK_TREE` entries of `pids` (processes that exited).
    pub fn prune_block_tree(&mut self, pids: &[u32]) {
        for p in pids {
            let _ = self.maps.block_tree.remove(p);
        }
    }

    /// True when a block of process `tgid` covers its descendants.
    fn roots_tree(&self, tgid: u32) -> bool {
        self.blocked
            .iter()
            .any(|k| k.tgid == tgid && !k.is_user() && k.scope == BLOCK_SCOPE_DESCENDANTS)
    }

    /// When the blocks of `root` covering descendants end (0: none does).
    fn tree_until(&self, root: u32) -> u64 {
        self.blocked
            .iter()
            .filter(|k| k.tgid == root && !k.is_user() && k.scope == BLOCK_SCOPE_DESCENDANTS)
            .filter_map(|k| self.maps.blocked.get(k, 0).ok())
            .map(|v| v.until_ns)
            .max()
            .unwrap_or(0)
    }

    /// Deletes the tree of `root`; a process in it that roots a tree of its own (it was blocked
    /// itself) goes back to its own.
    fn uproot(&mut self, root: u32) -> Result<(), DatapathError> {
        for (pid, r) in self.block_tree() {
            if r != root {
                continue;
            }
            if pid != root && self.roots_tree(pid) {
                self.maps
                    .block_tree
                    .insert(pid, pid, 0)
                    .map_err(maps::err(map_names::BLOCK_TREE))?;
            } else {
                let _ = self.maps.block_tree.remove(&pid);
            }
        }
        Ok(())
    }

    /// Tells the hooks how many blocks exist (0 lets them skip the lookups).
    fn sync_block_count(&mut self) -> Result<(), DatapathError> {
        let n = self.blocked.len() as u32;
        if n == self.config.budget_blocks {
            return Ok(());
        }
        self.config.budget_blocks = n;
        self.write_configs()
    }
}
