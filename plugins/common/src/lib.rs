//! What every `#![no_std]` moehost policy guest shares: the runtime pieces a guest needs to be
//! a component that imports nothing (global allocator, panic handler, `cabi_realloc`), a
//! single-threaded global for policy state, and small helpers (exact top-k, victim picking).
//!
//! The runtime pieces only exist on `wasm32`; everything else is plain `core` + `alloc` code
//! that also compiles (and is unit-tested) on the build machine:
//! `cargo test --manifest-path plugins/Cargo.toml`.
#![no_std]

extern crate alloc;

#[cfg(test)]
extern crate std;

use alloc::vec;
use alloc::vec::Vec;
use core::cell::UnsafeCell;
use core::cmp::Ordering;

// ---------------------------------------------------------------------------------------------
// Runtime: allocator, panic handler, cabi_realloc (wasm32 only).
// ---------------------------------------------------------------------------------------------

/// dlmalloc on top of `memory.grow`: no imports needed. When the host refuses to grow memory the
/// allocation fails, `alloc` panics and the panic handler traps.
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

/// A panic is a bug or an exhausted resource: trap, and let the host serve the call with its
/// built-in policy and re-instantiate the component. (Formatting the message would pull in code
/// and there is nowhere to print it: the guest has no imports.)
#[cfg(target_arch = "wasm32")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator export. wit-bindgen 0.63 only ships its own `cabi_realloc` for
/// wasm32-wasip1 / wasm32-unknown-unknown; on wasm32-wasip2 it expects the standard library to
/// provide one, which a `no_std` guest does not link, so it is defined here.
///
/// # Safety
/// Called by the host through the canonical ABI with a pointer/size pair it got from an
/// earlier call (or null / 0), as the component model specifies.
#[cfg(target_arch = "wasm32")]
#[no_mangle]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{alloc, realloc, Layout};
    let ptr = unsafe {
        if old_len == 0 {
            if new_len == 0 {
                return align as *mut u8;
            }
            alloc(Layout::from_size_align_unchecked(new_len, align))
        } else {
            realloc(
                old_ptr,
                Layout::from_size_align_unchecked(old_len, align),
                new_len,
            )
        }
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable();
    }
    ptr
}

// ---------------------------------------------------------------------------------------------
// State.
// ---------------------------------------------------------------------------------------------

/// A global for a policy's state.
///
/// Component exports are plain functions, so a stateful policy keeps its state in a `static`.
/// A wasm32 guest without the threads proposal is single-threaded, and a guest that imports
/// nothing can never be re-entered while one of its exports runs (re-entry would need a call
/// back into the guest from an import). So at most one `&mut T` exists at a time, which is what
/// makes the `Sync` impl below sound for this use. Do not call [`Global::with`] from inside the
/// closure passed to it.
pub struct Global<T>(UnsafeCell<T>);

// SAFETY: see the type's documentation: single-threaded, never re-entered.
unsafe impl<T> Sync for Global<T> {}

impl<T> Global<T> {
    pub const fn new(value: T) -> Self {
        Global(UnsafeCell::new(value))
    }

    /// Runs `f` with exclusive access to the state.
    pub fn with<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        // SAFETY: see the type's documentation: no other reference is alive during `f`.
        f(unsafe { &mut *self.0.get() })
    }
}

// ---------------------------------------------------------------------------------------------
// Ranking helpers.
// ---------------------------------------------------------------------------------------------

/// The key the host ranks router scores by: NaN ranks last, like `-inf`.
#[inline]
pub fn score_key(s: f32) -> f32 {
    if s.is_nan() {
        f32::NEG_INFINITY
    } else {
        s
    }
}

/// The host's routing order: higher score first (IEEE total order on [`score_key`]), then the
/// lower expert id. `Less` means `a` ranks before `b`.
#[inline]
pub fn rank_cmp(row: &[f32], a: u32, b: u32) -> Ordering {
    score_key(row[b as usize])
        .total_cmp(&score_key(row[a as usize]))
        .then(a.cmp(&b))
}

