//! Where the binaries the tests run are. `egress` belongs to another package, so cargo neither
//! builds it for these tests nor says where it is: like aya's integration tests, the harness
//! looks next to the running executable, in the same `target/<profile>/` directory.
//! `cargo xtask test` builds both packages' binaries before it runs the kernel and end-to-end
//! tiers.

use std::path::PathBuf;

/// The `egress` controller (package `egress-userspace`).
pub fn egress() -> PathBuf {
    find("egress")
}

/// The `egress-probe` diagnostic client (this package).
pub fn probe() -> PathBuf {
    find("egress-probe")
}

/// `target/<profile>/<name>`, for a test executable (in `target/<profile>/deps/`) or a binary
/// (in `target/<profile>/`). Panics, saying how to build it, when it is missing.
pub fn find(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the path of the running executable");
    let mut dir = exe
        .parent()
        .expect("the running executable is in a directory")
        .to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build it first: cargo xtask test (it runs `cargo build -p egress-userspace -p egress-tests --bins` before the kernel and end-to-end tests)",
        path.display()
    );
    path
}
