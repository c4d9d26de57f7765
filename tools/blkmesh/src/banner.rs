//! What `blkmesh up` prints once everything runs: how to connect.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::cli::format_size;

/// One export, as the banner shows it.
#[derive(Debug, Clone)]
pub struct BannerExport {
    pub id: String,
    pub socket: PathBuf,
    /// The frontend created the socket.
    pub ready: bool,
    /// Bytes (0: not known yet).
    pub size: u64,
    pub queues: u32,
    pub writable: bool,
}

/// Everything the banner shows.
#[derive(Debug)]
pub struct Banner<'a> {
    /// The exports: the default disk's, or the configuration file's.
    pub exports: &'a [BannerExport],
    /// The configuration file applied, if any.
    pub config: Option<&'a Path>,
    /// The default disk's image (none with a configuration file).
    pub image: Option<&'a Path>,
    pub workers: &'a [String],
    pub manager_url: &'a str,
    /// blkmeshctl's TLS and token options (`--ca FILE --token-file FILE`).
    pub ctl_args: &'a [String],
    pub dir: &'a Path,
    pub blkmesh_io: PathBuf,
    pub blkmeshctl: PathBuf,
    pub notes: &'a [String],
}

/// `1 GiB, 2 queues, writable`.
fn describe(e: &BannerExport) -> String {
    let mut parts = Vec::new();
    if e.size > 0 {
        parts.push(format_size(e.size));
    }
    parts.push(format!(
        "{} queue{}",
        e.queues,
        if e.queues == 1 { "" } else { "s" }
    ));
    parts.push(if e.writable { "writable" } else { "read-only" }.to_string());
    parts.join(", ")
}

impl Banner<'_> {
    pub fn render(&self) -> String {
        let io = shell_quote(&self.blkmesh_io.display().to_string());
        let ctl = shell_quote(&self.blkmeshctl.display().to_string());
        let not_there = format!(
            "(not there yet: the frontend has not created it; see {}/logs/frontend.log)",
            self.dir.display()
        );
        let mut s = String::new();
        let workers = self.workers.join(", ");
        match (self.config, self.exports) {
            (None, [e]) => {
                let _ = writeln!(
                    s,
                    "blkmesh is up: export {} ({}) served by {workers}.",
                    e.id,
                    describe(e)
                );
                let _ = writeln!(s);
                let _ = writeln!(s, "  socket:   {}", e.socket.display());
                if !e.ready {
                    let _ = writeln!(s, "            {not_there}");
                }
            }
            (config, exports) => {
                let n = exports.len();
                let from = config
                    .map(|c| format!(" with {}", c.display()))
                    .unwrap_or_default();
                let _ = writeln!(
                    s,
                    "blkmesh is up{from}: {n} export{} served by {workers}.",
                    if n == 1 { "" } else { "s" }
                );
                let _ = writeln!(s);
                for e in exports {
                    let _ = writeln!(
                        s,
                        "  export {}: {} ({})",
                        e.id,
                        e.socket.display(),
                        describe(e)
                    );
                    if !e.ready {
                        let _ = writeln!(s, "            {not_there}");
                    }
                }
            }
        }
        if let Some(image) = self.image {
            let _ = writeln!(s, "  image:    {}", image.display());
        }
        if let Some(config) = self.config {
            let _ = writeln!(s, "  config:   {}", config.display());
        }
        let _ = writeln!(s, "  manager:  {}", self.manager_url);
        let _ = writeln!(
            s,
            "  state:    {}/state   logs: {}/logs",
            self.dir.display(),
            self.dir.display()
        );
        for note in self.notes {
            let _ = writeln!(s, "  note:     {note}");
        }
        let _ = writeln!(s);
        if let Some(e) = self.exports.first() {
            let sock = shell_quote(&e.socket.display().to_string());
            let _ = writeln!(s, "Try it with blkmesh-io:");
            if e.writable {
                let _ = writeln!(
                    s,
                    "  {io} --socket {sock} -c \"write -P 0xab 0 64k\" -c \"read -P 0xab 0 64k\" -c info"
                );
            } else {
                let _ = writeln!(s, "  {io} --socket {sock} -c \"read 0 64k\" -c info");
            }
            let _ = writeln!(s);
            let _ = writeln!(
                s,
                "Boot a VM with QEMU (guest RAM must be shared memory; one client at a time):"
            );
            let _ = writeln!(
                s,
                "  qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\"
            );
            let _ = writeln!(
                s,
                "    -chardev socket,id=vu0,path={sock} -device vhost-user-blk-pci,chardev=vu0,num-queues={} ...",
                e.queues
            );
        } else {
            let _ = writeln!(
                s,
                "No export yet: add nodes and exports to the configuration file and restart, \
                 or add them with blkmeshctl."
            );
        }
        let _ = writeln!(s);
        let _ = writeln!(s, "Look inside with blkmeshctl:");
        let mut addr = self.manager_url.to_string();
        for a in self.ctl_args {
            addr.push(' ');
            addr.push_str(&shell_quote(a));
        }
        let _ = writeln!(s, "  {ctl} --addr {addr} worker list");
        let _ = writeln!(s, "  {ctl} --addr {addr} export list");
        let _ = writeln!(s);
        let _ = writeln!(s, "Supervising; Ctrl-C stops everything.");
        s
    }
}

