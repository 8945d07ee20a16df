//! What every `#![no_std]` moehost policy guest shares: the runtime pieces a guest needs to be
//! a component that imports nothing (global allocator, panic handler, `cabi_realloc`), a
//! single-threaded global for policy state, the 0.2 contract's flat encodings (tier codes,
//! packed eviction events, expert-ids), and the pieces policies are built from: exact top-k,
//! per-tier recency lists and resident sets, exclusion marks, victim picking.
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

pub mod transitions;

// ---------------------------------------------------------------------------------------------
// Runtime: allocator, panic handler, cabi_realloc (wasm32 only).
// ---------------------------------------------------------------------------------------------

/// dlmalloc on top of `memory.grow` (no imports needed), with a free list per small size class
/// in front. When the host refuses to grow memory the allocation fails, `alloc` panics and the
/// panic handler traps.
#[cfg(target_arch = "wasm32")]
#[global_allocator]
static ALLOC: pool::Pooled = pool::Pooled;

/// Every call allocates the same few small blocks (the host's argument lists, the answer) and
/// frees them by the next call: a free list per power-of-two size class hands them back in a
/// few instructions, where dlmalloc's malloc and free cost ~250 each. Blocks of 16 B to 4 KiB
/// (Kimi-K2's 384 scores are 1.5 KiB) stay on their class's list once freed; larger or
/// over-aligned ones go to dlmalloc.
#[cfg(target_arch = "wasm32")]
mod pool {
    use core::alloc::{GlobalAlloc, Layout};
    use core::cell::UnsafeCell;
    use core::ptr::null_mut;

    const CLASSES: usize = 9; // 16 << 0 ..= 16 << 8 (4 KiB)

    pub struct Pooled;

    struct Lists(UnsafeCell<[*mut u8; CLASSES]>);

    // SAFETY: a wasm32 guest without the threads proposal is single-threaded.
    unsafe impl Sync for Lists {}

    static FREE: Lists = Lists(UnsafeCell::new([null_mut(); CLASSES]));

    fn class(l: Layout) -> Option<usize> {
        (l.size() <= 16 << (CLASSES - 1) && l.align() <= 16)
            .then(|| (l.size().max(16).next_power_of_two().trailing_zeros() - 4) as usize)
    }

    unsafe impl GlobalAlloc for Pooled {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            let Some(c) = class(l) else {
                return unsafe { dlmalloc::GlobalDlmalloc.alloc(l) };
            };
            // SAFETY: single-threaded; a freed block's first word links the next one.
            unsafe {
                let head = &mut (*FREE.0.get())[c];
                if head.is_null() {
                    return dlmalloc::GlobalDlmalloc
                        .alloc(Layout::from_size_align_unchecked(16 << c, 16));
                }
                let block = *head;
                *head = *(block as *mut *mut u8);
                block
            }
        }

        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            match class(l) {
                // SAFETY: `p` is a block of class `c` (allocated for a layout of that class,
                // as the caller's layout is) of at least 16 bytes, 16-aligned.
                Some(c) => unsafe {
                    let head = &mut (*FREE.0.get())[c];
                    *(p as *mut *mut u8) = *head;
                    *head = p;
                },
                None => unsafe { dlmalloc::GlobalDlmalloc.dealloc(p, l) },
            }
        }

        unsafe fn realloc(&self, p: *mut u8, l: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller guarantees a valid layout for `new_size`.
            let new = unsafe { Layout::from_size_align_unchecked(new_size, l.align()) };
            if class(l).is_some() && class(l) == class(new) {
                return p;
            }
            unsafe {
                let q = self.alloc(new);
                if !q.is_null() {
                    core::ptr::copy_nonoverlapping(p, q, l.size().min(new_size));
                    self.dealloc(p, l);
                }
                q
            }
        }
    }
}

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
/// experts. O(E) cheap float compares plus O(k) per insertion into a small sorted window; no
/// allocation beyond `out`.
pub fn top_k_into(row: &[f32], k: usize, out: &mut Vec<u32>) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    if top_k_simd8(row, k, out) {
        return;
    }
    if !top_k_by_chunk_bound(row, k, out) {
        top_k_filtered_into(row, k, |_| true, out)
    }
}

/// Exact top-k for every token of a selection call: `tokens` rows of scores, `k` ids per row,
/// best first (the model's own routing; what `topk` and the legacy fixtures answer).
pub fn top_k_rows(scores: &[f32], tokens: u32, k: u32) -> Vec<u32> {
    let mut out = Vec::with_capacity(tokens as usize * k as usize);
    if tokens == 0 {
        return out;
    }
    let experts = scores.len() / tokens as usize;
    for row in scores.chunks_exact(experts.max(1)).take(tokens as usize) {
        top_k_into(row, k as usize, &mut out);
    }
    out
}

