//! A real Linux guest on a blkmesh export: QEMU (TCG, so no KVM needed)
//! boots Debian's cloud kernel with a tiny initramfs whose only job is to
//! run `blkmesh-guest-check` on `/dev/vda` and power off.
//!
//! The host-side tests drive blkmesh with our own vhost-user client; this
//! is the one place where a real guest kernel's virtio-blk driver, blk-mq
//! queue mapping, page cache, flushes, discards and write-zeroes meet the
//! frontend. The guest prints one `CHECK` line per check and a verdict on
//! its serial console (see [`blkmesh_guest_check::report`]);
//! [`GuestVm::wait_verdict`] parses it.
//!
//! ```no_run
//! use std::time::Duration;
//! use blkmesh_testkit::guest::{GuestImage, GuestOptions, GuestVm};
//!
//! let image = GuestImage::prepare().unwrap_or_else(|e| panic!("{e}"));
//! # let socket = std::path::PathBuf::from("/tmp/disk.sock");
//! let mut vm = GuestVm::start(&image, GuestOptions::new(&socket).param("seed", 7)).unwrap();
//! let outcome = vm.wait_verdict(Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}"));
//! assert!(outcome.passed(), "{}", outcome.console);
//! ```
//!
//! What it needs (all installed by `scripts/deps.sh`): `qemu-system-x86_64`
//! (10.x from bookworm-backports), a static busybox (`busybox-static`),
//! `dpkg-deb`, and the Debian cloud kernel package
//! `linux-image-<abi>-cloud-amd64_*.deb` in the cache directory
//! ([`CACHE_ENV`], default [`DEFAULT_CACHE`]). A missing piece is an error
//! naming it and how to install it, never a silent pass.
//!
//! The cache directory also holds the extracted kernel and modules
//! (`kernel/<version>/`) and the initramfs (`initramfs/<hash>.cpio`, keyed
//! by a hash of everything in it), so only the first run pays for them.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use blkmesh_guest_check::report::{Report, Verdict};
use sha2::{Digest, Sha256};

use crate::process::Proc;

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
/// The rust target the static guest binary is built for; a separate
/// target directory, so the static build does not invalidate the normal one.
const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";
/// How long QEMU gets to power off after the verdict.
const POWEROFF_GRACE: Duration = Duration::from_secs(15);

/// Why a guest could not be prepared, started or finished.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// A tool or file the guest needs is not installed.
    #[error("real-guest test: {what} is missing; install it with: {install}")]
    Missing { what: String, install: String },
    #[error("real-guest test: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// A helper command (cargo, dpkg-deb, busybox cpio) failed.
    #[error("real-guest test: {what} failed ({status}):\n{output}")]
    Command {
        what: String,
        status: String,
        output: String,
    },
    /// No verdict line in time.
    #[error(
        "real-guest test: no verdict within {timeout:?}\n\
         --- guest console (last lines) ---\n{console}\n--- qemu output ---\n{qemu}"
    )]
    Timeout {
        timeout: Duration,
        console: String,
        qemu: String,
    },
    /// QEMU exited before the guest printed its verdict.
    #[error(
        "real-guest test: qemu exited ({status}) without a verdict\n\
         --- guest console (last lines) ---\n{console}\n--- qemu output ---\n{qemu}"
    )]
    Exited {
        status: String,
        console: String,
        qemu: String,
    },
    /// The guest printed its verdict but QEMU did not exit.
    #[error("real-guest test: the guest did not power off within {0:?} of its verdict")]
    NoPowerOff(Duration),
    /// A QMP command failed.
    #[error("real-guest test: QMP {command}: {message}")]
    Qmp { command: String, message: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> GuestError {
    let context = context.into();
    move |source| GuestError::Io { context, source }
}

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

/// How to start a [`GuestVm`].
#[derive(Debug, Clone)]
pub struct GuestOptions {
    /// The export's vhost-user socket.
    pub socket: PathBuf,
    /// virtqueues of the disk (QEMU's `num-queues`; default 2).
    pub num_queues: u16,
    /// Guest CPUs (default 2: one per queue, so blk-mq maps a queue to each).
    pub cpus: u32,
    /// Guest memory in MiB (default 512).
    pub memory_mib: u32,
    /// Reconnect to the socket this often after it closes (QEMU's
    /// `reconnect-ms`), for tests that restart the frontend (default: none,
    /// a lost connection stays lost).
    pub reconnect_ms: Option<u32>,
    /// `blkmesh.<key>=<value>` on the kernel command line: the guest
    /// check's parameters and expected geometry (see `blkmesh-guest-check`).
    pub params: Vec<(String, String)>,
    /// Directory whose `guest/` subdirectory gets the console log
    /// (`console.log`), QEMU's output (`qemu.log`) and the QMP socket
    /// (`qmp.sock`) (default: a new temporary directory, removed on drop).
    pub dir: Option<PathBuf>,
}

impl GuestOptions {
    /// Two queues, two CPUs, 512 MiB, no reconnect, no parameters.
    pub fn new(socket: &Path) -> GuestOptions {
        GuestOptions {
            socket: socket.to_path_buf(),
            num_queues: 2,
            cpus: 2,
            memory_mib: 512,
            reconnect_ms: None,
            params: Vec::new(),
            dir: None,
        }
    }

    /// Adds `blkmesh.<key>=<value>` to the kernel command line.
    pub fn param(mut self, key: &str, value: impl ToString) -> Self {
        self.params.push((key.to_string(), value.to_string()));
        self
    }

    /// Sets the number of virtqueues.
    pub fn queues(mut self, n: u16) -> Self {
        self.num_queues = n;
        self
    }

    /// Reconnects to the socket every `ms` after losing it.
    pub fn reconnect_ms(mut self, ms: u32) -> Self {
        self.reconnect_ms = Some(ms);
        self
    }

    /// Puts the VM's files in `<dir>/guest/` (e.g. under the cluster
    /// directory, so `BLKMESH_TEST_KEEP=1` keeps them).
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }
}

