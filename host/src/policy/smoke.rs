//! Smoke tests: a freshly loaded plugin is initialised and exercised with a few representative
//! calls before it serves anything (hot swap, `moehost policy check`). Any failure or invalid
//! answer rejects it.

use super::*;

fn expert(layer: u32, expert: u32) -> ExpertKey {
    ExpertKey { layer, expert }
}

/// Scores that are all distinct, the same for every run.
fn scores(e: usize, salt: usize) -> Vec<f32> {
    (0..e)
        .map(|i| (((i + salt) * 7919) % e) as f32 / e as f32)
        .collect()
}

fn rejected(kind: PolicyKind, stats: &PolicyStats) -> anyhow::Error {
    anyhow::anyhow!(
        "{kind} policy failed its smoke test (timeouts {}, out of memory {}, traps {}, invalid answers {}){}",
        stats.timeouts,
        stats.out_of_memory,
        stats.traps,
        stats.invalid_answers,
        stats
            .last_error
            .as_ref()
            .map(|e| format!("; last failure: {e}"))
            .unwrap_or_default()
    )
}

pub fn selection(g: &mut GuardedSelection, args: &InitArgs) -> anyhow::Result<SelectionInfo> {
    g.set_quiet(true);
    let info = g
        .init(args)
        .map_err(|e| anyhow::anyhow!("selection policy init failed: {e}"))?;
    let s = args.shape;
    let e = s.experts_per_layer as usize;
    for step in 0..3usize {
        for layer in 0..s.moe_layers.min(3) {
            let tokens = 1 + step as u32;
            let sc: Vec<f32> = (0..tokens as usize)
                .flat_map(|t| scores(e, t + step))
                .collect();
            let residency: Vec<Tier> = (0..e)
                .map(|i| if i % 3 == 0 { Tier::Device } else { Tier::Disk })
                .collect();
            g.select(layer, tokens, s.top_k, &sc, &residency, &|| args.clone());
        }
    }
    g.set_quiet(false);
    if g.stats().fallbacks > 0 {
        return Err(rejected(PolicyKind::Selection, g.stats()));
    }
    Ok(info)
}

pub fn eviction(g: &mut GuardedEviction, args: &InitArgs) -> anyhow::Result<PolicyInfo> {
    g.set_quiet(true);
    let info = g
        .init(args)
        .map_err(|e| anyhow::anyhow!("eviction policy init failed: {e}"))?;
    // A consistent little device tier, starting from the given residency: each step's
    // accesses, a victim request when its misses need room, then the misses' inserts and the
    // victims' removes in the next call's events (as the store reports them).
    let s = args.shape;
    let k = s.top_k;
    let mut resident: Vec<ExpertKey> = args
        .resident
        .iter()
        .filter(|(_, t)| *t == Tier::Device)
        .map(|(e, _)| *e)
        .collect();
    let slots = resident.len().max(k as usize * 2);
    let mut events = Vec::new();
    for step in 0..3u64 {
        for layer in 0..s.moe_layers.min(3) {
            let used: Vec<ExpertKey> = (0..k)
                .map(|i| expert(layer, (i * 3 + step as u32) % s.experts_per_layer))
                .collect();
            let mut unique = used.clone();
            unique.sort_unstable();
            unique.dedup();
            events.extend(unique.iter().map(|&e| Event {
                kind: EventKind::Access,
                tier: Tier::Device,
                expert: e,
            }));
            let misses: Vec<ExpertKey> = unique
                .iter()
                .filter(|e| !resident.contains(e))
                .copied()
                .collect();
            let excluded: Vec<ExpertKey> = unique
                .iter()
                .filter(|e| resident.contains(e))
                .copied()
                .collect();
            let candidates = CandidateList(
                resident
                    .iter()
                    .filter(|e| !excluded.contains(e))
                    .copied()
                    .collect(),
            );
            let need = (resident.len() + misses.len()).saturating_sub(slots);
            let count = need.min(candidates.0.len()) as u32;
            let request = (count > 0).then_some(VictimRequest {
                tier: Tier::Device,
                count,
                only_layer: None,
                excluded: &excluded,
                candidates: &candidates,
            });
            let victims = g.on_step(
                &StepFacts {
                    step,
                    layer,
                    events: std::mem::take(&mut events),
                },
                request.as_ref(),
                &|| args.clone(),
            );
            for v in &victims {
                resident.retain(|r| r != v);
                events.push(Event {
                    kind: EventKind::Remove,
                    tier: Tier::Device,
                    expert: *v,
                });
            }
            for m in misses.iter().take(slots.saturating_sub(resident.len())) {
                resident.push(*m);
                events.push(Event {
                    kind: EventKind::Insert,
                    tier: Tier::Device,
                    expert: *m,
                });
            }
        }
    }
    // A further request within the same step.
    let none: Vec<ExpertKey> = Vec::new();
    let candidates = CandidateList(resident.clone());
    if !resident.is_empty() {
        g.victims(
            &VictimRequest {
                tier: Tier::Device,
                count: 1,
                only_layer: None,
                excluded: &none,
                candidates: &candidates,
            },
            &|| args.clone(),
        );
    }
    g.set_quiet(false);
    if g.stats().fallbacks > 0 {
        return Err(rejected(PolicyKind::Eviction, g.stats()));
    }
    Ok(info)
}

