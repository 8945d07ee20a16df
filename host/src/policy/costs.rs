//! The figures placement weighs: link, device and host speeds (`--link` presets).
//!
//! Owns: `LinkCosts` from a machine's figures (`crate::hardware`) and the roofline times of the two ways to run a missing expert.
//! Does not own: the decision (the built-in `CostModel` in `builtin`, or a placement plugin).

use anyhow::Result;

use crate::hardware::Machine;

use super::{LinkCosts, Tier};

impl LinkCosts {
    /// Preset `name` (`crate::hardware`) for a model with this hidden size and expert
    /// intermediate size.
    pub fn preset(name: &str, hidden: usize, intermediate: usize) -> Result<LinkCosts> {
        Ok(Self::of(
            crate::hardware::preset(name)?,
            hidden,
            intermediate,
        ))
    }

    /// What placement weighs on machine `m` for a model with this hidden size and expert
    /// intermediate size.
    pub fn of(m: &Machine, hidden: usize, intermediate: usize) -> LinkCosts {
        LinkCosts {
            link_bytes_per_second: m.link_bytes_per_second,
            link_latency_seconds: m.link_latency_seconds,
            device_flops: m.device_flops,
            device_memory_bytes_per_second: m.device_memory_bytes_per_second,
            host_flops: m.host_flops,
            host_memory_bytes_per_second: m.host_memory_bytes_per_second,
            flops_per_token: 6.0 * hidden as f64 * intermediate as f64,
            activation_bytes: hidden as u32 * m.activation_bytes_per_value,
        }
    }

    /// Seconds to copy an expert of `bytes` to the device and run `tokens` through it there.
    pub fn fetch_seconds(&self, tokens: u32, bytes: u64) -> f64 {
        self.link_latency_seconds
            + bytes as f64 / self.link_bytes_per_second
            + roofline(
                tokens,
                bytes,
                self.flops_per_token,
                self.device_flops,
                self.device_memory_bytes_per_second,
            )
    }

    /// Seconds to run `tokens` through an expert of `bytes` where it lives (`tier`), moving the
    /// activations there and back. Disk experts are read either way, so neither pays for it.
    pub fn host_seconds(&self, tokens: u32, bytes: u64, _tier: Tier) -> f64 {
        let activations = 2.0 * f64::from(tokens) * f64::from(self.activation_bytes);
        let copies = if self.activation_bytes > 0 && tokens > 0 {
            self.link_latency_seconds + activations / self.link_bytes_per_second
        } else {
            0.0
        };
        copies
            + roofline(
                tokens,
                bytes,
                self.flops_per_token,
                self.host_flops,
                self.host_memory_bytes_per_second,
            )
    }
}

/// Time of `tokens` through one expert: bound by arithmetic or by reading its weights once.
fn roofline(tokens: u32, bytes: u64, flops_per_token: f64, flops: f64, bytes_per_s: f64) -> f64 {
    (f64::from(tokens) * flops_per_token / flops).max(bytes as f64 / bytes_per_s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kimi-K2's routed expert: hidden 7168, intermediate 2048, FP8 with block scales.
    fn k2(name: &str) -> LinkCosts {
        LinkCosts::preset(name, 7168, 2048).unwrap()
    }
    const K2_BYTES: u64 = 44_050_944;

    #[test]
    fn one_token_runs_on_the_host_over_pcie_and_a_crowd_is_fetched() {
        let c = k2("h100-pcie5");
        assert!(c.host_seconds(1, K2_BYTES, Tier::Host) < c.fetch_seconds(1, K2_BYTES));
        assert!(c.host_seconds(64, K2_BYTES, Tier::Host) > c.fetch_seconds(64, K2_BYTES));
        // A slower link moves the crossover up.
        let crossover = |c: &LinkCosts| {
            (1..1000)
                .find(|&t| c.host_seconds(t, K2_BYTES, Tier::Host) > c.fetch_seconds(t, K2_BYTES))
                .unwrap()
        };
        assert!(crossover(&k2("h100-pcie4")) > crossover(&c));
    }

    #[test]
    fn local_fetches_are_never_dearer() {
        let c = k2("local");
        for t in [0, 1, 8, 512] {
            assert!(c.fetch_seconds(t, K2_BYTES) <= c.host_seconds(t, K2_BYTES, Tier::Host));
        }
    }

    #[test]
    fn unknown_preset_names_the_presets() {
        let e = LinkCosts::preset("pcie9", 1, 1).unwrap_err().to_string();
        assert!(e.contains("pcie9") && e.contains("h100-pcie5"), "{e}");
    }
}