/// [`top_k_by_chunk_bound`] with sixteen fixed lanes in WebAssembly SIMD, for k <= 8
/// (Kimi-K2's 8, tiny-k2's 6) and rows of a multiple of 8 experts. Each lane's maximum is a
/// different expert, so the k-th largest of the sixteen lane maxima bounds the k-th best: ~10
/// candidates of Kimi-K2's 384 on random scores, against ~21 for the smallest of eight lane
/// maxima. Pass one is `f32x4.pmax` (`pmax(m, s)` = `m < s ? s : m`, the scalar pass's exact
/// rule, NaN kept out); the k-th largest maximum is found without branches by counting, for
/// each maximum, the maxima at or above it; pass two tests 32 scores per branch (eight
/// `f32x4.ge`, or-ed, one `v128.any_true`) and ranks only the candidates, with the scalar
/// path's rule, in an 8-key window on the stack.
///
/// Written for Cranelift: the function is not inlined (inside a large export its loops spilled
/// every vector on every iteration), and the loops take 32 scores per iteration, because the
/// epoch check on each back edge may call into the host, so the loop-carried vectors are
/// stored and reloaded around it. Returns false when it does not apply.
#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
#[inline(never)]
fn top_k_simd8(row: &[f32], k: usize, out: &mut Vec<u32>) -> bool {
    use core::arch::wasm32::*;
    let n = row.len();
    if k == 0 || k > 8 || n < 32 || !n.is_multiple_of(8) {
        return false;
    }
    let p = row.as_ptr();
    // SAFETY (every load below): `at + 4 <= n`; unaligned v128 loads are allowed.
    let load = |at: usize| unsafe { v128_load(p.add(at) as *const v128) };
    let mut m = [f32x4_splat(f32::NEG_INFINITY); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (q, mq) in m.iter_mut().enumerate() {
            *mq = f32x4_pmax(f32x4_pmax(*mq, load(i + 4 * q)), load(i + 16 + 4 * q));
        }
        i += 32;
    }
    while i < n {
        // 8 or 16 left (or 24: 16 then 8); lanes stay disjoint.
        m[0] = f32x4_pmax(m[0], load(i));
        m[1] = f32x4_pmax(m[1], load(i + 4));
        if i + 16 <= n {
            m[2] = f32x4_pmax(m[2], load(i + 8));
            m[3] = f32x4_pmax(m[3], load(i + 12));
            i += 16;
        } else {
            i += 8;
        }
    }
    // count[x] = how many of the 16 maxima are >= x; the largest x counted at least k times
    // is the k-th largest maximum (ties included). No maximum is NaN.
    let one = i32x4_splat(1);
    let mut count = [i32x4_splat(0); 4];
    for v in m {
        for s in [
            i32x4_shuffle::<0, 0, 0, 0>(v, v),
            i32x4_shuffle::<1, 1, 1, 1>(v, v),
            i32x4_shuffle::<2, 2, 2, 2>(v, v),
            i32x4_shuffle::<3, 3, 3, 3>(v, v),
        ] {
            for (c, &x) in count.iter_mut().zip(&m) {
                *c = i32x4_add(*c, v128_and(f32x4_ge(s, x), one));
            }
        }
    }
    let kk = i32x4_splat(k as i32 - 1);
    let mut best = f32x4_splat(f32::NEG_INFINITY);
    for (c, x) in count.iter().zip(m) {
        let x = v128_bitselect(x, best, i32x4_gt(*c, kk));
        best = f32x4_pmax(best, x);
    }
    let best = f32x4_pmax(best, i32x4_shuffle::<2, 3, 0, 1>(best, best));
    let best = f32x4_pmax(best, i32x4_shuffle::<1, 0, 3, 2>(best, best));
    let b = i32x4_shuffle::<0, 0, 0, 0>(best, best);
    let mut w = Candidates::<8>::new(k);
    let ge = |at: usize| f32x4_ge(load(at), b);
    let mut i = 0;
    while i < n {
        // 32 scores, or the last 8, 16 or 24 (the missing lanes compare false).
        let c: [v128; 8] = core::array::from_fn(|q| {
            if i + 4 * q < n {
                ge(i + 4 * q)
            } else {
                i32x4_splat(0)
            }
        });
        let any = v128_or(
            v128_or(v128_or(c[0], c[1]), v128_or(c[2], c[3])),
            v128_or(v128_or(c[4], c[5]), v128_or(c[6], c[7])),
        );
        if v128_any_true(any) {
            let mask = c.iter().enumerate().fold(0u32, |m, (q, &cq)| {
                m | u32::from(i32x4_bitmask(cq)) << (4 * q)
            });
            if !w.offer_mask(row, i, mask) {
                return false;
            }
        }
        i += 32;
    }
    w.finish(out)
}