/// Quotes `s` for a POSIX shell when it needs it.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:,=@%".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk0(sock: &Path) -> Vec<BannerExport> {
        vec![BannerExport {
            id: "disk0".into(),
            socket: sock.to_path_buf(),
            ready: true,
            size: 1 << 30,
            queues: 2,
            writable: true,
        }]
    }

    fn banner<'a>(
        workers: &'a [String],
        notes: &'a [String],
        exports: &'a [BannerExport],
    ) -> Banner<'a> {
        Banner {
            exports,
            config: None,
            image: Some(Path::new("/srv/run/disk0.img")),
            workers,
            manager_url: "http://127.0.0.1:50051",
            ctl_args: &[],
            dir: Path::new("/srv/run"),
            blkmesh_io: PathBuf::from("/opt/bin/blkmesh-io"),
            blkmeshctl: PathBuf::from("/opt/bin/blkmeshctl"),
            notes,
        }
    }

    #[test]
    fn banner_shows_socket_and_commands() {
        let workers = vec!["worker0".to_string(), "worker1".to_string()];
        let exports = disk0(Path::new("/srv/run/disk0.sock"));
        let text = banner(&workers, &[], &exports).render();
        assert!(text.contains("  socket:   /srv/run/disk0.sock\n"), "{text}");
        assert!(text.contains(
            "/opt/bin/blkmesh-io --socket /srv/run/disk0.sock -c \"write -P 0xab 0 64k\" -c \"read -P 0xab 0 64k\" -c info"
        ), "{text}");
        assert!(text.contains("-chardev socket,id=vu0,path=/srv/run/disk0.sock -device vhost-user-blk-pci,chardev=vu0,num-queues=2"), "{text}");
        assert!(
            text.contains("memory-backend-memfd,id=mem,size=1G,share=on"),
            "{text}"
        );
        assert!(
            text.contains("/opt/bin/blkmeshctl --addr http://127.0.0.1:50051 worker list"),
            "{text}"
        );
        assert!(
            text.contains("(1 GiB, 2 queues, writable) served by worker0, worker1"),
            "{text}"
        );
        assert!(!text.contains("not there yet"));
    }

    #[test]
    fn banner_quotes_paths_with_spaces() {
        let exports = disk0(Path::new("/tmp/my disk.sock"));
        let text = banner(&[], &[], &exports).render();
        assert!(text.contains("--socket '/tmp/my disk.sock'"), "{text}");
    }

    #[test]
    fn banner_lists_every_export_of_a_config() {
        let workers = vec!["worker0".to_string()];
        let mut exports = disk0(Path::new("/run/blkmesh/disk0.sock"));
        exports.push(BannerExport {
            id: "ro".into(),
            socket: PathBuf::from("/run/blkmesh/ro.sock"),
            ready: false,
            size: 0,
            queues: 1,
            writable: false,
        });
        let mut b = banner(&workers, &[], &exports);
        b.config = Some(Path::new("/etc/blkmesh/blkmesh.toml"));
        b.image = None;
        let text = b.render();
        assert!(
            text.starts_with(
                "blkmesh is up with /etc/blkmesh/blkmesh.toml: 2 exports served by worker0.\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("  export disk0: /run/blkmesh/disk0.sock (1 GiB, 2 queues, writable)\n"),
            "{text}"
        );
        assert!(
            text.contains("  export ro: /run/blkmesh/ro.sock (1 queue, read-only)\n            (not there yet"),
            "{text}"
        );
        assert!(
            text.contains("  config:   /etc/blkmesh/blkmesh.toml\n"),
            "{text}"
        );
        assert!(!text.contains("image:"), "{text}");
        // The commands use the first export.
        assert!(
            text.contains("--socket /run/blkmesh/disk0.sock -c \"write"),
            "{text}"
        );

        // A read-only first export is only read; no export at all is said.
        let ro = &exports[1..];
        let mut b = banner(&workers, &[], ro);
        b.config = Some(Path::new("/c.toml"));
        let text = b.render();
        assert!(
            text.contains("--socket /run/blkmesh/ro.sock -c \"read 0 64k\" -c info"),
            "{text}"
        );
        let mut b = banner(&workers, &[], &[]);
        b.config = Some(Path::new("/c.toml"));
        let text = b.render();
        assert!(text.contains("0 exports served by worker0"), "{text}");
        assert!(text.contains("No export yet"), "{text}");
    }

    #[test]
    fn shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote("/a/b-c.sock"), "/a/b-c.sock");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
