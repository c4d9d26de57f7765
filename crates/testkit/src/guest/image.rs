//! [`GuestImage`]: the kernel and initramfs, prepared once per content in
//! the cache directory (the kernel and its modules extracted from the
//! Debian package).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::error::{io_err, GuestError};
use super::host::{
    cache_dir, deb_kernel_version, find_kernel_deb, guest_check_binary, qemu_binary,
    static_busybox, which, CACHE_ENV,
};
use super::initramfs::{build_initramfs, MODULES};

/// Kernel and initramfs, ready to boot.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// The kernel (`vmlinuz`).
    pub kernel: PathBuf,
    /// The initramfs (newc cpio, uncompressed).
    pub initrd: PathBuf,
    /// The kernel release, e.g. `6.1.0-57-cloud-amd64`.
    pub kernel_version: String,
}

impl GuestImage {
    /// Finds the kernel package in the cache directory, extracts the kernel
    /// and the virtio modules (once per kernel version), builds the static
    /// `blkmesh-guest-check` (cargo's cache makes that a no-op when
    /// nothing changed) and packs the initramfs (once per content).
    ///
    /// Safe to call from concurrent tests: the cache is locked meanwhile.
    pub fn prepare() -> Result<GuestImage, GuestError> {
        let root = cache_dir();
        qemu_binary()?;
        let busybox = static_busybox()?;
        if which("dpkg-deb").is_none() {
            return Err(GuestError::Missing {
                what: "dpkg-deb (to unpack the kernel package)".into(),
                install: "apt-get install dpkg".into(),
            });
        }
        let deb = find_kernel_deb(&root)?;
        let check_bin = guest_check_binary()?;

        fs::create_dir_all(&root).map_err(io_err(format!(
            "cannot create the cache directory {} (set {CACHE_ENV} to a writable one)",
            root.display()
        )))?;
        let _lock = lock(&root.join("lock"))?;
        let (version, kdir) = extract_kernel(&root, &deb)?;
        let initrd = build_initramfs(&root, &kdir, &busybox, &check_bin, &version)?;
        Ok(GuestImage {
            kernel: kdir.join("vmlinuz"),
            initrd,
            kernel_version: version,
        })
    }
}

/// Exclusive lock on `path` (created) until the returned guard drops.
fn lock(path: &Path) -> Result<nix::fcntl::Flock<File>, GuestError> {
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(io_err(format!("open {}", path.display())))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| io_err(format!("lock {}", path.display()))(e.into()))
}

/// Extracts vmlinuz and [`MODULES`] from the kernel package into
/// `<root>/kernel/<version>/` unless already done; returns the version and
/// that directory.
fn extract_kernel(root: &Path, deb: &Path) -> Result<(String, PathBuf), GuestError> {
    let name = deb.file_name().unwrap_or_default().to_string_lossy();
    let version = deb_kernel_version(&name).unwrap_or_default().to_string();
    let dir = root.join("kernel").join(&version);
    let done = dir.join(".complete");
    if done.exists() {
        return Ok((version, dir));
    }
    let tmp = root.join("kernel").join(format!("{version}.unpack"));
    let _ = fs::remove_dir_all(&tmp);
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&tmp).map_err(io_err(format!("create {}", tmp.display())))?;
    run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(&tmp),
        &format!("dpkg-deb -x {}", deb.display()),
    )?;
    let mods = dir.join("modules");
    fs::create_dir_all(&mods).map_err(io_err(format!("create {}", mods.display())))?;
    let vmlinuz = tmp.join(format!("boot/vmlinuz-{version}"));
    copy(&vmlinuz, &dir.join("vmlinuz"))?;
    let tree = tmp.join(format!("lib/modules/{version}/kernel"));
    for m in MODULES {
        let found = find_file(&tree, &format!("{m}.ko")).ok_or_else(|| GuestError::Missing {
            what: format!("module {m}.ko in {}", deb.display()),
            install: "a Debian 6.1 cloud kernel package (scripts/deps.sh)".into(),
        })?;
        copy(&found, &mods.join(format!("{m}.ko")))?;
    }
    fs::write(&done, b"").map_err(io_err(format!("write {}", done.display())))?;
    let _ = fs::remove_dir_all(&tmp);
    Ok((version, dir))
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for e in fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        if p.is_dir() {
            if let Some(found) = find_file(&p, name) {
                return Some(found);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

fn copy(from: &Path, to: &Path) -> Result<(), GuestError> {
    fs::copy(from, to).map(drop).map_err(io_err(format!(
        "copy {} to {}",
        from.display(),
        to.display()
    )))
}

fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, GuestError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("run {what}")))?;
    if !out.status.success() {
        return Err(GuestError::Command {
            what: what.into(),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Ok(out.stdout)
}
