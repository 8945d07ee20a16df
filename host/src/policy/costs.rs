//! The figures placement weighs: link, device and host speeds (`--link` presets).
//!
//! Owns: `LinkCosts` presets and the roofline times of the two ways to run a missing expert.
//! Does not own: the decision (the built-in `CostModel` in `builtin`, or a placement plugin).

use anyhow::{bail, Result};

use super::{LinkCosts, Tier};

/// `(name, description)` of each preset, the default first.
pub const PRESETS: &[(&str, &str)] = &[
    (
        "local",
        "no separate device: the device tier is dequantized weights in host RAM, so a fetch \
         costs what running from the storage format costs and placement keeps caching",
    ),
    (
        "h100-pcie5",
        "H100 SXM: PCIe Gen5 x16 54.8 GB/s (measured pinned host->device), HBM3 3.35 TB/s, \
         989 TFLOP/s bf16; host: 2-socket server CPU, 2 TFLOP/s, 300 GB/s DDR5",
    ),
    (
        "h100-pcie4",
        "the same H100 host behind PCIe Gen4 x16 (25 GB/s)",
    ),
    (
        "slow-link",
        "a 1 GB/s link with a 50 GFLOP/s, 10 GB/s host: fetching rarely pays (tests, what-ifs)",
    ),
];

impl LinkCosts {
    /// Preset `name` for a model with this hidden size and expert intermediate size.
    pub fn preset(name: &str, hidden: usize, intermediate: usize) -> Result<LinkCosts> {
        let flops_per_token = 6.0 * hidden as f64 * intermediate as f64;
        // The replay lab's H100 figures (link, HBM) are the one source for them.
        let h100 = crate::replay::cost::Link::default();
        let gpu = |link: f64| LinkCosts {
            link_bytes_per_second: link,
            link_latency_seconds: 10e-6,
            device_flops: 989e12,
            device_memory_bytes_per_second: h100.hbm_gbps * 1e9,
            host_flops: 2e12,
            host_memory_bytes_per_second: 300e9,
            flops_per_token,
            // bf16 activations.
            activation_bytes: (hidden * 2) as u32,
        };
        // A small CPU on both sides of a free link.
        let local = LinkCosts {
            link_bytes_per_second: f64::INFINITY,
            link_latency_seconds: 0.0,
            device_flops: 50e9,
            device_memory_bytes_per_second: 10e9,
            host_flops: 50e9,
            host_memory_bytes_per_second: 10e9,
            flops_per_token,
            activation_bytes: 0,
        };
        Ok(match name {
            "local" => local,
            "h100-pcie5" => gpu(h100.h2d_gbps * 1e9),
            "h100-pcie4" => gpu(25e9),
            "slow-link" => LinkCosts {
                link_bytes_per_second: 1e9,
                link_latency_seconds: 10e-6,
                activation_bytes: (hidden * 4) as u32,
                ..local
            },
            other => bail!(
                "no link preset named {other:?}; presets: {}",
                PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
            ),
        })
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
