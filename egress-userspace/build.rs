//! Builds the eBPF object (egress-ebpf, for bpfel with the nightly toolchain and bpf-linker) and
//! leaves it in OUT_DIR for `include_bytes_aligned!`. `cargo xtask` installs the toolchain pieces.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let meta = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = meta
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "egress-ebpf")
        .ok_or_else(|| anyhow!("egress-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("egress-ebpf manifest has no parent"))?;
    println!("cargo:rerun-if-changed=../egress-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "egress-ebpf",
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
