//! What is resident where, by dense key (`layer * experts_per_layer + expert`): the device tier
//! (C experts, one pool for the model or one pool of C per layer), the host tier (unlimited, or
//! C2 experts in the same pool layout), the keys a victim request leaves out, and the
//! candidates it offers. The live store and the replay lab both keep their tiers in it.

use crate::policy::{Candidates, ExpertKey, InitArgs, ModelShape, Tier, TierCapacity};

/// A fixed-size set of keys.
#[derive(Debug, Clone)]
pub struct BitSet {
    words: Vec<u64>,
}

impl BitSet {
    pub fn new(n: usize) -> Self {
        Self {
            words: vec![0; n.div_ceil(64)],
        }
    }

    /// Grows the set to hold keys below `n`.
    pub fn fit(&mut self, n: usize) {
        if self.words.len() < n.div_ceil(64) {
            self.words.resize(n.div_ceil(64), 0);
        }
    }

    #[inline]
    pub fn has(&self, k: u32) -> bool {
        self.words[(k >> 6) as usize] >> (k & 63) & 1 == 1
    }

    #[inline]
    pub fn set(&mut self, k: u32) {
        self.words[(k >> 6) as usize] |= 1 << (k & 63);
    }

    #[inline]
    pub fn clear(&mut self, k: u32) {
        self.words[(k >> 6) as usize] &= !(1 << (k & 63));
    }

    /// Sets (or clears) every key of `keys`.
    pub fn set_all(&mut self, keys: impl IntoIterator<Item = u32>, on: bool) {
        for k in keys {
            if on {
                self.set(k)
            } else {
                self.clear(k)
            }
        }
    }

    /// Keys in `start..end` that are in `self` and in none of `minus`, ascending.
    pub fn for_each_in(&self, start: u32, end: u32, minus: &[&BitSet], f: impl FnMut(u32)) {
        for_each_bit(
            start,
            end,
            |w| {
                let mut bits = self.words[w];
                for m in minus {
                    bits &= !m.words[w];
                }
                bits
            },
            f,
        )
    }
}

/// The set bits of `word(w)` for the words covering `start..end`, clipped to the range.
fn for_each_bit(start: u32, end: u32, word: impl Fn(usize) -> u64, mut f: impl FnMut(u32)) {
    if start >= end {
        return;
    }
    let (w0, w1) = ((start >> 6) as usize, ((end - 1) >> 6) as usize);
    for w in w0..=w1 {
        let mut bits = word(w);
        if w == w0 {
            bits &= !0u64 << (start & 63);
        }
        if w == w1 && end & 63 != 0 {
            bits &= (1u64 << (end & 63)) - 1;
        }
        while bits != 0 {
            let b = bits.trailing_zeros();
            f((w as u32) << 6 | b);
            bits &= bits - 1;
        }
    }
}

/// A victim request under construction: which tier and pool, how many, and which keys the
/// candidates leave out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub tier: Tier,
    pub pool: u32,
    pub count: u32,
    /// Leave out the keys of the (step, layer) being served.
    pub skip_pinned: bool,
    /// Leave out the keys marked in `Residency::extra` (experts being prefetched or admitted).
    pub skip_extra: bool,
}

impl Request {
    /// Device victims of `pool`: never the pinned experts of the step being served, nor (with
    /// `skip_extra`) the marked ones being prefetched.
    pub fn device(pool: u32, count: u32, skip_extra: bool) -> Self {
        Self {
            tier: Tier::Device,
            pool,
            count,
            skip_pinned: true,
            skip_extra,
        }
    }

    /// Host victims of `pool`: never the marked experts being admitted.
    pub fn host(pool: u32, count: u32) -> Self {
        Self {
            tier: Tier::Host,
            pool,
            count,
            skip_pinned: false,
            skip_extra: true,
        }
    }
}

/// Residency of both cached tiers.
#[derive(Debug, Clone)]
pub struct Residency {
    pub shape: ModelShape,
    pub per_layer: bool,
    /// Device slots per pool.
    pub device_cap: u32,
    /// Host slots per pool; `None`: the host tier holds every expert.
    pub host_cap: Option<u32>,
    device: BitSet,
    host: BitSet,
    pub pinned: BitSet,
    pub extra: BitSet,
    device_count: Vec<u32>,
    host_count: Vec<u32>,
}