/// The chunk-bound paths' ranked candidates: the best `k` of at most [`CHUNK_CANDIDATES`]
/// keys offered, descending, in a window of `N >= k` keys on the stack.
struct Candidates<const N: usize> {
    keys: [u64; N],
    offered: usize,
    k: usize,
}

impl<const N: usize> Candidates<N> {
    fn new(k: usize) -> Self {
        // Read only once written; `black_box` keeps LLVM from zeroing the window with a
        // `memory.fill`, which wasmtime runs as a call into the host.
        let unused = core::hint::black_box(0);
        Self {
            keys: [unused; N],
            offered: 0,
            k,
        }
    }

    /// Ranks score `s` of expert `id`; false once more than [`CHUNK_CANDIDATES`] were offered.
    #[inline(always)]
    fn offer(&mut self, s: f32, id: usize) -> bool {
        self.offered += 1;
        if self.offered > CHUNK_CANDIDATES {
            return false;
        }
        let key = rank_key(s, id as u32);
        let filled = (self.offered - 1).min(self.k);
        if filled < self.k || key > self.keys[self.k - 1] {
            insert_key(&mut self.keys, filled.min(self.k - 1), key);
        }
        true
    }

    /// Offers the scores `row[at + l]` for every bit `l` set in `mask`, in index order.
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    #[inline(never)]
    fn offer_mask(&mut self, row: &[f32], at: usize, mut mask: u32) -> bool {
        while mask != 0 {
            let l = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if !self.offer(row[at + l], at + l) {
                return false;
            }
        }
        true
    }

    /// Appends the `k` best ids to `out`; false when fewer than `k` were offered.
    fn finish(&self, out: &mut Vec<u32>) -> bool {
        if self.offered < self.k {
            return false;
        }
        out.extend(self.keys[..self.k].iter().map(|&key| !(key as u32)));
        true
    }
}

/// Most candidates [`top_k_by_chunk_bound`] ranks exactly before giving up.
const CHUNK_CANDIDATES: usize = 64;

/// Top-k in two branch-light passes. Deal the row into `k` disjoint lanes (expert i goes to
/// lane i mod k): each lane's maximum is a different expert, so at least `k` experts score at
/// least the smallest lane maximum, and the k-th best (with every expert tied with it) scores
/// at least that bound. The experts at or above the bound (plain `>=`: NaN never passes, and
/// NaN ranks last anyway; `-0.0`/`+0.0` both pass and the exact key settles them) are then
/// ranked by [`rank_key`]. The lanes are independent, so the first pass has no dependency
/// chain. Returns false (leaving `out` alone) when the row is short, or has too few or too many
/// candidates: the caller then takes the general path.
fn top_k_by_chunk_bound(row: &[f32], k: usize, out: &mut Vec<u32>) -> bool {
    let n = row.len();
    if k == 0 || k > FAST_K || n < 4 * k {
        return false;
    }
    let mut lanes = [f32::NEG_INFINITY; FAST_K];
    let lanes = &mut lanes[..k];
    let mut rows = row.chunks_exact(k);
    for r in &mut rows {
        for (m, &s) in lanes.iter_mut().zip(r) {
            *m = if s > *m { s } else { *m };
        }
    }
    for (m, &s) in lanes.iter_mut().zip(rows.remainder()) {
        *m = if s > *m { s } else { *m };
    }
    let bound = lanes
        .iter()
        .fold(f32::INFINITY, |b, &m| if m < b { m } else { b });
    // Rank the candidates into a descending window of k keys.
    let mut w = Candidates::<FAST_K>::new(k);
    for (i, &s) in row.iter().enumerate() {
        if s >= bound && !w.offer(s, i) {
            return false;
        }
    }
    w.finish(out)
}

