//! `openclaw-admin build`: cross-builds the agent for a board, the same way
//! as `scripts/build-arm.sh` (see docs/cross.md).
//!
//! The board profile gives the Rust target and the CPU; the build runs
//! Debian's toolchain (`RUSTC=/usr/bin/rustc /usr/bin/cargo`, installed by
//! `scripts/cross-toolchain.sh`) from the source tree, so that its
//! `.cargo/config.toml` supplies the linker, `+crt-static` and the qemu
//! runner:
//!
//! ```text
//! RUSTC=/usr/bin/rustc nice -n 5 /usr/bin/cargo build --target T --no-default-features \
//!     --features agent --bin openclaw-agent --profile dev|edge|release \
//!     [--config "target.T.rustflags=['-C','target-cpu=CPU']"]
//! ```
//!
//! `--release` picks `edge` (size) for a board's ARM target and `release`
//! (speed) for this PC's own architecture (the `sim` board, heavy nodes).
//! `--arch` builds a board for another architecture than its profile's, such
//! as `--board rpi3 --arch armv7` for a Pi 3 or Zero 2 W on a 32-bit OS.

use crate::boards::Board;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// What the toolchain script installs; every "missing" error points there.
pub const TOOLCHAIN_HINT: &str =
    "run scripts/cross-toolchain.sh (as root or with sudo; see docs/cross.md)";

/// Errors of [`build`].
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("board profile: {0}")]
    Board(#[from] crate::config::ConfigError),
    #[error("cross toolchain incomplete: {what}; {TOOLCHAIN_HINT}")]
    Toolchain { what: String },
    #[error("{0} does not look like the OpenClaw source tree (no Cargo.toml of package `openclaw`); pass --manifest-dir")]
    NotSource(PathBuf),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cargo failed ({status}); command: {command}")]
    Cargo { status: String, command: String },
    #[error("cargo finished but {0} is missing")]
    Missing(PathBuf),
    #[error("unknown --arch `{0}` (known: aarch64, armv7, x86_64)")]
    Arch(String),
}

/// The Rust target for an `--arch` value (Debian's names are accepted too).
pub fn target_for_arch(arch: &str) -> Option<&'static str> {
    match arch {
        "aarch64" | "arm64" => Some("aarch64-unknown-linux-gnu"),
        "armv7" | "armhf" => Some("armv7-unknown-linux-gnueabihf"),
        "x86_64" | "amd64" => Some("x86_64-unknown-linux-gnu"),
        _ => None,
    }
}

/// The cargo profile of a build for `target`: `dev` without `release`;
/// with it, `release` (opt-level 3) for this machine's own architecture,
/// where speed matters, and `edge` (opt-level z) for a board's.
pub fn profile_for(release: bool, target: &str) -> &'static str {
    if !release {
        "dev"
    } else if target.starts_with(std::env::consts::ARCH) {
        "release"
    } else {
        "edge"
    }
}

/// Options of a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Board profile name or file.
    pub board: String,
    /// An optimized build instead of `dev`: the `edge` profile (opt-level
    /// "z", fat LTO, stripped, unwinding kept) for a board's target,
    /// `release` (opt-level 3) for this machine's own ([`profile_for`]).
    pub release: bool,
    /// Build for this architecture instead of the profile's target
    /// ([`target_for_arch`]).
    pub arch: Option<String>,
    /// Cargo features of the agent build (`agent`, optionally `inference`).
    pub features: Vec<String>,
    /// The OpenClaw source tree (holds `Cargo.toml` and `.cargo/config.toml`).
    pub manifest_dir: PathBuf,
    /// Cargo's target dir for cross builds.
    pub target_dir: PathBuf,
    /// Cargo and rustc of the cross toolchain.
    pub cargo: PathBuf,
    pub rustc: PathBuf,
    /// `nice -n` level of the build; `None` runs cargo directly.
    pub nice: Option<i32>,
}

