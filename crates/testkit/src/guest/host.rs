//! Finding the pieces on the host: the cache directory, QEMU, a static
//! busybox, the kernel package and the static `blkmesh-guest-check`.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::{io_err, GuestError};

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "BLKMESH_GUEST_CACHE";

/// The cache directory when [`CACHE_ENV`] is not set; `scripts/deps.sh`
/// downloads the kernel package here (outside the repository: it is about
/// 27 MB and machine-specific).
pub const DEFAULT_CACHE: &str = "/var/cache/blkmesh-guest";

/// Environment variable naming a prebuilt, statically linked
/// `blkmesh-guest-check` to use instead of building one.
pub const CHECK_BIN_ENV: &str = "BLKMESH_GUEST_CHECK_BIN";

/// How to install what is missing.
pub const INSTALL_HINT: &str = "sudo bash scripts/deps.sh";

/// The rust target the static guest binary is built for; a separate
/// target directory, so the static build does not invalidate the normal one.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The cache directory: `$BLKMESH_GUEST_CACHE`, else [`DEFAULT_CACHE`].
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

pub(super) fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

pub(super) fn qemu_binary() -> Result<PathBuf, GuestError> {
    which("qemu-system-x86_64").ok_or_else(|| GuestError::Missing {
        what: "qemu-system-x86_64".into(),
        install: format!("{INSTALL_HINT} (apt-get install -t bookworm-backports qemu-system-x86)"),
    })
}

pub(super) fn static_busybox() -> Result<PathBuf, GuestError> {
    let missing = |what: String| GuestError::Missing {
        what,
        install: format!("{INSTALL_HINT} (apt-get install busybox-static)"),
    };
    let path = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| missing("busybox".into()))?;
    match is_static_elf(&path) {
        Ok(true) => Ok(path),
        Ok(false) => Err(missing(format!(
            "a static busybox ({} is dynamically linked)",
            path.display()
        ))),
        Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
    }
}

/// Whether `path` is an ELF64 executable without a program interpreter
/// (PT_INTERP), i.e. one that runs in an initramfs without a libc.
fn is_static_elf(path: &Path) -> io::Result<bool> {
    let data = fs::read(path)?;
    let u16_at = |o: usize| data.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
    };
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return Ok(false);
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return Ok(false);
    };
    const PT_INTERP: u32 = 3;
    Ok((0..phnum as usize).all(|i| {
        let at = phoff as usize + i * phentsize as usize;
        data.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()) != PT_INTERP)
            .unwrap_or(false)
    }))
}

/// The newest `linux-image-*-cloud-amd64_*.deb` in `root`.
pub(super) fn find_kernel_deb(root: &Path) -> Result<PathBuf, GuestError> {
    let missing = || GuestError::Missing {
        what: format!(
            "the Debian cloud kernel package (linux-image-*-cloud-amd64_*.deb in {}; \
             {CACHE_ENV} names another directory)",
            root.display()
        ),
        install: format!(
            "{INSTALL_HINT} (it runs apt-get download linux-image-<abi>-cloud-amd64 there)"
        ),
    };
    let entries = match fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(missing()),
        Err(e) => return Err(io_err(format!("read {}", root.display()))(e)),
    };
    entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| deb_kernel_version(n).is_some())
        })
        .max_by_key(|p| natural_key(&p.file_name().unwrap().to_string_lossy()))
        .ok_or_else(missing)
}

/// `6.1.0-57-cloud-amd64` from `linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb`.
pub(super) fn deb_kernel_version(file_name: &str) -> Option<&str> {
    let rest = file_name.strip_prefix("linux-image-")?;
    let (version, tail) = rest.split_once('_')?;
    (version.ends_with("-cloud-amd64") && tail.ends_with(".deb")).then_some(version)
}

/// A sort key that orders the numbers in a name numerically (`-9` < `-57`).
fn natural_key(s: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let mut text = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_ascii_digit()) {
            text.push(c);
        }
        let mut num = String::new();
        while let Some(c) = chars.next_if(char::is_ascii_digit) {
            num.push(c);
        }
        key.push((0, text));
        key.push((num.parse().unwrap_or(0), String::new()));
    }
    key
}

/// The static `blkmesh-guest-check`: `$BLKMESH_GUEST_CHECK_BIN`, else
/// built with cargo for [`GUEST_TARGET`] with `+crt-static` (its own
/// target directory, so the workspace's normal build stays valid).
pub(super) fn guest_check_binary() -> Result<PathBuf, GuestError> {
    let path = if let Some(p) = std::env::var_os(CHECK_BIN_ENV).filter(|v| !v.is_empty()) {
        PathBuf::from(p)
    } else {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let target_dir = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let out = Command::new(&cargo)
            .current_dir(&workspace)
            .args([
                "build",
                "--locked",
                "--quiet",
                "-p",
                "blkmesh-guest-check",
                "--release",
                "--target",
                GUEST_TARGET,
            ])
            .env("CARGO_TARGET_DIR", &target_dir)
            // The test's own flags (if any) must not override these.
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("RUSTFLAGS", "-C target-feature=+crt-static")
            .stdin(Stdio::null())
            .output()
            .map_err(io_err(format!(
                "run {} to build blkmesh-guest-check",
                Path::new(&cargo).display()
            )))?;
        if !out.status.success() {
            return Err(GuestError::Command {
                what: "cargo build -p blkmesh-guest-check (static)".into(),
                status: out.status.to_string(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        target_dir
            .join(GUEST_TARGET)
            .join("release/blkmesh-guest-check")
    };
    match is_static_elf(&path) {
        Ok(true) => Ok(path),
        Ok(false) => Err(GuestError::Missing {
            what: format!(
                "a statically linked guest check ({} is not)",
                path.display()
            ),
            install: "rustup target add x86_64-unknown-linux-gnu; glibc static libraries \
                      (apt-get install libc6-dev)"
                .into(),
        }),
        Err(e) => Err(io_err(format!("read {}", path.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_version_comes_from_the_package_name() {
        assert_eq!(
            deb_kernel_version("linux-image-6.1.0-57-cloud-amd64_6.1.192-3_amd64.deb"),
            Some("6.1.0-57-cloud-amd64")
        );
        assert_eq!(
            deb_kernel_version("linux-image-6.1.0-57-amd64_6.1_amd64.deb"),
            None
        );
        assert_eq!(deb_kernel_version("lock"), None);
    }

    #[test]
    fn natural_order_compares_numbers_as_numbers() {
        assert!(
            natural_key("linux-image-6.1.0-9-cloud") < natural_key("linux-image-6.1.0-57-cloud")
        );
        assert!(natural_key("a2") < natural_key("b1"));
    }

    #[test]
    fn static_elf_detection() {
        // The test binary itself is dynamically linked.
        let exe = std::env::current_exe().unwrap();
        assert!(!is_static_elf(&exe).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let not_elf = dir.path().join("x");
        fs::write(&not_elf, b"#!/bin/sh\n").unwrap();
        assert!(!is_static_elf(&not_elf).unwrap());
    }
}