/// [`top_k_into`] among the experts `keep` accepts (fewer than `k` when too few are kept).
///
/// Once the window holds `k` ids, a score only reaches the exact comparison when
/// `s >= threshold` (the k-th best's [`score_key`]) in plain float order. That test is a
/// superset of "ranks before the k-th" in the host's order: NaN fails it (NaN ranks as `-inf`,
/// after or tied with any k-th, and ties go to the lower id, already in the window), and the
/// only pair plain `>=` and the IEEE total order disagree on, `+0.0` vs `-0.0`, passes it and is
/// settled by the exact key. So the answer is exactly the host's, and most experts cost one
/// compare. The window (k <= [`FAST_K`]) is a stack array of [`rank_key`]s: integer compares.
pub fn top_k_filtered_into(row: &[f32], k: usize, keep: impl Fn(u32) -> bool, out: &mut Vec<u32>) {
    let k = k.min(row.len());
    if k == 0 {
        return;
    }
    if k > FAST_K {
        return top_k_filtered_slow(row, k, keep, out);
    }
    let mut window = [0u64; FAST_K];
    let mut filled = 0;
    // Fill the window with the first `k` kept experts (sorted, best first).
    let mut next = row.len();
    for (i, &s) in row.iter().enumerate() {
        if filled == k {
            next = i;
            break;
        }
        if keep(i as u32) {
            insert_key(&mut window, filled, rank_key(s, i as u32));
            filled += 1;
        }
    }
    if filled == k {
        let mut min = window[k - 1];
        let mut threshold = score_key(row[!(min as u32) as usize]);
        for (i, &s) in row.iter().enumerate().skip(next) {
            // Cheap reject first (see above): most experts stop here.
            #[allow(clippy::neg_cmp_op_on_partial_ord)] // true for NaN, as meant
            if !(s >= threshold) {
                continue;
            }
            let key = rank_key(s, i as u32);
            if key <= min || !keep(i as u32) {
                continue;
            }
            insert_key(&mut window, k - 1, key);
            min = window[k - 1];
            threshold = score_key(row[!(min as u32) as usize]);
        }
    }
    out.extend(window[..filled].iter().map(|&key| !(key as u32)));
}

/// Largest `k` served with a stack window (larger ones take a slower, allocation-free path).
pub const FAST_K: usize = 64;

/// The host's order as one integer, larger = ranks first: the score's IEEE total order
/// (NaN as `-inf`), then the lower id.
#[inline]
pub fn rank_key(s: f32, id: u32) -> u64 {
    let b = score_key(s).to_bits();
    let ordered = if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    };
    (u64::from(ordered) << 32) | u64::from(!id)
}

/// Inserts `key` into the descending `window[..len]` (one slot free at `len`).
#[inline]
fn insert_key(window: &mut [u64], len: usize, key: u64) {
    let mut pos = len;
    while pos > 0 && window[pos - 1] < key {
        window[pos] = window[pos - 1];
        pos -= 1;
    }
    window[pos] = key;
}

/// [`top_k_filtered_into`] for any `k`: a sorted window in `out` itself.
fn top_k_filtered_slow(row: &[f32], k: usize, keep: impl Fn(u32) -> bool, out: &mut Vec<u32>) {
    let start = out.len();
    for e in 0..row.len() as u32 {
        if out.len() - start == k {
            // Ids ascend, so a newcomer tied with the current k-th ranks after it.
            if rank_cmp(row, e, out[start + k - 1]) != Ordering::Less {
                continue;
            }
        }
        if !keep(e) {
            continue;
        }
        if out.len() - start == k {
            out.pop();
        }
        insert_ranked(row, e, start, out);
    }
}

/// Inserts `e` into the sorted window `out[start..]` at its rank.
#[inline]
fn insert_ranked(row: &[f32], e: u32, start: usize, out: &mut Vec<u32>) {
    let mut pos = out.len();
    while pos > start && rank_cmp(row, e, out[pos - 1]) == Ordering::Less {
        pos -= 1;
    }
    out.insert(pos, e);
}

// ---------------------------------------------------------------------------------------------
// The 0.2 contract's flat encodings.
// ---------------------------------------------------------------------------------------------

/// Tier codes of the flat residency lists (`list<u8>`) and of eviction events.
pub mod tier {
    /// Compute-ready.
    pub const DEVICE: u8 = 0;
    /// Host RAM in storage format.
    pub const HOST: u8 = 1;
    /// Only in the checkpoint (every expert).
    pub const DISK: u8 = 2;
    /// The tiers whose residents a policy tracks (device, host): codes `0..CACHED`.
    pub const CACHED: usize = 2;
}

/// Kinds of eviction events (`kind << 30 | tier << 28 | expert-id`).
pub mod event {
    /// The expert was used by the step.
    pub const ACCESS: u8 = 0;
    /// The expert became resident in the tier.
    pub const INSERT: u8 = 1;
    /// The expert left the tier.
    pub const REMOVE: u8 = 2;
    /// Bits of the expert id in an event.
    pub const ID_MASK: u32 = (1 << 28) - 1;
}