impl BuildOptions {
    /// Defaults: Debian's toolchain, `agent` only, dev profile, target dir
    /// [`default_target_dir`], niceness 5.
    pub fn new(board: &str, manifest_dir: &Path) -> BuildOptions {
        BuildOptions {
            board: board.to_string(),
            release: false,
            arch: None,
            features: vec!["agent".into()],
            manifest_dir: manifest_dir.to_path_buf(),
            target_dir: default_target_dir(),
            cargo: "/usr/bin/cargo".into(),
            rustc: "/usr/bin/rustc".into(),
            nice: Some(5),
        }
    }
}

/// `$OPENCLAW_CROSS_TARGET_DIR`, else `$HOME/.cache/openclaw/cross-target`.
///
/// `CARGO_TARGET_DIR` is deliberately not used: it usually names the host
/// build's target dir, which a running `cargo test` holds locked.
pub fn default_target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OPENCLAW_CROSS_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/tmp".into());
    PathBuf::from(home).join(".cache/openclaw/cross-target")
}

/// The source tree: the first of `start` and its ancestors with the
/// `openclaw` package's Cargo.toml.
pub fn find_source(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| is_source(d))
        .map(Path::to_path_buf)
}

fn is_source(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .map(|t| t.lines().any(|l| l.trim() == "name = \"openclaw\""))
        .unwrap_or(false)
}

/// The result of a build.
#[derive(Debug, Clone)]
pub struct BuildOutput {
    pub board: String,
    pub target: String,
    pub cpu: String,
    pub profile: &'static str,
    pub binary: PathBuf,
    /// Bytes of the binary.
    pub size: u64,
    /// The command that was run, shell-quoted (without environment).
    pub command: String,
    pub elapsed: Duration,
}

/// The C cross linker `.cargo/config.toml` names for `target`, if any.
pub fn linker_for(target: &str) -> Option<&'static str> {
    if target.starts_with("aarch64-") {
        Some("aarch64-linux-gnu-gcc")
    } else if target.starts_with("armv7-") || target.starts_with("arm-") {
        Some("arm-linux-gnueabihf-gcc")
    } else {
        None
    }
}

/// The qemu-user program that runs binaries of `target`, if it needs one.
pub fn qemu_for(target: &str) -> Option<&'static str> {
    if target.starts_with("aarch64-") {
        Some("qemu-aarch64-static")
    } else if target.starts_with("armv7-") || target.starts_with("arm-") {
        Some("qemu-arm-static")
    } else {
        None
    }
}

/// Finds `program` (a path, or a name on `PATH`).
pub fn which(program: &str) -> Option<PathBuf> {
    let p = Path::new(program);
    if program.contains('/') {
        return p.is_file().then(|| p.to_path_buf());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|c| c.is_file())
}

/// Checks that `cargo`, `rustc`, the target's std, its linker and (with
/// `need_qemu`) its qemu runner are installed. Errors say what is missing
/// and to run `scripts/cross-toolchain.sh`.
pub fn check_toolchain(
    cargo: &Path,
    rustc: &Path,
    target: &str,
    need_qemu: bool,
) -> Result<(), BuildError> {
    let missing = |what: String| Err(BuildError::Toolchain { what });
    for tool in [cargo, rustc] {
        if !tool.is_file() {
            return missing(format!("{} not found", tool.display()));
        }
    }
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .map_err(|source| BuildError::Spawn {
            program: rustc.display().to_string(),
            source,
        })?;
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let std_dir = Path::new(&sysroot)
        .join("lib/rustlib")
        .join(target)
        .join("lib");
    if !out.status.success() || !std_dir.is_dir() {
        return missing(format!("no Rust std for {target} in {}", std_dir.display()));
    }
    if let Some(linker) = linker_for(target) {
        if which(linker).is_none() {
            return missing(format!("{linker} not found on PATH"));
        }
    }
    if need_qemu {
        if let Some(q) = qemu_for(target) {
            if which(q).is_none() {
                return missing(format!("{q} not found on PATH"));
            }
        }
    }
    Ok(())
}

