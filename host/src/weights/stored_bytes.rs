//! A stored tensor's bytes, owned or a view of a memory-mapped shard: what the host tier, the
//! CPU's stored-format kernels and the scales read.

use std::sync::Arc;

use memmap2::Mmap;

/// A stored tensor's bytes: a copy (the host tier's), or a view of the memory-mapped
/// checkpoint (experts the CPU computes where they lie: no second copy in RAM).
#[derive(Clone)]
pub enum StoredBytes {
    Owned(Vec<u8>),
    Mapped {
        map: Arc<Mmap>,
        range: std::ops::Range<usize>,
    },
}

impl std::ops::Deref for StoredBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            StoredBytes::Owned(v) => v,
            StoredBytes::Mapped { map, range } => &map[range.clone()],
        }
    }
}

impl From<Vec<u8>> for StoredBytes {
    fn from(v: Vec<u8>) -> Self {
        StoredBytes::Owned(v)
    }
}

impl StoredBytes {
    /// Whether these are a view of the checkpoint's mapping.
    pub fn is_mapped(&self) -> bool {
        matches!(self, StoredBytes::Mapped { .. })
    }
}
