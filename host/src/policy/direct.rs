//! Direct calls: a 0.2 selection, eviction or prefetch policy run as its core module, with the
//! canonical ABI done by hand for exactly the contract's functions.
//!
//! Why: a call through wasmtime's generic component path costs ~5,000 host instructions before
//! the guest runs a single one (export lookup by name on every call, lifting and lowering
//! contexts, a separate call per list argument and for post-return), three times per MoE layer
//! step. A core call costs a few hundred. This is the same code the component would run: the
//! component is checked (world, version, no imports) by `wasm`, and this path only applies when
//! the component is the plain shape wit-bindgen and other componentizers produce: exactly one
//! core module, instantiated once and importing nothing, exporting `memory`, `cabi_realloc`
//! and the contract's functions under their canonical names
//! (`moehost:policy/selection@0.2.1#select`) with their canonical core signatures, lifted with
//! UTF-8 strings and the synchronous ABI. Anything else runs on the generic path.
//!
//! Owns: finding and checking the core module, instantiating it, lowering arguments into guest
//! memory through `cabi_realloc`, lifting results back with every pointer, length, alignment,
//! enum and UTF-8 string checked (a bad one is an error, like a trap: the guard falls back),
//! and calling post-return.
//! Does not own: deadlines, memory limits and dropping a failed instance (`wasm`: the store is
//! the same), validating answers (`guard`).

use wasmtime::{
    Error, Instance, InstancePre, Linker, Memory, Module, Result, Store, TypedFunc, ValType,
};

use super::PolicyKind;

/// The contract 0.2 core signatures (`i` i32, `I` i64; `>` then results), as the canonical ABI
/// flattens them. Every function returns one pointer to its results in guest memory.
const INIT: &str = "iiiIiiiiii>i";
const SELECT: &str = "iiiiiii>i";
const ON_STEP: &str = "Iiiiiiiiiii>i";
const VICTIMS: &str = "iiiiii>i";
const ON_ROUTED: &str = "Iiiiiii>i";
const REALLOC: &str = "iiii>i";
const POST: &str = "i>";

/// Longest policy name or description accepted (bytes).
const MAX_TEXT: usize = 64 << 10;

/// The core module of a plain-shaped 0.2 policy component, ready to instantiate.
pub(super) struct DirectModule<T: 'static> {
    pre: InstancePre<T>,
    kind: PolicyKind,
    /// The exported interface, e.g. `moehost:policy/selection@0.2.1`.
    export: String,
}

