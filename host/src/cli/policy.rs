//! `policy`: check, list and bench policy plugins.

use anyhow::Result;
use clap::Subcommand;

use moehost::policy::PolicySource;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Load, validate and smoke-test a plugin; print its world, version and name.
    Check {
        /// A .wasm component or a bundled policy name.
        plugin: String,
    },
    /// List the bundled policies.
    List,
    /// Cost of policy calls at Kimi-K2's shape, per call and per decoded token.
    Bench {
        #[arg(long, default_value = "topk")]
        selection: String,
        #[arg(long, default_value = "layer-cycle")]
        eviction: String,
        #[arg(long, default_value = "none")]
        prefetch: String,
        /// Decoded tokens to simulate (60 MoE layers each).
        #[arg(long, default_value_t = 200)]
        tokens: usize,
    },
}

pub fn run(command: PolicyCommand) -> Result<()> {
    match command {
        PolicyCommand::Check { plugin } => {
            let report = moehost::policy::check::check(&PolicySource::parse(&plugin))?;
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        PolicyCommand::Bench {
            selection,
            eviction,
            prefetch,
            tokens,
        } => {
            let r = moehost::policy::bench::run(&selection, &eviction, &prefetch, tokens.max(1))?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        PolicyCommand::List => {
            for name in moehost::policy::bundled::names() {
                let src = PolicySource::Bundled(name.to_owned());
                match moehost::policy::check::check(&src) {
                    Ok(r) => println!("{name:18} {:9} {}", r.kind.to_string(), r.description),
                    // Not a serving policy: maybe a pruning ranker (moehost convert).
                    Err(e) => match moehost::policy::wasm::PruningPlugin::load(
                        &src.bytes()?,
                        name,
                        Default::default(),
                    ) {
                        Ok(p) => println!("{name:18} {:9} {}", "pruning", p.description),
                        Err(_) => println!("{name:18} error: {e:#}"),
                    },
                }
            }
        }
    }
    Ok(())
}