/// Quotes `s` for a POSIX shell when it needs it.
pub fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The cargo arguments for `board` (after `cargo`).
pub fn cargo_args(opts: &BuildOptions, board: &Board) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "build".into(),
        "--target".into(),
        board.target.clone(),
        "--no-default-features".into(),
        "--features".into(),
        opts.features.join(","),
        "--bin".into(),
        "openclaw-agent".into(),
        "--profile".into(),
        profile_for(opts.release, &board.target).into(),
    ];
    if board.cpu != "generic" {
        // Appended to the target's rustflags from .cargo/config.toml.
        args.push("--config".into());
        args.push(format!(
            "target.{}.rustflags=['-C','target-cpu={}']",
            board.target, board.cpu
        ));
    }
    args
}

/// The board profile of `opts`, with its target replaced by `opts.arch`'s.
pub fn load_board(opts: &BuildOptions) -> Result<Board, BuildError> {
    let mut board = Board::load(&opts.board)?;
    if let Some(arch) = &opts.arch {
        board.target = target_for_arch(arch)
            .ok_or_else(|| BuildError::Arch(arch.clone()))?
            .to_string();
    }
    Ok(board)
}

/// Builds the agent for `opts.board`; cargo's progress goes to stderr.
pub fn build(opts: &BuildOptions) -> Result<BuildOutput, BuildError> {
    let board = load_board(opts)?;
    if !is_source(&opts.manifest_dir) {
        return Err(BuildError::NotSource(opts.manifest_dir.clone()));
    }
    check_toolchain(&opts.cargo, &opts.rustc, &board.target, false)?;
    let args = cargo_args(opts, &board);
    let mut cmd = match opts.nice {
        Some(n) => {
            let mut c = Command::new("nice");
            c.arg("-n").arg(n.to_string()).arg(&opts.cargo);
            c
        }
        None => Command::new(&opts.cargo),
    };
    cmd.args(&args)
        .current_dir(&opts.manifest_dir)
        .env("RUSTC", &opts.rustc)
        .env("CARGO_TARGET_DIR", &opts.target_dir);
    // Flags from the environment would replace .cargo/config.toml's
    // (+crt-static); wrappers and a build target set by an outer cargo
    // (e.g. when called from `cargo test`) do not belong to this build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_TARGET",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_MAKEFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let command = std::iter::once(opts.cargo.display().to_string())
        .chain(args.iter().cloned())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ");
    let start = Instant::now();
    let status = cmd.status().map_err(|source| BuildError::Spawn {
        program: opts.cargo.display().to_string(),
        source,
    })?;
    let elapsed = start.elapsed();
    if !status.success() {
        return Err(BuildError::Cargo {
            status: status.to_string(),
            command: format!(
                "RUSTC={} CARGO_TARGET_DIR={} {command}",
                opts.rustc.display(),
                opts.target_dir.display()
            ),
        });
    }
    let profile = profile_for(opts.release, &board.target);
    let binary = opts
        .target_dir
        .join(&board.target)
        .join(if profile == "dev" { "debug" } else { profile })
        .join("openclaw-agent");
    let size = std::fs::metadata(&binary)
        .map_err(|_| BuildError::Missing(binary.clone()))?
        .len();
    Ok(BuildOutput {
        board: board.name,
        target: board.target,
        cpu: board.cpu,
        profile,
        binary,
        size,
        command,
        elapsed,
    })
}

/// The ELF machine of a binary: `x86_64`, `aarch64`, `arm`, another
/// `e_machine` number, or `None` when it is not ELF.
pub fn elf_machine(bytes: &[u8]) -> Option<String> {
    if bytes.len() < 20 || &bytes[..4] != b"\x7fELF" {
        return None;
    }
    let m = if bytes[5] == 2 {
        u16::from_be_bytes([bytes[18], bytes[19]])
    } else {
        u16::from_le_bytes([bytes[18], bytes[19]])
    };
    Some(
        match m {
            62 => "x86_64",
            183 => "aarch64",
            40 => "arm",
            3 => "x86",
            243 => "riscv",
            other => return Some(format!("e_machine {other}")),
        }
        .to_string(),
    )
}

