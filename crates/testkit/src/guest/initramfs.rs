//! The initramfs: the guest's /init, the virtio modules in load order,
//! busybox and the guest check, packed with busybox cpio.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::error::{io_err, GuestError};

/// The kernel modules the guest needs for its disk (the Debian cloud
/// kernel builds virtio as modules). The package has no modules.dep, so
/// the load order comes from each module's own `depends=` entry (see
/// [`load_order`]): `virtio` needs `virtio_ring`, for example.
pub const MODULES: [&str; 6] = [
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
];

/// How long the guest's /init waits for /dev/vda.
const DEVICE_WAIT_SECS: u32 = 30;

/// The guest's /init: mount what the check needs, load the virtio
/// modules, wait for the disk, run the check, power off. A failure before
/// the check still ends in a verdict line, so the host reports the reason
/// instead of waiting for its timeout.
fn init_script(modules: &[String]) -> String {
    let modules = modules.join(" ");
    format!(
        r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
die() {{
    dmesg | tail -n 5
    echo "CHECK init FAIL $*"
    echo "BLKMESH-GUEST-VERDICT: FAIL 1 checks failed"
    sync
    poweroff -f
}}
for m in {modules}; do
    insmod /modules/$m.ko || die "insmod $m failed"
done
i=0
while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ $i -gt {tries} ] && die "no /dev/vda after {DEVICE_WAIT_SECS} s"
    usleep 100000
done
/guest-check /dev/vda
echo "BLKMESH-INIT: guest-check exited with status $?"
sync
poweroff -f
"#,
        tries = DEVICE_WAIT_SECS * 10,
    )
}

/// Packs `/init`, busybox, the guest check and the modules into
/// `<root>/initramfs/<hash>.cpio` unless that exists; older ones go.
pub(super) fn build_initramfs(
    root: &Path,
    kdir: &Path,
    busybox: &Path,
    check_bin: &Path,
    version: &str,
) -> Result<PathBuf, GuestError> {
    let read = |p: &Path| fs::read(p).map_err(io_err(format!("read {}", p.display())));
    let mut modules = Vec::new();
    for m in MODULES {
        let p = kdir.join("modules").join(format!("{m}.ko"));
        modules.push((m.to_string(), read(&p)?));
    }
    let order = load_order(&modules)?;
    let init = init_script(&order);
    // (path in the initramfs, content, executable)
    let mut files: Vec<(String, Vec<u8>, bool)> = vec![
        ("init".into(), init.into_bytes(), true),
        ("bin/busybox".into(), read(busybox)?, true),
        ("guest-check".into(), read(check_bin)?, true),
    ];
    for (m, data) in modules {
        files.push((format!("modules/{m}.ko"), data, false));
    }
    let mut h = Sha256::new();
    h.update(version.as_bytes());
    for (name, data, exec) in &files {
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update((data.len() as u64).to_le_bytes());
        h.update(data);
        h.update([*exec as u8]);
    }
    let hash: String = h.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let dir = root.join("initramfs");
    let out = dir.join(format!("{hash}.cpio"));
    if out.exists() {
        return Ok(out);
    }
    let stage = dir.join(format!("{hash}.stage"));
    let _ = fs::remove_dir_all(&stage);
    let mut names = vec!["bin".to_string(), "modules".to_string()];
    for d in &names {
        fs::create_dir_all(stage.join(d)).map_err(io_err(format!("create {}", stage.display())))?;
    }
    for (name, data, exec) in &files {
        let p = stage.join(name);
        fs::write(&p, data).map_err(io_err(format!("write {}", p.display())))?;
        let mode = if *exec { 0o755 } else { 0o644 };
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))
            .map_err(io_err(format!("chmod {}", p.display())))?;
        names.push(name.clone());
    }
    let tmp_out = dir.join(format!("{hash}.cpio.tmp"));
    let cpio = File::create(&tmp_out).map_err(io_err(format!("create {}", tmp_out.display())))?;
    let mut child = Command::new(busybox)
        .args(["cpio", "-o", "-H", "newc"])
        .current_dir(&stage)
        .stdin(Stdio::piped())
        .stdout(Stdio::from(cpio))
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io_err("run busybox cpio"))?;
    let list = names.join("\n") + "\n";
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(list.as_bytes())
        .map_err(io_err("write the file list to busybox cpio"))?;
    let result = child
        .wait_with_output()
        .map_err(io_err("wait for busybox cpio"))?;
    if !result.status.success() {
        return Err(GuestError::Command {
            what: "busybox cpio -o -H newc".into(),
            status: result.status.to_string(),
            output: String::from_utf8_lossy(&result.stderr).into_owned(),
        });
    }
    fs::rename(&tmp_out, &out).map_err(io_err(format!("rename to {}", out.display())))?;
    let _ = fs::remove_dir_all(&stage);
    // Earlier initramfs builds are stale now; QEMU reads its initrd at
    // start, so running guests do not mind.
    if let Ok(entries) = fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p != out && p.extension().is_some_and(|x| x == "cpio") {
                let _ = fs::remove_file(p);
            }
        }
    }
    Ok(out)
}

/// The modules' `depends=` entries (from their .modinfo section: NUL
/// separated `key=value` strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|x| !x.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// `modules` (name, contents) in an order where each comes after what it
/// depends on; an error names a dependency that is not among them.
fn load_order(modules: &[(String, Vec<u8>)]) -> Result<Vec<String>, GuestError> {
    let deps: Vec<(String, Vec<String>)> = modules
        .iter()
        .map(|(n, ko)| (n.clone(), module_depends(ko)))
        .collect();
    let mut order: Vec<String> = Vec::new();
    while order.len() < deps.len() {
        let next = deps
            .iter()
            .find(|(n, d)| !order.contains(n) && d.iter().all(|x| order.contains(x)));
        match next {
            Some((n, _)) => order.push(n.clone()),
            None => {
                let (n, d) = deps
                    .iter()
                    .find(|(n, _)| !order.contains(n))
                    .expect("a module is left");
                return Err(GuestError::Missing {
                    what: format!(
                        "a load order for module {n} (depends on {d:?}; the harness only \
                         packs {MODULES:?})"
                    ),
                    install: "add the module to guest::MODULES".into(),
                });
            }
        }
    }
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_order_follows_depends() {
        let ko = |deps: &str| format!("\0license=GPL\0depends={deps}\0name=x\0").into_bytes();
        let mods = vec![
            ("blk".to_string(), ko("virtio,ring")),
            ("virtio".to_string(), ko("ring")),
            ("ring".to_string(), ko("")),
        ];
        assert_eq!(load_order(&mods).unwrap(), ["ring", "virtio", "blk"]);
        let missing = vec![("virtio".to_string(), ko("ring"))];
        assert!(load_order(&missing).is_err());
    }

    #[test]
    fn init_script_loads_modules_in_order_and_always_ends_in_poweroff() {
        let order: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
        let s = init_script(&order);
        assert!(s.contains(&format!("for m in {}; do", MODULES.join(" "))));
        assert!(s.trim_end().ends_with("poweroff -f"));
        assert!(s.contains("BLKMESH-GUEST-VERDICT: FAIL"));
    }
}