impl<T: 'static> DirectModule<T> {
    /// The component's core module when the component has the plain shape (see the module
    /// docs); `Ok(None)` when it does not (the generic path serves it). `export` is the policy
    /// interface the component was checked to export.
    pub fn new(
        engine: &wasmtime::Engine,
        component: &[u8],
        kind: PolicyKind,
        export: &str,
    ) -> anyhow::Result<Option<Self>> {
        let funcs: &[(&str, &str)] = match kind {
            PolicyKind::Selection => &[("init", INIT), ("select", SELECT)],
            PolicyKind::Eviction => &[("init", INIT), ("on-step", ON_STEP), ("victims", VICTIMS)],
            PolicyKind::Prefetch => &[("init", INIT), ("on-routed", ON_ROUTED)],
            PolicyKind::Placement => return Ok(None),
        };
        if !export.contains("@0.2.") {
            return Ok(None);
        }
        let Some(core) = only_core_module(component)? else {
            return Ok(None);
        };
        let module = Module::new(engine, core)
            .map_err(|e| anyhow::anyhow!("compiling its core module: {e:#}"))?;
        if module.imports().len() != 0 {
            return Ok(None);
        }
        let sig = |name: &str| match module.get_export(name) {
            Some(wasmtime::ExternType::Func(f)) => Some(signature(&f)),
            _ => None,
        };
        let has_memory = matches!(
            module.get_export("memory"),
            Some(wasmtime::ExternType::Memory(_))
        );
        let plain = has_memory
            && sig("cabi_realloc").as_deref() == Some(REALLOC)
            && funcs.iter().all(|(f, want)| {
                sig(&format!("{export}#{f}")).as_deref() == Some(*want)
                    && sig(&format!("cabi_post_{export}#{f}")).is_none_or(|s| s == POST)
            });
        if !plain {
            return Ok(None);
        }
        let pre = Linker::new(engine)
            .instantiate_pre(&module)
            .map_err(|e| anyhow::anyhow!("{e:#}"))?;
        Ok(Some(Self {
            pre,
            kind,
            export: export.to_owned(),
        }))
    }

    pub fn instantiate(&self, store: &mut Store<T>) -> Result<DirectGuest> {
        let instance = self.pre.instantiate(&mut *store)?;
        let memory = instance
            .get_memory(&mut *store, "memory")
            .ok_or_else(|| Error::msg("no memory export"))?;
        let realloc = instance.get_typed_func(&mut *store, "cabi_realloc")?;
        let export = |store: &mut Store<T>, f: &str| -> Result<Export> {
            let name = format!("{}#{f}", self.export);
            Ok(Export {
                func: instance
                    .get_func(&mut *store, &name)
                    .ok_or_else(|| Error::msg(format!("no export {name}")))?,
                post: instance
                    .get_typed_func(&mut *store, &format!("cabi_post_{name}"))
                    .ok(),
            })
        };
        let init = export(store, "init")?.typed(store)?;
        let calls = match self.kind {
            PolicyKind::Selection => Calls::Selection {
                select: export(store, "select")?.typed(store)?,
            },
            PolicyKind::Eviction => Calls::Eviction {
                on_step: export(store, "on-step")?.typed(store)?,
                victims: export(store, "victims")?.typed(store)?,
            },
            PolicyKind::Prefetch => Calls::Prefetch {
                on_routed: export(store, "on-routed")?.typed(store)?,
            },
            PolicyKind::Placement => return Err(Error::msg("placement has no direct path")),
        };
        Ok(DirectGuest {
            _instance: instance,
            memory,
            realloc,
            init,
            calls,
            bytes: Vec::new(),
        })
    }
}

