//! Builds the policy guests in `plugins/` (their own workspace) for wasm32-wasip2 and
//! generates `bundled_plugins.rs`: `(name, bytes)` for each, embedded as moehost's defaults.
//! The test guests of `plugins/fixtures/` (misbehaving on purpose) are not embedded: they are
//! copied to `$OUT_DIR/test-plugins/<dir>.wasm`, which tests find through the compile-time
//! variable `MOEHOST_TEST_PLUGINS`.
//! It also checks that each checked-in PTX was compiled from its CUDA source as it is now
//! (`gpu/ptx.sh` stamps the sources' digest into the PTX): the `cuda` feature will not build
//! on a stale PTX.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The outer build's settings (clippy's wrapper, host rustflags) must not leak into guests.
const OUTER_BUILD_VARS: [&str; 8] = [
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_MAKEFLAGS",
    "CARGO_PRIMARY_PACKAGE",
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    check_ptx(&manifest_dir.join("src/gpu"));
    let plugins = manifest_dir.join("../plugins");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    // Sources only: plugins/target (the guests' own builds) must not make the host stale.
    watch_sources(&plugins);
    println!(
        "cargo:rerun-if-changed={}",
        manifest_dir.join("../wit").display()
    );

    let target_dir = out_dir.join("plugins-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.args([
        "build",
        "--release",
        "--target",
        "wasm32-wasip2",
        "--manifest-path",
    ])
    .arg(plugins.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir);
    for var in OUTER_BUILD_VARS {
        cmd.env_remove(var);
    }
    // From plugins/, so its .cargo/config.toml (guest target features) applies.
    cmd.current_dir(&plugins);
    let status = cmd.status().expect("cannot run cargo to build plugins/");
    assert!(
        status.success(),
        "building plugins/ for wasm32-wasip2 failed (is the target installed? `rustup target add wasm32-wasip2`)"
    );

    let wasm_dir = target_dir.join("wasm32-wasip2/release");
    let test_plugins = out_dir.join("test-plugins");
    std::fs::create_dir_all(&test_plugins).unwrap();
    println!(
        "cargo:rustc-env=MOEHOST_TEST_PLUGINS={}",
        test_plugins.display()
    );
    let mut entries = Vec::new();
    for (member, stem) in members(&plugins, &cargo) {
        let wasm = wasm_dir.join(format!("{stem}.wasm"));
        assert!(
            wasm.exists(),
            "plugin {member} did not produce {}",
            wasm.display()
        );
        let dir_name = Path::new(&member)
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if member.starts_with("fixtures/") {
            std::fs::copy(&wasm, test_plugins.join(format!("{dir_name}.wasm"))).unwrap();
            continue;
        }
        entries.push(format!(
            "    ({dir_name:?}, include_bytes!({:?})),",
            wasm.display().to_string()
        ));
    }
    let code = format!(
        "/// Bundled policy plugins: (name, component bytes).\npub static BUNDLED: &[(&str, &[u8])] = &[\n{}\n];\n",
        entries.join("\n")
    );
    std::fs::write(out_dir.join("bundled_plugins.rs"), code).unwrap();
}

/// `(member folder under plugins/, wasm file stem)` of each guest crate (a cdylib target) of the
/// plugins workspace, as `cargo metadata` lists them (in the workspace's member order).
fn members(plugins: &Path, cargo: &str) -> Vec<(String, String)> {
    let mut cmd = Command::new(cargo);
    cmd.args([
        "metadata",
        "--no-deps",
        "--offline",
        "--format-version",
        "1",
    ])
    .arg("--manifest-path")
    .arg(plugins.join("Cargo.toml"));
    for var in OUTER_BUILD_VARS {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("cannot run cargo metadata on plugins/");
    assert!(
        out.status.success(),
        "cargo metadata on plugins/ failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let root = plugins.canonicalize().unwrap();
    let mut found = Vec::new();
    for package in meta["packages"].as_array().expect("packages") {
        let manifest = Path::new(package["manifest_path"].as_str().expect("manifest_path"));
        let member = manifest
            .parent()
            .and_then(|d| d.strip_prefix(&root).ok())
            .expect("a member under plugins/")
            .to_string_lossy()
            .into_owned();
        for target in package["targets"].as_array().expect("targets") {
            let cdylib = target["kind"]
                .as_array()
                .is_some_and(|k| k.iter().any(|k| k == "cdylib"));
            if cdylib {
                let stem = target["name"]
                    .as_str()
                    .expect("target name")
                    .replace('-', "_");
                found.push((member.clone(), stem));
            }
        }
    }
    found
}

/// `rerun-if-changed` for every manifest and source under `dir`, skipping build output.
fn watch_sources(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != "tools" && !name.to_string_lossy().starts_with('.') {
                watch_sources(&path);
            }
        } else if path
            .extension()
            .is_some_and(|e| e == "rs" || e == "toml" || e == "lock" || e == "wit")
        {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}

/// The digest `gpu/ptx.sh` stamps into a PTX: FNV-1a (64-bit) over the CUDA source and the
/// local headers it includes, in include order.
fn cuda_digest(gpu: &Path, cu: &str) -> String {
    let source = std::fs::read_to_string(gpu.join(cu)).unwrap();
    let mut bytes = source.clone().into_bytes();
    for line in source.lines() {
        if let Some(h) = line
            .strip_prefix("#include \"")
            .and_then(|l| l.strip_suffix('"'))
        {
            println!("cargo:rerun-if-changed={}", gpu.join(h).display());
            bytes.extend(std::fs::read(gpu.join(h)).unwrap());
        }
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Fails a `cuda` build whose checked-in PTX does not carry its source's digest.
fn check_ptx(gpu: &Path) {
    for name in ["rows_dot", "mla"] {
        let (cu, ptx) = (format!("{name}.cu"), format!("{name}.ptx"));
        println!("cargo:rerun-if-changed={}", gpu.join(&cu).display());
        println!("cargo:rerun-if-changed={}", gpu.join(&ptx).display());
        let want = cuda_digest(gpu, &cu);
        let text = std::fs::read_to_string(gpu.join(&ptx)).unwrap();
        let stamped = text
            .lines()
            .find_map(|l| l.strip_prefix("// moehost-source-digest: "))
            .unwrap_or("none");
        if stamped != want && std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
            panic!(
                "src/gpu/{ptx} is stale: it was compiled from a {cu} with digest {stamped}, \
                 the source's digest is now {want}; regenerate it with src/gpu/ptx.sh"
            );
        }
    }
}