/// Appends to `out` the `k` best expert ids of one token's score row, best first, in exactly
/// the host's order (see [`rank_cmp`]). Returns fewer ids only when the row has fewer than `k`
/// experts. O(E + k x insertions): a small sorted window, no allocation beyond `out`.
pub fn top_k_into(row: &[f32], k: usize, out: &mut Vec<u32>) {
    top_k_filtered_into(row, k, |_| true, out)
}

/// [`top_k_into`] among the experts `keep` accepts (fewer than `k` when too few are kept).
pub fn top_k_filtered_into(row: &[f32], k: usize, keep: impl Fn(u32) -> bool, out: &mut Vec<u32>) {
    let start = out.len();
    let k = k.min(row.len());
    if k == 0 {
        return;
    }
    for e in 0..row.len() as u32 {
        let filled = out.len() - start;
        if filled == k {
            // Ids ascend, so a newcomer tied with the current k-th ranks after it.
            if rank_cmp(row, e, out[start + k - 1]) != Ordering::Less {
                continue;
            }
        }
        if !keep(e) {
            continue;
        }
        if filled == k {
            out.pop();
        }
        // Insert keeping the window sorted (the window is at most k long).
        let mut pos = out.len();
        while pos > start && rank_cmp(row, e, out[pos - 1]) == Ordering::Less {
            pos -= 1;
        }
        out.insert(pos, e);
    }
}

/// Dense indexing of expert keys `(layer, expert)` for per-expert state arrays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    pub layers: u32,
    pub experts: u32,
}

impl Slots {
    pub fn new(layers: u32, experts: u32) -> Self {
        Slots { layers, experts }
    }

    /// Number of expert keys.
    pub fn len(&self) -> usize {
        self.layers as usize * self.experts as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The slot of `(layer, expert)`, `None` when out of range.
    #[inline]
    pub fn index(&self, layer: u32, expert: u32) -> Option<usize> {
        (layer < self.layers && expert < self.experts)
            .then(|| layer as usize * self.experts as usize + expert as usize)
    }
}

/// Marks slots already seen in one call, to drop duplicate candidates in O(1) each without
/// clearing a whole array per call.
#[derive(Default)]
pub struct Dedup {
    seen: Vec<u32>,
    epoch: u32,
}

impl Dedup {
    pub fn new(len: usize) -> Self {
        Dedup {
            seen: vec![0; len],
            epoch: 0,
        }
    }

    /// Starts a new call: forgets every mark.
    pub fn start(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.seen.iter_mut().for_each(|m| *m = 0);
            self.epoch = 1;
        }
    }

    /// True the first time `slot` is seen since [`Dedup::start`] (false when out of range).
    #[inline]
    pub fn first(&mut self, slot: usize) -> bool {
        match self.seen.get_mut(slot) {
            Some(m) if *m != self.epoch => {
                *m = self.epoch;
                true
            }
            _ => false,
        }
    }
}