impl Residency {
    pub fn new(shape: ModelShape, per_layer: bool, device_cap: u32, host_cap: Option<u32>) -> Self {
        let n = (shape.moe_layers * shape.experts_per_layer) as usize;
        let pools = if per_layer {
            shape.moe_layers as usize
        } else {
            1
        };
        Self {
            shape,
            per_layer,
            device_cap,
            host_cap,
            device: BitSet::new(n),
            host: BitSet::new(n),
            pinned: BitSet::new(n),
            extra: BitSet::new(n),
            device_count: vec![0; pools],
            host_count: vec![0; pools],
        }
    }

    pub fn n_keys(&self) -> u32 {
        self.shape.moe_layers * self.shape.experts_per_layer
    }

    #[inline]
    pub fn pool_of(&self, key: u32) -> u32 {
        if self.per_layer {
            key / self.shape.experts_per_layer
        } else {
            0
        }
    }

    /// The key range of `pool`.
    pub fn pool_range(&self, pool: u32) -> (u32, u32) {
        if self.per_layer {
            let e = self.shape.experts_per_layer;
            (pool * e, (pool + 1) * e)
        } else {
            (0, self.n_keys())
        }
    }

    #[inline]
    pub fn key(&self, k: u32) -> ExpertKey {
        ExpertKey {
            layer: k / self.shape.experts_per_layer,
            expert: k % self.shape.experts_per_layer,
        }
    }

    /// The dense key of `e`, if it is in range.
    #[inline]
    pub fn dense(&self, e: ExpertKey) -> Option<u32> {
        (e.layer < self.shape.moe_layers && e.expert < self.shape.experts_per_layer)
            .then(|| e.layer * self.shape.experts_per_layer + e.expert)
    }

    #[inline]
    pub fn on_device(&self, k: u32) -> bool {
        self.device.has(k)
    }

    /// In the host tier (always, when the host tier holds every expert).
    #[inline]
    pub fn on_host(&self, k: u32) -> bool {
        self.host_cap.is_none() || self.host.has(k)
    }

    pub fn device_count(&self, pool: u32) -> u32 {
        self.device_count[pool as usize]
    }

    pub fn host_count(&self, pool: u32) -> u32 {
        self.host_count[pool as usize]
    }

    pub fn device_free(&self, pool: u32) -> u32 {
        self.device_cap.saturating_sub(self.device_count(pool))
    }

    pub fn insert(&mut self, k: u32, tier: Tier) {
        let pool = self.pool_of(k) as usize;
        match tier {
            Tier::Device => {
                debug_assert!(!self.device.has(k));
                self.device.set(k);
                self.device_count[pool] += 1;
            }
            Tier::Host => {
                debug_assert!(!self.host.has(k));
                self.host.set(k);
                self.host_count[pool] += 1;
            }
            Tier::Disk => {}
        }
    }

    /// Removes `k` from `tier`; false if it was not there.
    pub fn remove(&mut self, k: u32, tier: Tier) -> bool {
        let pool = self.pool_of(k) as usize;
        let (set, count) = match tier {
            Tier::Device => (&mut self.device, &mut self.device_count),
            Tier::Host => (&mut self.host, &mut self.host_count),
            Tier::Disk => return false,
        };
        if !set.has(k) {
            return false;
        }
        set.clear(k);
        count[pool] -= 1;
        true
    }

    fn tier_set(&self, tier: Tier) -> &BitSet {
        match tier {
            Tier::Device => &self.device,
            _ => &self.host,
        }
    }