/// Splits one packed eviction event into `(kind, tier code, expert-id)`. No validation: kind 3
/// and tier code 3 are possible in garbage input, and the id may be out of range.
#[inline]
pub fn decode_event(ev: u32) -> (u8, u8, u32) {
    (
        (ev >> 30) as u8,
        ((ev >> 28) & 3) as u8,
        ev & event::ID_MASK,
    )
}

/// The inverse of [`decode_event`] (tests, tools).
#[inline]
pub fn encode_event(kind: u8, tier: u8, id: u32) -> u32 {
    (u32::from(kind) & 3) << 30 | (u32::from(tier) & 3) << 28 | (id & event::ID_MASK)
}

/// Dense indexing of experts: `expert-id = layer * experts-per-layer + expert`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    pub layers: u32,
    pub experts: u32,
    /// `floor((2^64 - 1) / experts) + 1`: [`Slots::split`] divides by `experts` with two
    /// multiplications (Lemire, Kaser & Kurz, "Faster remainder by direct computation", 2019:
    /// exact for every 32-bit numerator), where a division costs ~25 cycles, several times per
    /// event on the policies' hot path.
    magic: u64,
}

impl Slots {
    pub fn new(layers: u32, experts: u32) -> Self {
        Slots {
            layers,
            experts,
            magic: match experts {
                0 => 0,
                d => (u64::MAX / u64::from(d)).wrapping_add(1),
            },
        }
    }

    /// Number of expert ids.
    pub fn len(&self) -> usize {
        self.layers as usize * self.experts as usize
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The expert-id of `(layer, expert)`, `None` when out of range.
    #[inline]
    pub fn index(&self, layer: u32, expert: u32) -> Option<usize> {
        (layer < self.layers && expert < self.experts)
            .then(|| layer as usize * self.experts as usize + expert as usize)
    }

    /// Whether `id` names an expert of the model.
    #[inline]
    pub fn contains(&self, id: u32) -> bool {
        (id as usize) < self.len()
    }

    /// `(layer, expert)` of an expert-id, `None` when out of range.
    #[inline]
    pub fn split(&self, id: u32) -> Option<(u32, u32)> {
        self.contains(id).then(|| {
            // The high 64 bits of the 96-bit `magic * id`, from two 64-bit products (neither
            // they nor their sum overflow). `experts` is 1 when `magic` wrapped to 0.
            let layer = if self.magic == 0 {
                id
            } else {
                let (hi, lo) = (self.magic >> 32, self.magic & 0xffff_ffff);
                ((hi * u64::from(id) + ((lo * u64::from(id)) >> 32)) >> 32) as u32
            };
            (layer, id - layer * self.experts)
        })
    }
}

/// A set of dense ids that forgets all its marks in O(1) (an epoch per mark): drops duplicates
/// within one call, and marks a victim request's `excluded` experts.
#[derive(Default)]
pub struct Marks {
    seen: Vec<u32>,
    epoch: u32,
}

impl Marks {
    pub fn new(len: usize) -> Self {
        Marks {
            seen: vec![0; len],
            epoch: 1,
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

    /// Marks `slot`; true the first time since [`Marks::start`] (false when out of range).
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

    /// Marks `slot` (ignored when out of range).
    #[inline]
    pub fn mark(&mut self, slot: usize) {
        self.first(slot);
    }

    /// Whether `slot` was marked since [`Marks::start`].
    #[inline]
    pub fn contains(&self, slot: usize) -> bool {
        self.seen.get(slot).is_some_and(|&m| m == self.epoch)
    }
}

const NIL: u32 = u32::MAX;

/// Recency lists over dense ids `0..len`: intrusive doubly-linked lists (two u32 links per id,
/// one sentinel per list after the ids), least recent at each list's front. An id is in at most
/// one list at a time. Every operation is O(1); iteration from the least recent is
/// O(visited). [`Recency::new`] makes one list (a tier's residents);
/// [`Recency::with_lists`] several (e.g. one per MoE layer).
pub struct Recency {
    /// `next[i]`/`prev[i]`: neighbours of id `i`, `NIL` when `i` is in no list. Index
    /// `len + l` is list `l`'s sentinel: its `next` is the least recent, its `prev` the most
    /// recent.
    next: Vec<u32>,
    prev: Vec<u32>,
    ids: u32,
    count: usize,
}

impl Recency {
    /// One list over ids `0..len`.
    pub fn new(len: usize) -> Self {
        Self::with_lists(len, 1)
    }

    /// `lists` lists over ids `0..len` (ids and lists together must fit in u32).
    pub fn with_lists(len: usize, lists: usize) -> Self {
        let total = len + lists;
        let mut r = Recency {
            next: vec![NIL; total],
            prev: vec![NIL; total],
            ids: len as u32,
            count: 0,
        };
        for s in len..total {
            r.next[s] = s as u32;
            r.prev[s] = s as u32;
        }
        r
    }

    /// Ids in the lists.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Whether `id` is one of the ids `0..len`.
    #[inline]
    pub fn in_range(&self, id: u32) -> bool {
        id < self.ids
    }

    /// Whether `id` is in a list (false when out of range).
    #[inline]
    pub fn contains(&self, id: u32) -> bool {
        id < self.ids && self.next[id as usize] != NIL
    }

    /// Puts `id` at the most recent end of `list`, taking it out of the list it was in
    /// (ignored when `id` or `list` is out of range).
    #[inline]
    pub fn push(&mut self, list: u32, id: u32) {
        let s = self.ids as usize + list as usize;
        if id >= self.ids || s >= self.next.len() {
            return;
        }
        if self.next[id as usize] != NIL {
            self.unlink(id);
        }
        let last = self.prev[s];
        self.next[last as usize] = id;
        self.prev[id as usize] = last;
        self.next[id as usize] = s as u32;
        self.prev[s] = id;
        self.count += 1;
    }

    /// [`Recency::push`] to list 0.
    #[inline]
    pub fn touch(&mut self, id: u32) {
        self.push(0, id);
    }

    /// Moves `id` to the most recent end of list 0 when it is in a list (otherwise nothing).
    #[inline]
    pub fn refresh(&mut self, id: u32) {
        if self.contains(id) {
            self.push(0, id);
        }
    }

    /// Takes `id` out of its list; false when it was in none.
    #[inline]
    pub fn remove(&mut self, id: u32) -> bool {
        if !self.contains(id) {
            return false;
        }
        self.unlink(id);
        true
    }

    fn unlink(&mut self, id: u32) {
        let (p, n) = (self.prev[id as usize], self.next[id as usize]);
        self.next[p as usize] = n;
        self.prev[n as usize] = p;
        self.next[id as usize] = NIL;
        self.prev[id as usize] = NIL;
        self.count -= 1;
    }

    /// List 0's ids, least recent first.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.iter_list(0)
    }

    /// The ids of `list`, least recent first (none when `list` is out of range).
    pub fn iter_list(&self, list: u32) -> impl Iterator<Item = u32> + '_ {
        let s = self.ids as usize + list as usize;
        let (s, mut at) = if s < self.next.len() {
            (s as u32, self.next[s])
        } else {
            (NIL, NIL)
        };
        core::iter::from_fn(move || {
            if at == s {
                return None;
            }
            let id = at;
            at = self.next[id as usize];
            Some(id)
        })
    }
}

/// A set of dense ids `0..len` with O(1) insert, remove and membership, and iteration over the
/// members in O(members) (a dense member array plus each id's position in it). Iteration order
/// is unspecified: policies that scan it rank by keys that are total.
pub struct ResidentSet {
    /// Position of each id in `members`, `NIL` when absent.
    pos: Vec<u32>,
    members: Vec<u32>,
}

impl ResidentSet {
    pub fn new(len: usize) -> Self {
        ResidentSet {
            pos: vec![NIL; len],
            members: Vec::new(),
        }
    }

