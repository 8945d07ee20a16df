//! What a plugin's store may allocate: every linear memory and every table together within
//! the plugin's memory budget (`--policy-memory`), and a few instances, memories and tables.
//! wasmtime's `StoreLimits` bounds each memory alone and tables not at all, so a component
//! with several memories or a growing function table could take gigabytes.
//!
//! Owns: the accounting. Does not own: the deadline (`wasm`'s epochs), what happens after a
//! trap (the guard rebuilds the instance).

use wasmtime::{bail, ResourceLimiter, Result};

/// Host bytes one table element may cost: wasmtime stores a pointer per element in a growable
/// vector, and a growth that reallocates holds the old buffer and the new (up to twice the
/// length) at once, so a table of n elements can briefly take 3n pointers.
const TABLE_ELEMENT_BYTES: usize = 3 * std::mem::size_of::<usize>();

/// Counts a store's memories and tables against one budget; any growth past it traps.
pub struct PluginLimiter {
    budget: usize,
    used: usize,
}

impl PluginLimiter {
    pub fn new(budget: usize) -> Self {
        Self { budget, used: 0 }
    }

    /// Bytes allowed so far (memories and tables).
    pub fn used(&self) -> usize {
        self.used
    }

    /// A memory (`unit` 1 byte) or table (`unit` bytes an element) growing from `current` to
    /// `desired` units: refused past its own `maximum` or the budget, else counted.
    fn grow(
        &mut self,
        what: &str,
        unit: usize,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool> {
        if maximum.is_some_and(|m| desired > m) {
            bail!("{what} growth to {desired} units is past the {what}'s own maximum");
        }
        let bytes = desired.saturating_sub(current).saturating_mul(unit);
        let total = self.used.saturating_add(bytes);
        if total > self.budget {
            bail!(
                "the plugin's memories and tables would hold {total} bytes growing a {what}, over \
                 its budget of {} bytes",
                self.budget
            );
        }
        self.used = total;
        Ok(true)
    }
}

impl ResourceLimiter for PluginLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool> {
        self.grow("memory", 1, current, desired, maximum)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> Result<()> {
        Err(error)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        maximum: Option<usize>,
    ) -> Result<bool> {
        self.grow("table", TABLE_ELEMENT_BYTES, current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> Result<()> {
        Err(error)
    }

    fn instances(&self) -> usize {
        4
    }

    fn tables(&self) -> usize {
        16
    }

    fn memories(&self) -> usize {
        4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memories_and_tables_share_one_budget() {
        let mut l = PluginLimiter::new(1 << 20);
        // Three memories of 320 KiB each fit; a fourth does not, though each alone would.
        for _ in 0..3 {
            assert!(l.memory_growing(0, 320 << 10, None).unwrap());
        }
        assert!(l.memory_growing(0, 320 << 10, None).is_err());
        // Tables count too: 8 bytes an element on 64-bit hosts.
        let left = (1 << 20) - l.used();
        assert!(l
            .table_growing(0, left / TABLE_ELEMENT_BYTES, None)
            .unwrap());
        assert!(l.table_growing(10, 11, None).is_err());
        // A growth past the object's own maximum traps whatever the budget.
        let mut l = PluginLimiter::new(usize::MAX);
        assert!(l.memory_growing(0, 2 << 16, Some(1 << 16)).is_err());
        assert!(l.table_growing(0, 11, Some(10)).is_err());
    }
}