    /// The sets `r` leaves out, then `hidden`, into `buf`; how many.
    fn minus<'a>(&'a self, r: &Request, hidden: &[&'a BitSet], buf: &mut [&'a BitSet; 4]) -> usize {
        let mut n = 0;
        for (skip, set) in [(r.skip_pinned, &self.pinned), (r.skip_extra, &self.extra)] {
            if skip {
                buf[n] = set;
                n += 1;
            }
        }
        assert!(hidden.len() <= 2, "at most two hidden sets");
        for h in hidden {
            buf[n] = h;
            n += 1;
        }
        n
    }

    /// Whether `k` is one of `r`'s candidates, leaving out the keys in `hidden` too.
    pub fn is_candidate(&self, k: u32, r: &Request, hidden: &[&BitSet]) -> bool {
        let (start, end) = self.pool_range(r.pool);
        (start..end).contains(&k)
            && self.tier_set(r.tier).has(k)
            && !(r.skip_pinned && self.pinned.has(k))
            && !(r.skip_extra && self.extra.has(k))
            && !hidden.iter().any(|h| h.has(k))
    }

    /// The candidates of `r` not in `hidden`, ascending.
    pub fn candidates(&self, r: &Request, hidden: &[&BitSet], f: impl FnMut(u32)) {
        let (start, end) = self.pool_range(r.pool);
        let mut buf = [&self.pinned; 4];
        let n = self.minus(r, hidden, &mut buf);
        self.tier_set(r.tier).for_each_in(start, end, &buf[..n], f)
    }

    /// How many candidates `r` has outside `hidden`.
    pub fn candidate_count(&self, r: &Request, hidden: &[&BitSet]) -> u32 {
        let mut n = 0;
        self.candidates(r, hidden, |_| n += 1);
        n
    }

    /// The keys `r` leaves out (resident in its tier and pool, but pinned or extra, as `r`
    /// says) that are not in `hidden`, ascending.
    pub fn excluded(&self, r: &Request, hidden: &[&BitSet], f: impl FnMut(u32)) {
        let (start, end) = self.pool_range(r.pool);
        let set = self.tier_set(r.tier);
        for_each_bit(
            start,
            end,
            |w| {
                let pinned = if r.skip_pinned {
                    self.pinned.words[w]
                } else {
                    0
                };
                let extra = if r.skip_extra { self.extra.words[w] } else { 0 };
                let hid = hidden.iter().fold(0, |a, h| a | h.words[w]);
                set.words[w] & (pinned | extra) & !hid
            },
            f,
        )
    }

    /// Fastest tier of each expert of MoE layer `layer`.
    pub fn layer_tiers(&self, layer: u32) -> Vec<Tier> {
        let e = self.shape.experts_per_layer;
        (layer * e..(layer + 1) * e)
            .map(|k| {
                if self.on_device(k) {
                    Tier::Device
                } else if self.on_host(k) {
                    Tier::Host
                } else {
                    Tier::Disk
                }
            })
            .collect()
    }

    /// What a policy's `init` gets: the shape, the capacities (device and host slots in all,
    /// whatever the pool layout; each slot `expert_bytes`) and what is resident now, ascending.
    pub fn init_args(&self) -> InitArgs {
        let eb = self.shape.expert_bytes;
        self.init_args_with(eb, eb, &[])
    }

    /// `init_args` with a device slot of `device_slot_bytes`, a host slot of `host_slot_bytes`,
    /// and the device keys in `hidden` (slots still loading) not counted as resident.
    pub fn init_args_with(
        &self,
        device_slot_bytes: u64,
        host_slot_bytes: u64,
        hidden: &[&BitSet],
    ) -> InitArgs {
        let pools = if self.per_layer {
            self.shape.moe_layers
        } else {
            1
        };
        let n = self.n_keys();
        let device_slots = (self.device_cap * pools).min(n);
        let host_slots = self.host_cap.map_or(n, |c| (c * pools).min(n));
        let mut resident = Vec::new();
        self.device
            .for_each_in(0, n, hidden, |k| resident.push((self.key(k), Tier::Device)));
        if self.host_cap.is_some() {
            self.host
                .for_each_in(0, n, &[], |k| resident.push((self.key(k), Tier::Host)));
        }
        resident.sort();
        InitArgs {
            shape: self.shape,
            capacities: vec![
                TierCapacity {
                    tier: Tier::Device,
                    slots: device_slots,
                    bytes: device_slots as u64 * device_slot_bytes,
                },
                TierCapacity {
                    tier: Tier::Host,
                    slots: host_slots,
                    bytes: host_slots as u64 * host_slot_bytes,
                },
                TierCapacity {
                    tier: Tier::Disk,
                    slots: n,
                    bytes: n as u64 * self.shape.expert_bytes,
                },
            ],
            resident,
        }
    }
}

/// A victim request's candidates as a policy sees them, answered from the residency bitsets:
/// `request`'s candidates minus `hidden` (residents the policy has not been told of, slots
/// still loading).
pub struct Offered<'a> {
    pub res: &'a Residency,
    pub request: Request,
    pub hidden: &'a [&'a BitSet],
}

impl Candidates for Offered<'_> {
    fn contains(&self, e: ExpertKey) -> bool {
        self.res
            .dense(e)
            .is_some_and(|k| self.res.is_candidate(k, &self.request, self.hidden))
    }

    fn list(&self) -> Vec<ExpertKey> {
        let mut v = Vec::new();
        self.res
            .candidates(&self.request, self.hidden, |k| v.push(self.res.key(k)));
        v
    }
}