/// The ELF machine a Rust target triple produces.
pub fn target_machine(target: &str) -> String {
    let arch = target.split('-').next().unwrap_or(target);
    match arch {
        a if a.starts_with("armv") || a == "arm" => "arm".into(),
        a if a.starts_with("riscv") => "riscv".into(),
        "i686" | "i586" => "x86".into(),
        a => a.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cargo_args_follow_the_board() {
        let mut o = BuildOptions::new("rpi4", Path::new("."));
        let b = Board::load("rpi4").unwrap();
        let a = cargo_args(&o, &b).join(" ");
        assert!(a.contains("--target aarch64-unknown-linux-gnu"), "{a}");
        assert!(a.contains("--no-default-features --features agent "), "{a}");
        assert!(a.contains("--profile dev"), "{a}");
        assert!(
            a.ends_with("--config target.aarch64-unknown-linux-gnu.rustflags=['-C','target-cpu=cortex-a72']"),
            "{a}"
        );
        o.release = true;
        let g = Board::load("generic-aarch64").unwrap();
        let a = cargo_args(&o, &g).join(" ");
        assert!(
            a.contains("--profile edge") && !a.contains("target-cpu"),
            "{a}"
        );
    }

    #[test]
    fn release_is_edge_for_boards_and_speed_for_this_pc() {
        assert_eq!(profile_for(false, "aarch64-unknown-linux-gnu"), "dev");
        let host = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        assert_eq!(profile_for(true, &host), "release");
        let other = if std::env::consts::ARCH == "aarch64" {
            "armv7-unknown-linux-gnueabihf"
        } else {
            "aarch64-unknown-linux-gnu"
        };
        assert_eq!(profile_for(true, other), "edge");
        let mut o = BuildOptions::new("sim", Path::new("."));
        o.release = true;
        let b = load_board(&o).unwrap();
        assert!(cargo_args(&o, &b).join(" ").contains("--profile release"));
    }

    #[test]
    fn arch_replaces_the_board_target() {
        let mut o = BuildOptions::new("rpi3", Path::new("."));
        o.arch = Some("armv7".into());
        let b = load_board(&o).unwrap();
        assert_eq!(b.target, "armv7-unknown-linux-gnueabihf");
        let a = cargo_args(&o, &b).join(" ");
        assert!(a.contains("--target armv7-unknown-linux-gnueabihf"), "{a}");
        assert!(a.contains("target-cpu=cortex-a53"), "{a}");
        o.arch = Some("mips".into());
        let e = load_board(&o).unwrap_err().to_string();
        assert!(e.contains("unknown --arch `mips`"), "{e}");
    }

    #[test]
    fn missing_toolchain_says_what_to_run() {
        let e = check_toolchain(
            Path::new("/nonexistent/cargo"),
            Path::new("/nonexistent/rustc"),
            "aarch64-unknown-linux-gnu",
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/cargo not found"), "{e}");
        assert!(e.contains("scripts/cross-toolchain.sh"), "{e}");
    }

    #[test]
    fn elf_machines() {
        let mut h = vec![0u8; 20];
        h[..4].copy_from_slice(b"\x7fELF");
        h[5] = 1;
        h[18] = 183;
        assert_eq!(elf_machine(&h).as_deref(), Some("aarch64"));
        h[18] = 62;
        assert_eq!(elf_machine(&h).as_deref(), Some("x86_64"));
        assert_eq!(elf_machine(b"#!/bin/sh\n"), None);
        assert_eq!(target_machine("aarch64-unknown-linux-gnu"), "aarch64");
        assert_eq!(target_machine("armv7-unknown-linux-gnueabihf"), "arm");
        assert_eq!(target_machine("x86_64-unknown-linux-gnu"), "x86_64");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/opt/openclaw"), "/opt/openclaw");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