    #[inline]
    pub fn contains(&self, id: u32) -> bool {
        self.pos.get(id as usize).is_some_and(|&p| p != NIL)
    }

    /// Adds `id`; false when it was already in (or is out of range).
    #[inline]
    pub fn insert(&mut self, id: u32) -> bool {
        match self.pos.get_mut(id as usize) {
            Some(p) if *p == NIL => {
                *p = self.members.len() as u32;
                self.members.push(id);
                true
            }
            _ => false,
        }
    }

    /// Removes `id`; false when it was not in.
    #[inline]
    pub fn remove(&mut self, id: u32) -> bool {
        let Some(&p) = self.pos.get(id as usize) else {
            return false;
        };
        if p == NIL {
            return false;
        }
        self.members.swap_remove(p as usize);
        if let Some(&moved) = self.members.get(p as usize) {
            self.pos[moved as usize] = p;
        }
        self.pos[id as usize] = NIL;
        true
    }

    /// The members, in no particular order.
    #[inline]
    pub fn members(&self) -> &[u32] {
        &self.members
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

/// Moves the `count` entries of `keyed` with the smallest keys, smallest first, into `out` as
/// their ids (all of them when fewer). Keys must be total (end them with the id) for a
/// deterministic answer. `keyed` is left empty, its capacity kept for reuse. O(n) selection +
/// O(count log count) sorting, no allocation once the buffers are grown.
pub fn take_smallest<K: Ord>(keyed: &mut Vec<(K, u32)>, count: usize, out: &mut Vec<u32>) {
    let count = count.min(keyed.len());
    if count > 0 {
        if count < keyed.len() {
            keyed.select_nth_unstable(count - 1);
            keyed.truncate(count);
        }
        keyed.sort_unstable();
        out.extend(keyed.iter().map(|&(_, id)| id));
    }
    keyed.clear();
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

/// [`ordered_bits`] for f64.
#[inline]
pub fn ordered_bits64(x: f64) -> u64 {
    let b = x.to_bits();
    if b & (1 << 63) != 0 {
        !b
    } else {
        b | (1 << 63)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn split_divides_exactly() {
        // Every id of small shapes, and ids near the ends and near multiples for wide ones
        // (up to ids of 32 bits: the division by multiplication is exact there too).
        for experts in [
            1u32,
            2,
            3,
            7,
            8,
            64,
            384,
            1000,
            65_537,
            1 << 20,
            u32::MAX / 3,
        ] {
            let layers = (u64::from(u32::MAX) / u64::from(experts)).min(61) as u32;
            let slots = Slots::new(layers, experts);
            let len = slots.len() as u64;
            let mut ids: Vec<u64> = (0..len.min(4096)).collect();
            for l in 0..u64::from(layers) {
                let base = l * u64::from(experts);
                ids.extend([base, base + 1, base + u64::from(experts) - 1].map(|x| x.min(len - 1)));
            }
            ids.push(len - 1);
            for id in ids {
                let id = id as u32;
                assert_eq!(
                    slots.split(id),
                    Some((id / experts, id % experts)),
                    "{id} / {experts}"
                );
            }
            assert_eq!(slots.split(len.min(u64::from(u32::MAX)) as u32), None);
        }
    }

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
    fn top_k_beyond_the_fast_window_matches_host() {
        let mut x: u32 = 5;
        let row: Vec<f32> = (0..300)
            .map(|_| {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((x >> 28) as f32) / 16.0 - 0.5 // ties and signed zeros
            })
            .collect();
        for k in [FAST_K - 1, FAST_K, FAST_K + 1, 200, 300] {
            assert_eq!(top_k(&row, k), host_top_k(&row, k), "k {k}");
        }
    }

    #[test]
    fn rank_key_is_the_host_order() {
        let v = [
            f32::NAN,
            -1.0,
            -0.0,
            0.0,
            1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        for a in 0..v.len() as u32 {
            for b in 0..v.len() as u32 {
                let want = rank_cmp(&v, a, b);
                let got = rank_key(v[b as usize], b).cmp(&rank_key(v[a as usize], a));
                assert_eq!(got, want, "{a} {b}");
            }
        }
    }

    #[test]
    fn top_k_appends() {
        let mut out = vec![99];
        top_k_into(&[0.1, 0.3, 0.2], 2, &mut out);
        assert_eq!(out, vec![99, 1, 2]);
    }

    #[test]
    fn top_k_threshold_handles_signed_zero_and_infinities() {
        let inf = f32::INFINITY;
        let nan = f32::NAN;
        let rows: [&[f32]; 6] = [
            &[-0.0, -0.0, 0.0, -0.0, 0.0],
            &[0.0, 0.0, -0.0, -0.0],
            &[-inf, -inf, nan, -inf, nan, 0.0],
            &[nan, nan, nan],
            &[inf, inf, -inf, inf, nan, inf],
            &[0.1, -0.0, 0.2, 0.0, -1.0, 0.2],
        ];
        for row in rows {
            for k in 0..=row.len() + 1 {
                assert_eq!(top_k(row, k), host_top_k(row, k), "row {row:?} k {k}");
            }
        }
    }

    #[test]
    fn top_k_matches_host_at_k2_shape() {
        let mut x: u32 = 99;
        for _ in 0..50 {
            let row: Vec<f32> = (0..384)
                .map(|_| {
                    x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                    (x >> 8) as f32 / (1u32 << 24) as f32
                })
                .collect();
            assert_eq!(top_k(&row, 8), host_top_k(&row, 8));
        }
    }

    #[test]
    fn top_k_filtered_keeps_only_kept() {
        let row = [0.9, 0.8, 0.7, 0.6, 0.5];
        let mut out = Vec::new();
        top_k_filtered_into(&row, 2, |e| e % 2 == 0, &mut out);
        assert_eq!(out, vec![0, 2]);
        out.clear();
        top_k_filtered_into(&row, 4, |e| e > 2, &mut out);
        assert_eq!(out, vec![3, 4]);
    }

    #[test]
    fn events_round_trip() {
        for (k, t, id) in [
            (0u8, 0u8, 0u32),
            (1, 1, 23_039),
            (2, 2, (1 << 28) - 1),
            (3, 3, 5),
        ] {
            assert_eq!(decode_event(encode_event(k, t, id)), (k, t, id));
        }
        assert_eq!(
            decode_event(2 << 30 | 1 << 28 | 77),
            (event::REMOVE, tier::HOST, 77)
        );
        assert_eq!(decode_event(u32::MAX), (3, 3, event::ID_MASK));
    }

    #[test]
    fn slots_split_and_index() {
        let s = Slots::new(60, 384);
        assert_eq!(s.len(), 23_040);
        assert_eq!(s.index(2, 5), Some(2 * 384 + 5));
        assert_eq!(s.split(2 * 384 + 5), Some((2, 5)));
        assert_eq!(s.split(23_040), None);
        assert_eq!(s.index(60, 0), None);
        assert!(!s.contains(u32::MAX));
    }

    #[test]
    fn marks_forget_on_start() {
        let mut m = Marks::new(4);
        assert!(!m.contains(1));
        assert!(m.first(1));
        assert!(!m.first(1));
        m.mark(3);
        m.mark(99);
        assert!(m.contains(1) && m.contains(3) && !m.contains(99) && !m.contains(0));
        m.start();
        assert!(!m.contains(1) && !m.contains(3));
        assert!(m.first(1));
    }

    #[test]
    fn recency_orders_and_unlinks() {
        let mut r = Recency::new(6);
        for id in [3, 1, 4, 1, 5] {
            r.touch(id);
        }
        r.touch(99); // out of range: ignored
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![3, 4, 1, 5]);
        assert_eq!(r.len(), 4);
        r.refresh(3);
        r.refresh(0); // absent: not added
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![4, 1, 5, 3]);
        assert!(r.remove(1));
        assert!(!r.remove(1));
        assert!(!r.remove(99));
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![4, 5, 3]);
        for id in [4, 5, 3] {
            assert!(r.remove(id));
        }
        assert!(r.is_empty() && r.iter().next().is_none());
        r.touch(0);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![0]);
        assert!(r.contains(0) && !r.contains(5) && !r.contains(6));
    }

    #[test]
    fn recency_keeps_several_lists() {
        let mut r = Recency::with_lists(10, 3);
        for (l, id) in [(0, 1), (2, 9), (0, 4), (2, 3), (1, 5), (0, 1)] {
            r.push(l, id);
        }
        r.push(3, 2); // no list 3: ignored
        r.push(1, 10); // id out of range: ignored
        let list = |r: &Recency, l| r.iter_list(l).collect::<Vec<_>>();
        assert_eq!(list(&r, 0), vec![4, 1]);
        assert_eq!(list(&r, 1), vec![5]);
        assert_eq!(list(&r, 2), vec![9, 3]);
        assert!(list(&r, 3).is_empty() && list(&r, 99).is_empty());
        r.push(1, 9); // moves between lists
        assert_eq!((list(&r, 1), list(&r, 2)), (vec![5, 9], vec![3]));
        assert!(r.remove(5) && r.remove(3));
        assert_eq!((list(&r, 1), list(&r, 2), r.len()), (vec![9], vec![], 3));
        assert!(!r.contains(2) && r.contains(4));
    }

    #[test]
    fn resident_set_insert_remove_iterate() {
        let mut s = ResidentSet::new(8);
        for id in [5, 2, 7, 2, 9] {
            s.insert(id);
        }
        let mut m = s.members().to_vec();
        m.sort();
        assert_eq!(m, vec![2, 5, 7]);
        assert!(s.remove(5) && !s.remove(5) && !s.remove(9));
        assert!(s.contains(7) && s.contains(2) && !s.contains(5));
        assert!(s.remove(7) && s.remove(2) && s.is_empty());
        assert!(s.insert(5) && s.members() == [5]);
    }

    #[test]
    fn take_smallest_orders_and_reuses() {
        let mut keyed = vec![(5u32, 0u32), (1, 1), (3, 4), (9, 9)];
        let mut out = vec![];
        take_smallest(&mut keyed, 2, &mut out);
        assert_eq!(out, vec![1, 4]);
        assert!(keyed.is_empty());
        keyed.extend([(2u32, 7u32), (1, 8)]);
        take_smallest(&mut keyed, 10, &mut out);
        assert_eq!(out, vec![1, 4, 8, 7]);
        take_smallest(&mut keyed, 3, &mut out);
        assert_eq!(out.len(), 4);
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
