//! Starting QEMU on an image: [`GuestOptions`] and the running [`GuestVm`].

use std::fmt::Write as _;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::error::{io_err, GuestError};
use super::host::qemu_binary;
use super::image::GuestImage;
use crate::process::Proc;

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
    /// Start as a migration's destination, waiting for the source's state
    /// on this unix socket (QEMU's `-incoming unix:PATH`).
    pub incoming: Option<PathBuf>,
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
            incoming: None,
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

    /// Starts as a migration's destination, listening on `socket`.
    pub fn incoming(mut self, socket: &Path) -> Self {
        self.incoming = Some(socket.to_path_buf());
        self
    }

    /// Puts the VM's files in `<dir>/guest/` (e.g. under the cluster
    /// directory, so `BLKMESH_TEST_KEEP=1` keeps them).
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_path_buf());
        self
    }
}

/// A running QEMU; killed (SIGKILL) on drop.
#[derive(Debug)]
pub struct GuestVm {
    pub(super) proc: Proc,
    command_line: Vec<String>,
    console: PathBuf,
    pub(super) qemu_log: PathBuf,
    pub(super) qmp: PathBuf,
    pub(super) started: Instant,
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

    /// SIGKILLs QEMU (a crashed VM).
    pub fn kill(&mut self) {
        self.proc.kill();
    }

    pub(super) fn console_tail(&self) -> String {
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
    .chain(
        opts.incoming
            .iter()
            .flat_map(|p| ["-incoming".to_string(), format!("unix:{}", qemu_path(p))]),
    )
    .collect()
}

/// A path inside a QEMU option value: commas doubled.
fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

pub(super) fn read_lossy(path: &Path) -> String {
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
}