/// The single core module of `component`, instantiated once, its functions lifted with the
/// plain options (UTF-8, memory, realloc, post-return); `None` otherwise (several modules or
/// instances of them, UTF-16 strings, the async or GC ABI). (Nested components are fine: wit-component wraps each
/// exported interface in one that only re-exports lifted functions with their types.)
fn only_core_module(component: &[u8]) -> anyhow::Result<Option<&[u8]>> {
    use wasmparser::{CanonicalFunction, CanonicalOption, Instance, Parser, Payload};
    let (mut module, mut modules, mut instantiations) = (None, 0, 0);
    for payload in Parser::new(0).parse_all(component) {
        match payload? {
            Payload::ModuleSection {
                unchecked_range, ..
            } => {
                modules += 1;
                module = Some(&component[unchecked_range]);
            }
            Payload::InstanceSection(instances) => {
                for i in instances {
                    if matches!(i?, Instance::Instantiate { .. }) {
                        instantiations += 1;
                    }
                }
            }
            // Lifted with UTF-16 strings, the async ABI or the GC ABI: not what `direct`
            // implements.
            Payload::ComponentCanonicalSection(canon) => {
                for f in canon {
                    if let CanonicalFunction::Lift { options, .. } = f? {
                        let unusual = options.iter().any(|o| {
                            !matches!(
                                o,
                                CanonicalOption::UTF8
                                    | CanonicalOption::Memory(_)
                                    | CanonicalOption::Realloc(_)
                                    | CanonicalOption::PostReturn(_)
                            )
                        });
                        if unusual {
                            return Ok(None);
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(module.filter(|_| modules == 1 && instantiations == 1))
}

fn signature(f: &wasmtime::FuncType) -> String {
    let code = |t: ValType| match t {
        ValType::I32 => 'i',
        ValType::I64 => 'I',
        ValType::F32 => 'f',
        ValType::F64 => 'F',
        _ => '?',
    };
    let mut s: String = f.params().map(code).collect();
    s.push('>');
    s.extend(f.results().map(code));
    s
}

/// An export and its post-return, before its type is fixed.
struct Export {
    func: wasmtime::Func,
    post: Option<TypedFunc<i32, ()>>,
}

impl Export {
    fn typed<P: wasmtime::WasmParams, T>(self, store: &Store<T>) -> Result<Typed<P>> {
        Ok(Typed {
            func: self.func.typed(store)?,
            post: self.post,
        })
    }
}

struct Typed<P> {
    func: TypedFunc<P, i32>,
    post: Option<TypedFunc<i32, ()>>,
}

type InitParams = (i32, i32, i32, i64, i32, i32, i32, i32, i32, i32);
type OnStepParams = (i64, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32);

enum Calls {
    Selection {
        select: Typed<(i32, i32, i32, i32, i32, i32, i32)>,
    },
    Eviction {
        on_step: Typed<OnStepParams>,
        victims: Typed<(i32, i32, i32, i32, i32, i32)>,
    },
    Prefetch {
        on_routed: Typed<(i64, i32, i32, i32, i32, i32, i32)>,
    },
}

/// `init`'s arguments, already in the contract's flat encodings.
pub(super) struct InitFlat<'a> {
    pub moe_layers: u32,
    pub experts_per_layer: u32,
    pub top_k: u32,
    pub expert_bytes: u64,
    /// `(tier code, slots, bytes)` per tier.
    pub capacities: &'a [(u8, u32, u64)],
    pub resident_ids: &'a [u32],
    pub resident_tiers: &'a [u8],
}

/// What `init` answers, for every kind: name, description, and the kind's number
/// (`max-score-gap` for selection, `lookahead` for prefetch, nothing for eviction).
pub(super) struct InitAnswer {
    pub name: String,
    pub description: String,
    pub max_score_gap: f32,
    pub lookahead: u32,
}

/// A victim request in the contract's flat encoding.
pub(super) struct VictimsFlat<'a> {
    pub tier: u8,
    pub count: u32,
    pub excluded: &'a [u32],
    pub only_layer: Option<u32>,
}

/// One outlook layer of a routed step, residency as tier codes.
pub(super) struct OutlookFlat<'a> {
    pub layer: u32,
    pub scores: &'a [f32],
    pub residency: &'a [u8],
}

/// A live instance of a [`DirectModule`].
pub(super) struct DirectGuest {
    _instance: Instance,
    memory: Memory,
    realloc: TypedFunc<(i32, i32, i32, i32), i32>,
    init: Typed<InitParams>,
    calls: Calls,
    /// Scratch for lowering records.
    bytes: Vec<u8>,
}

/// A value with a fixed little-endian layout in guest memory.
trait Flat: Copy {
    const SIZE: usize;
    fn put(self, out: &mut [u8]);
}

impl Flat for u8 {
    const SIZE: usize = 1;
    fn put(self, out: &mut [u8]) {
        out[0] = self;
    }
}

impl Flat for u32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
}

impl Flat for f32 {
    const SIZE: usize = 4;
    fn put(self, out: &mut [u8]) {
        out.copy_from_slice(&self.to_le_bytes());
    }
}

fn bad(what: &str) -> Error {
    Error::msg(format!(
        "invalid canonical ABI value from the plugin: {what}"
    ))
}

/// `memory[at..at + len]`, checked.
fn slice(memory: &[u8], at: u32, len: usize) -> Result<&[u8]> {
    let at = at as usize;
    at.checked_add(len)
        .and_then(|end| memory.get(at..end))
        .ok_or_else(|| bad("pointer out of bounds"))
}

/// `at + offset`, a field of a result record: an error rather than a wrap past 4 GiB.
fn field(at: u32, offset: u32) -> Result<u32> {
    at.checked_add(offset)
        .ok_or_else(|| bad("pointer out of bounds"))
}

fn read_u32(memory: &[u8], at: u32) -> Result<u32> {
    Ok(u32::from_le_bytes(
        slice(memory, at, 4)?.try_into().unwrap(),
    ))
}

/// The `(pointer, length)` pair at `at`, as the byte range of `length` elements of `size`
/// bytes, aligned to `align`.
fn list_at(memory: &[u8], at: u32, size: usize, align: u32) -> Result<(u32, usize)> {
    if !at.is_multiple_of(4) {
        return Err(bad("misaligned result pointer"));
    }
    let (ptr, len) = (read_u32(memory, at)?, read_u32(memory, field(at, 4)?)?);
    if !ptr.is_multiple_of(align) {
        return Err(bad("misaligned list"));
    }
    let bytes = (len as usize)
        .checked_mul(size)
        .ok_or_else(|| bad("list too long"))?;
    slice(memory, ptr, bytes)?;
    Ok((ptr, len as usize))
}

fn string_at(memory: &[u8], at: u32) -> Result<String> {
    let (ptr, len) = list_at(memory, at, 1, 1)?;
    if len > MAX_TEXT {
        return Err(bad("string longer than 64 KiB"));
    }
    let s = std::str::from_utf8(slice(memory, ptr, len)?).map_err(|_| bad("string not UTF-8"))?;
    Ok(s.to_owned())
}

fn u32s_at(memory: &[u8], at: u32) -> Result<Vec<u32>> {
    let (ptr, len) = list_at(memory, at, 4, 4)?;
    Ok(slice(memory, ptr, len * 4)?
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
        .collect())
}

impl DirectGuest {
    pub fn kind(&self) -> PolicyKind {
        match self.calls {
            Calls::Selection { .. } => PolicyKind::Selection,
            Calls::Eviction { .. } => PolicyKind::Eviction,
            Calls::Prefetch { .. } => PolicyKind::Prefetch,
        }
    }

    /// Copies `items` into a fresh guest allocation (`cabi_realloc`, as the canonical ABI
    /// does; an empty list gets its alignment as the pointer, see `alloc`); returns the flat
    /// `(pointer, length)`.
    fn lower<T, V: Flat>(
        &mut self,
        store: &mut Store<T>,
        items: &[V],
        align: u32,
    ) -> Result<(i32, i32)> {
        let bytes = items.len() * V::SIZE;
        let ptr = self.alloc(store, bytes, align)?;
        let dst = &mut self.memory.data_mut(&mut *store)[ptr as usize..][..bytes];
        for (d, &v) in dst.chunks_exact_mut(V::SIZE).zip(items) {
            v.put(d);
        }
        Ok((ptr as i32, items.len() as i32))
    }

    /// Copies the record bytes in `self.bytes` into a fresh guest allocation.
    fn lower_bytes<T>(&mut self, store: &mut Store<T>, align: u32) -> Result<i32> {
        let ptr = self.alloc(store, self.bytes.len(), align)?;
        self.memory.data_mut(&mut *store)[ptr as usize..][..self.bytes.len()]
            .copy_from_slice(&self.bytes);
        Ok(ptr as i32)
    }

    fn alloc<T>(&mut self, store: &mut Store<T>, bytes: usize, align: u32) -> Result<u32> {
        if bytes == 0 {
            // An empty list is never read through its pointer, and `cabi_realloc(0, 0, align,
            // 0)` answers `align` in wit-bindgen's guests (and ours): pass that without the
            // call, which costs a guest entry (~60 ns) on most calls' `excluded` or `outlook`.
            return Ok(align);
        }
        let size = i32::try_from(bytes).map_err(|_| Error::msg("argument over 2 GiB"))?;
        let ptr = self.realloc.call(&mut *store, (0, 0, align as i32, size))? as u32;
        if !ptr.is_multiple_of(align) {
            return Err(bad("cabi_realloc returned a misaligned pointer"));
        }
        slice(self.memory.data(&*store), ptr, bytes)
            .map_err(|_| bad("cabi_realloc returned a pointer out of bounds"))?;
        Ok(ptr)
    }

    /// Calls `f`, lifts its results with `lift` (given guest memory and the result pointer),
    /// then runs its post-return.
    fn call<T, P: wasmtime::WasmParams, R>(
        store: &mut Store<T>,
        memory: Memory,
        f: &Typed<P>,
        params: P,
        lift: impl FnOnce(&[u8], u32) -> Result<R>,
    ) -> Result<R> {
        let ret = f.func.call(&mut *store, params)? as u32;
        let out = lift(memory.data(&*store), ret)?;
        if let Some(post) = &f.post {
            post.call(&mut *store, ret as i32)?;
        }
        Ok(out)
    }

    pub fn init<T>(&mut self, store: &mut Store<T>, a: &InitFlat<'_>) -> Result<InitAnswer> {
        // list<tier-capacity>: {tier: u8 @0, slots: u32 @4, bytes: u64 @8}, 16 bytes, align 8.
        self.bytes.clear();
        for &(tier, slots, bytes) in a.capacities {
            self.bytes.extend_from_slice(&[tier, 0, 0, 0]);
            self.bytes.extend_from_slice(&slots.to_le_bytes());
            self.bytes.extend_from_slice(&bytes.to_le_bytes());
        }
        let caps = self.lower_bytes(store, 8)?;
        let ids = self.lower(store, a.resident_ids, 4)?;
        let tiers = self.lower(store, a.resident_tiers, 1)?;
        let params = (
            a.moe_layers as i32,
            a.experts_per_layer as i32,
            a.top_k as i32,
            a.expert_bytes as i64,
            caps,
            a.capacities.len() as i32,
            ids.0,
            ids.1,
            tiers.0,
            tiers.1,
        );
        let kind = self.kind();
        // selection-info: policy-info @0 (name @0, description @8), max-score-gap f32 @16;
        // prefetch-info: policy-info @0, lookahead u32 @16; eviction: policy-info.
        Self::call(store, self.memory, &self.init, params, |m, at| {
            if !at.is_multiple_of(4) {
                return Err(bad("misaligned result pointer"));
            }
            let number = match kind {
                PolicyKind::Eviction | PolicyKind::Placement => 0,
                _ => read_u32(m, field(at, 16)?)?,
            };
            Ok(InitAnswer {
                name: string_at(m, at)?,
                description: string_at(m, field(at, 8)?)?,
                max_score_gap: f32::from_bits(number),
                lookahead: number,
            })
        })
    }

    pub fn select<T>(
        &mut self,
        store: &mut Store<T>,
        layer: u32,
        tokens: u32,
        k: u32,
        scores: &[f32],
        residency: &[u8],
    ) -> Result<Option<Vec<u32>>> {
        if !matches!(self.calls, Calls::Selection { .. }) {
            return Ok(None);
        }
        let s = self.lower(store, scores, 4)?;
        let r = self.lower(store, residency, 1)?;
        let Calls::Selection { select } = &self.calls else {
            unreachable!()
        };
        let params = (layer as i32, tokens as i32, k as i32, s.0, s.1, r.0, r.1);
        Self::call(store, self.memory, select, params, u32s_at).map(Some)
    }

    pub fn on_step<T>(
        &mut self,
        store: &mut Store<T>,
        step: u64,
        layer: u32,
        events: &[u32],
        request: Option<&VictimsFlat<'_>>,
    ) -> Result<Option<Vec<u32>>> {
        if !matches!(self.calls, Calls::Eviction { .. }) {
            return Ok(None);
        }
        let ev = self.lower(store, events, 4)?;
        let req = match request {
            Some(r) => Some(self.request(store, r)?),
            None => None,
        };
        let Calls::Eviction { on_step, .. } = &self.calls else {
            unreachable!()
        };
        let (d, [t, c, xp, xl, od, ov]) = match req {
            Some(r) => (1, r),
            None => (0, [0; 6]),
        };
        let params = (
            step as i64,
            layer as i32,
            ev.0,
            ev.1,
            d,
            t,
            c,
            xp,
            xl,
            od,
            ov,
        );
        Self::call(store, self.memory, on_step, params, u32s_at).map(Some)
    }

    pub fn victims<T>(
        &mut self,
        store: &mut Store<T>,
        request: &VictimsFlat<'_>,
    ) -> Result<Option<Vec<u32>>> {
        if !matches!(self.calls, Calls::Eviction { .. }) {
            return Ok(None);
        }
        let [t, c, xp, xl, od, ov] = self.request(store, request)?;
        let Calls::Eviction { victims, .. } = &self.calls else {
            unreachable!()
        };
        Self::call(store, self.memory, victims, (t, c, xp, xl, od, ov), u32s_at).map(Some)
    }

    /// victim-request flattened: tier, count, excluded (pointer, length), only-layer
    /// (discriminant, value).
    fn request<T>(&mut self, store: &mut Store<T>, r: &VictimsFlat<'_>) -> Result<[i32; 6]> {
        let x = self.lower(store, r.excluded, 4)?;
        let (od, ov) = match r.only_layer {
            Some(l) => (1, l as i32),
            None => (0, 0),
        };
        Ok([i32::from(r.tier), r.count as i32, x.0, x.1, od, ov])
    }

    /// Prefetch requests as `(expert-id, tier code, priority)`.
    pub fn on_routed<T>(
        &mut self,
        store: &mut Store<T>,
        step: u64,
        layer: u32,
        tokens: u32,
        experts: &[u32],
        outlook: &[OutlookFlat<'_>],
    ) -> Result<Option<Vec<(u32, u8, u32)>>> {
        if !matches!(self.calls, Calls::Prefetch { .. }) {
            return Ok(None);
        }
        let ex = self.lower(store, experts, 4)?;
        // list<layer-outlook>: {layer u32 @0, scores (ptr @4, len @8), residency (ptr @12,
        // len @16)}, 20 bytes, align 4. Allocated in the canonical ABI's order: the list, then
        // each element's lists.
        let ol = self.alloc(store, outlook.len() * 20, 4)?;
        let mut records = std::mem::take(&mut self.bytes);
        records.clear();
        for o in outlook {
            let s = self.lower(store, o.scores, 4)?;
            let r = self.lower(store, o.residency, 1)?;
            for v in [o.layer as i32, s.0, s.1, r.0, r.1] {
                records.extend_from_slice(&v.to_le_bytes());
            }
        }
        self.memory.data_mut(&mut *store)[ol as usize..][..records.len()].copy_from_slice(&records);
        self.bytes = records;
        let ol = ol as i32;
        let Calls::Prefetch { on_routed } = &self.calls else {
            unreachable!()
        };
        let params = (
            step as i64,
            layer as i32,
            tokens as i32,
            ex.0,
            ex.1,
            ol,
            outlook.len() as i32,
        );
        // list<prefetch-request>: {expert u32 @0, tier u8 @4, priority u32 @8}, 12 bytes.
        Self::call(store, self.memory, on_routed, params, |m, at| {
            let (ptr, len) = list_at(m, at, 12, 4)?;
            slice(m, ptr, len * 12)?
                .chunks_exact(12)
                .map(|r| {
                    let tier = r[4];
                    if tier > 2 {
                        return Err(bad("tier discriminant out of range"));
                    }
                    let word = |i: usize| u32::from_le_bytes(r[i..i + 4].try_into().unwrap());
                    Ok((word(0), tier, word(8)))
                })
                .collect()
        })
        .map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory with a `(pointer, length)` pair at 0 and `payload` at 16.
    fn memory(ptr: u32, len: u32, payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0u8; 16];
        m[..4].copy_from_slice(&ptr.to_le_bytes());
        m[4..8].copy_from_slice(&len.to_le_bytes());
        m.extend_from_slice(payload);
        m
    }

    #[test]
    fn lists_are_read_within_bounds_and_aligned() {
        let m = memory(16, 2, &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(u32s_at(&m, 0).unwrap(), vec![1, 2]);
        // One element past the end, a misaligned list, a misaligned or out-of-range result
        // pointer, and a length whose byte size overflows: errors, never a panic.
        assert!(u32s_at(&memory(16, 3, &[0; 8]), 0).is_err());
        assert!(u32s_at(&memory(17, 1, &[0; 8]), 0).is_err());
        assert!(u32s_at(&m, 2).is_err());
        assert!(u32s_at(&m, u32::MAX - 3).is_err());
        assert!(u32s_at(&memory(16, u32::MAX, &[0; 8]), 0).is_err());
    }

    #[test]
    fn strings_must_be_utf8_and_short() {
        assert_eq!(string_at(&memory(16, 3, b"lru"), 0).unwrap(), "lru");
        assert!(string_at(&memory(16, 2, &[0xff, 0xfe]), 0).is_err());
        let long = vec![b'a'; MAX_TEXT + 1];
        assert!(string_at(&memory(16, long.len() as u32, &long), 0).is_err());
    }

    #[test]
    fn only_plain_components_have_a_core_module_to_call() {
        let lru = crate::policy::PolicySource::parse("lru").bytes().unwrap();
        let core = only_core_module(&lru).unwrap().expect("one core module");
        assert!(wasmparser::Parser::is_core_wasm(core));
        // A core module is not a component.
        assert_eq!(only_core_module(core).unwrap(), None);
    }
}