/// Picks up to `count` distinct entries of `candidates` with the smallest keys (equal keys: the
/// earlier candidate; make keys total for a deterministic answer). `slot` maps a candidate to
/// its dense index (`None` = out of range: never picked); duplicates are dropped.
/// Returns the indices into `candidates` of the picked entries, smallest key first.
/// O(n) selection + O(count log count) sorting.
pub fn pick_smallest<C, K: Ord>(
    candidates: &[C],
    count: usize,
    slot: impl Fn(&C) -> Option<usize>,
    mut key: impl FnMut(&C) -> K,
    dedup: &mut Dedup,
) -> Vec<usize> {
    dedup.start();
    let mut keyed: Vec<(K, usize)> = Vec::with_capacity(candidates.len());
    for (i, c) in candidates.iter().enumerate() {
        if slot(c).is_some_and(|s| dedup.first(s)) {
            keyed.push((key(c), i));
        }
    }
    let count = count.min(keyed.len());
    if count == 0 {
        return Vec::new();
    }
    if count < keyed.len() {
        keyed.select_nth_unstable(count - 1);
        keyed.truncate(count);
    }
    keyed.sort_unstable();
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// `base^n` by repeated squaring (`core` has no `powi` without `std`).
pub fn powi(base: f32, mut n: u64) -> f32 {
    let (mut acc, mut b) = (1.0f32, base);
    while n > 0 {
        if n & 1 == 1 {
            acc *= b;
        }
        b *= b;
        n >>= 1;
        if acc == 0.0 {
            break;
        }
    }
    acc
}

/// Maps a non-negative finite f32 to a u32 that sorts the same way (for integer sort keys).
#[inline]
pub fn ordered_bits(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    /// The host's reference implementation (host/src/router.rs `top_k_indices`).
    fn host_top_k(v: &[f32], k: usize) -> Vec<u32> {
        let mut idx: Vec<u32> = (0..v.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| {
            let (x, y) = (v[*a as usize], v[*b as usize]);
            let key = |f: f32| if f.is_nan() { f32::NEG_INFINITY } else { f };
            key(y).total_cmp(&key(x)).then(a.cmp(b))
        };
        if k < idx.len() {
            idx.select_nth_unstable_by(k, cmp);
            idx.truncate(k);
        }
        idx.sort_by(cmp);
        idx
    }

    fn top_k(row: &[f32], k: usize) -> Vec<u32> {
        let mut out = Vec::new();
        top_k_into(row, k, &mut out);
        out
    }

    #[test]
    fn top_k_matches_host_on_ties_nan_and_signed_zero() {
        let nan = f32::NAN;
        let rows: [&[f32]; 5] = [
            &[0.5, 0.5, 0.5, 0.1, 0.9],
            &[nan, 0.1, nan, f32::NEG_INFINITY, 0.1],
            &[-0.0, 0.0, -0.0, 0.0],
            &[1.0],
            &[0.3, nan, 0.3, 0.7, 0.7, 0.2],
        ];
        for row in rows {
            for k in 0..=row.len() + 1 {
                assert_eq!(top_k(row, k), host_top_k(row, k), "row {row:?} k {k}");
            }
        }
    }

    #[test]
    fn top_k_matches_host_on_pseudo_random_rows() {
        let mut x: u32 = 12345;
        for _ in 0..500 {
            let row: Vec<f32> = (0..64)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    // few distinct values: many ties
                    ((x >> 28) as f32) / 16.0
                })
                .collect();
            assert_eq!(top_k(&row, 6), host_top_k(&row, 6));
        }
    }

    #[test]
    fn top_k_appends() {
        let mut out = vec![99];
        top_k_into(&[0.1, 0.3, 0.2], 2, &mut out);
        assert_eq!(out, vec![99, 1, 2]);
    }

    #[test]
    fn pick_smallest_dedups_and_orders() {
        let cands = [(0u32, 5u32), (0, 1), (0, 5), (9, 9), (0, 3)];
        let slots = Slots::new(1, 8);
        let mut dedup = Dedup::new(slots.len());
        let slot = |c: &(u32, u32)| slots.index(c.0, c.1);
        let picked = pick_smallest(&cands, 10, slot, |c| c.1, &mut dedup);
        assert_eq!(picked, vec![1, 4, 0]);
        let picked = pick_smallest(&cands, 2, slot, |c| core::cmp::Reverse(c.1), &mut dedup);
        assert_eq!(picked, vec![0, 4]);
        assert!(pick_smallest(&cands, 0, slot, |c| c.1, &mut dedup).is_empty());
    }

    #[test]
    fn powi_and_ordered_bits() {
        assert_eq!(powi(0.5, 0), 1.0);
        assert_eq!(powi(0.5, 3), 0.125);
        assert!(powi(0.9, 1 << 40) == 0.0);
        let xs = [0.0f32, 1e-30, 0.5, 1.0, 3.0e9, f32::INFINITY];
        for w in xs.windows(2) {
            assert!(ordered_bits(w[0]) < ordered_bits(w[1]));
        }
    }
}
