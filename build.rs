//! Tells the crate the target triple it is built for: an over-the-air
//! update names the triple of its binary, and an agent refuses one built
//! for another (`agent::ota`).
fn main() {
    println!(
        "cargo:rustc-env=OPENCLAW_TARGET={}",
        std::env::var("TARGET").expect("cargo sets TARGET for build scripts")
    );
    println!("cargo:rerun-if-changed=build.rs");
}