/// What a finished guest reported.
#[derive(Debug, Clone)]
pub struct GuestOutcome {
    /// The parsed console.
    pub report: Report,
    /// The whole console text.
    pub console: String,
    /// QEMU start to the check program's start (boot).
    pub boot: Option<Duration>,
    /// QEMU start to the verdict.
    pub elapsed: Duration,
    /// QEMU's exit status (after the guest powered off).
    pub exit: Option<ExitStatus>,
}

impl GuestOutcome {
    /// Whether the verdict is PASS.
    pub fn passed(&self) -> bool {
        self.report.verdict == Some(Verdict::Pass)
    }
}

/// A running QEMU; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct GuestVm {
    proc: Proc,
    command_line: Vec<String>,
    console: PathBuf,
    qemu_log: PathBuf,
    qmp: PathBuf,
    started: Instant,
    // Dropped last: QEMU must be gone before its directory.
    _tmp: Option<tempfile::TempDir>,
}

impl GuestVm {
    /// Starts QEMU on `image` with the disk at `opts.socket`.
    ///
    /// Without `reconnect_ms` QEMU connects to the socket at start and
    /// exits at once if nobody listens (an [`GuestError::Exited`] from
    /// [`GuestVm::wait_verdict`]).
    pub fn start(image: &GuestImage, opts: GuestOptions) -> Result<GuestVm, GuestError> {
        let qemu = qemu_binary()?;
        let (dir, tmp) = match &opts.dir {
            Some(d) => {
                let d = d.join("guest");
                fs::create_dir_all(&d).map_err(io_err(format!("create {}", d.display())))?;
                (d, None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("blkmesh-guest.")
                    .tempdir()
                    .map_err(io_err("create a temporary directory"))?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let console = dir.join("console.log");
        let qemu_log = dir.join("qemu.log");
        let qmp = dir.join("qmp.sock");
        for p in [&console, &qmp] {
            match fs::remove_file(p) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(io_err(format!("remove {}", p.display()))(e))
                }
                _ => {}
            }
        }
        let args = qemu_args(image, &opts, &console, &qmp);
        let mut cmd = Command::new(&qemu);
        cmd.args(&args);
        let proc = Proc::spawn("qemu", cmd, &qemu_log, true)
            .map_err(io_err(format!("start {}", qemu.display())))?;
        let mut command_line = vec![qemu.display().to_string()];
        command_line.extend(args);
        Ok(GuestVm {
            proc,
            command_line,
            console,
            qemu_log,
            qmp,
            started: Instant::now(),
            _tmp: tmp,
        })
    }

    /// QEMU's command line, program first.
    pub fn command_line(&self) -> &[String] {
        &self.command_line
    }

    /// QEMU's pid while it runs.
    pub fn pid(&mut self) -> Option<u32> {
        if self.proc.is_running() {
            self.proc.pid()
        } else {
            None
        }
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        read_lossy(&self.console)
    }

    /// Path of the serial console log.
    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// Path of QEMU's QMP socket (`server=on,wait=off`).
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// Waits until the guest prints its verdict and powers off. Errors
    /// (with the console tail and QEMU's output) if there is no verdict
    /// within `timeout`, QEMU exits without one, or the guest does not
    /// power off afterwards.
    pub fn wait_verdict(&mut self, timeout: Duration) -> Result<GuestOutcome, GuestError> {
        let deadline = Instant::now() + timeout;
        let verdict_at = loop {
            let text = self.console();
            let report = Report::parse(&text);
            if report.verdict.is_some() {
                break self.started.elapsed();
            }
            if let Some(status) = self.proc.try_wait() {
                // The console may have been completed just before the exit.
                if Report::parse(&self.console()).verdict.is_some() {
                    break self.started.elapsed();
                }
                return Err(GuestError::Exited {
                    status: status.to_string(),
                    console: self.console_tail(),
                    qemu: read_lossy(&self.qemu_log),
                });
            }
            if Instant::now() >= deadline {
                return Err(GuestError::Timeout {
                    timeout,
                    console: self.console_tail(),
                    qemu: read_lossy(&self.qemu_log),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if !self.proc.wait_timeout(POWEROFF_GRACE) {
            return Err(GuestError::NoPowerOff(POWEROFF_GRACE));
        }
        let console = self.console();
        let report = Report::parse(&console);
        // The guest's uptime at the check's start, plus the time QEMU took
        // to get the kernel going, is at most the time since QEMU started.
        let boot = report
            .start_uptime_ms
            .map(Duration::from_millis)
            .filter(|b| *b <= verdict_at);
        Ok(GuestOutcome {
            report,
            console,
            boot,
            elapsed: verdict_at,
            exit: self.proc.try_wait(),
        })
    }

    /// Sends one QMP command (e.g. `system_reset`, `quit`) and returns the
    /// response line. `arguments` is a JSON object or empty.
    pub fn qmp(&self, command: &str, arguments: &str) -> Result<String, GuestError> {
        let err = |message: String| GuestError::Qmp {
            command: command.to_string(),
            message,
        };
        let stream = UnixStream::connect(&self.qmp)
            .map_err(|e| err(format!("connect {}: {e}", self.qmp.display())))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| err(e.to_string()))?;
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| err(e.to_string()))?);
        let mut w = stream;
        let mut line = String::new();
        let mut next_reply = |reader: &mut BufReader<UnixStream>| -> Result<String, GuestError> {
            loop {
                line.clear();
                let n = reader
                    .read_line(&mut line)
                    .map_err(|e| err(format!("read: {e}")))?;
                if n == 0 {
                    return Err(err("QEMU closed the connection".into()));
                }
                // Skip asynchronous events.
                if line.contains("\"return\"") || line.contains("\"error\"") {
                    return Ok(line.trim().to_string());
                }
            }
        };
        // The greeting, then capabilities negotiation.
        let mut greeting = String::new();
        reader
            .read_line(&mut greeting)
            .map_err(|e| err(format!("read greeting: {e}")))?;
        writeln!(w, r#"{{"execute":"qmp_capabilities"}}"#).map_err(|e| err(e.to_string()))?;
        next_reply(&mut reader)?;
        let args = if arguments.trim().is_empty() {
            String::new()
        } else {
            format!(r#","arguments":{arguments}"#)
        };
        writeln!(w, r#"{{"execute":"{command}"{args}}}"#).map_err(|e| err(e.to_string()))?;
        let reply = next_reply(&mut reader)?;
        if reply.contains("\"error\"") {
            return Err(err(reply));
        }
        Ok(reply)
    }

    /// SIGKILLs QEMU (a crashed VM).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    fn console_tail(&self) -> String {
        tail(&self.console(), 60)
    }
}

impl Drop for GuestVm {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!(
                "blkmesh-testkit: guest console ({}), last lines:\n{}\n--- qemu output ---\n{}",
                self.console.display(),
                self.console_tail(),
                read_lossy(&self.qemu_log)
            );
        }
    }
}

/// QEMU's arguments (without the program).
fn qemu_args(image: &GuestImage, opts: &GuestOptions, console: &Path, qmp: &Path) -> Vec<String> {
    let mem = format!("{}M", opts.memory_mib);
    let mut chardev = format!("socket,id=blk0,path={}", qemu_path(&opts.socket));
    if let Some(ms) = opts.reconnect_ms {
        let _ = write!(chardev, ",reconnect-ms={ms}");
    }
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    for (k, v) in &opts.params {
        let _ = write!(append, " blkmesh.{k}={v}");
    }
    [
        "-name",
        "blkmesh-guest",
        // No default devices (VGA, NIC, monitor): less to boot, nothing
        // reading the test's stdin.
        "-nodefaults",
        "-display",
        "none",
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-smp",
        &opts.cpus.to_string(),
        "-m",
        &mem,
        // vhost-user: the frontend maps guest memory, so it must be a
        // shared file descriptor.
        "-object",
        &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        "-numa",
        "node,memdev=mem",
        "-chardev",
        &chardev,
        "-device",
        &format!(
            "vhost-user-blk-pci,chardev=blk0,num-queues={}",
            opts.num_queues
        ),
        "-kernel",
        &qemu_path(&image.kernel),
        "-initrd",
        &qemu_path(&image.initrd),
        "-append",
        &append,
        "-serial",
        &format!("file:{}", qemu_path(console)),
        "-qmp",
        &format!("unix:{},server=on,wait=off", qemu_path(qmp)),
        // A guest reboot (or kernel panic, with panic=-1) ends QEMU.
        "-no-reboot",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A path inside a QEMU option value: commas doubled.
fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

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

// ----- finding the pieces -----

/// The cache directory: `$BLKMESH_GUEST_CACHE`, else [`DEFAULT_CACHE`].
pub fn cache_dir() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn qemu_binary() -> Result<PathBuf, GuestError> {
    which("qemu-system-x86_64").ok_or_else(|| GuestError::Missing {
        what: "qemu-system-x86_64".into(),
        install: format!("{INSTALL_HINT} (apt-get install -t bookworm-backports qemu-system-x86)"),
    })
}

fn static_busybox() -> Result<PathBuf, GuestError> {
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
fn find_kernel_deb(root: &Path) -> Result<PathBuf, GuestError> {
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
fn deb_kernel_version(file_name: &str) -> Option<&str> {
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
fn guest_check_binary() -> Result<PathBuf, GuestError> {
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

/// Packs `/init`, busybox, the guest check and the modules into
/// `<root>/initramfs/<hash>.cpio` unless that exists; older ones go.
fn build_initramfs(
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

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
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

    #[test]
    fn qemu_args_carry_socket_queues_and_params() {
        let image = GuestImage {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/i,1.cpio".into(),
            kernel_version: "v".into(),
        };
        let opts = GuestOptions::new(Path::new("/run/d.sock"))
            .queues(2)
            .reconnect_ms(500)
            .param("seed", 7)
            .param("loop", 30);
        let args = qemu_args(
            &image,
            &opts,
            Path::new("/d/console.log"),
            Path::new("/d/qmp.sock"),
        );
        let joined = args.join(" ");
        assert!(
            joined.contains("socket,id=blk0,path=/run/d.sock,reconnect-ms=500"),
            "{joined}"
        );
        assert!(
            joined.contains("vhost-user-blk-pci,chardev=blk0,num-queues=2"),
            "{joined}"
        );
        assert!(joined.contains("-initrd /k/i,,1.cpio"), "{joined}");
        let append = &args[args.iter().position(|a| a == "-append").unwrap() + 1];
        assert_eq!(
            append,
            "console=ttyS0 quiet panic=-1 blkmesh.seed=7 blkmesh.loop=30"
        );
        assert!(joined.contains("memory-backend-memfd,id=mem,size=512M,share=on"));
    }

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