pub fn prefetch(g: &mut GuardedPrefetch, args: &InitArgs) -> anyhow::Result<PrefetchInfo> {
    g.set_quiet(true);
    let info = g
        .init(args)
        .map_err(|e| anyhow::anyhow!("prefetch policy init failed: {e}"))?;
    let s = args.shape;
    let e = s.experts_per_layer as usize;
    for step in 0..3u64 {
        for layer in 0..s.moe_layers.min(3) {
            let outlook = (1..=g.lookahead())
                .filter(|d| layer + d < s.moe_layers)
                .map(|d| Outlook {
                    layer: layer + d,
                    scores: scores(e, d as usize),
                    residency: vec![Tier::Disk; e],
                })
                .collect();
            let step = RoutedStep {
                step,
                layer,
                tokens: 1,
                experts: (0..s.top_k.min(s.experts_per_layer)).collect(),
                outlook,
            };
            g.on_routed(&step, &|| args.clone());
        }
    }
    g.set_quiet(false);
    if g.stats().fallbacks > 0 {
        return Err(rejected(PolicyKind::Prefetch, g.stats()));
    }
    Ok(info)
}

pub fn placement(g: &mut GuardedPlacement, args: &InitArgs) -> anyhow::Result<PolicyInfo> {
    g.set_quiet(true);
    let info = g
        .init(args)
        .map_err(|e| anyhow::anyhow!("placement policy init failed: {e}"))?;
    let s = args.shape;
    // Kimi-K2's expert; the figures only need to be plausible.
    let costs = LinkCosts::preset("h100-pcie5", 7168, 2048).expect("preset exists");
    for layer in 0..s.moe_layers.min(3) {
        for n in [1u32, s.top_k, 3 * s.top_k] {
            let n = n.min(s.experts_per_layer);
            let experts: Vec<ExpertKey> = (0..n).map(|e| expert(layer, e)).collect();
            let tokens: Vec<u32> = (0..n).map(|e| 1 + e % 5).collect();
            let tiers: Vec<Tier> = (0..n)
                .map(|e| if e % 2 == 0 { Tier::Host } else { Tier::Disk })
                .collect();
            let request = PlacementRequest {
                layer,
                experts: &experts,
                tokens: &tokens,
                tiers: &tiers,
                free_device_slots: layer,
                expert_bytes: s.expert_bytes,
                costs,
            };
            g.place(&request, &|| args.clone());
        }
    }
    g.set_quiet(false);
    if g.stats().fallbacks > 0 {
        return Err(rejected(PolicyKind::Placement, g.stats()));
    }
    Ok(info)
}
