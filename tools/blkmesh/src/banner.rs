//! What `blkmesh up` prints once everything runs: how to connect.

use std::fmt::Write;
use std::path::{Path, PathBuf};

use crate::cli::format_size;

/// Everything the banner shows.
#[derive(Debug)]
pub struct Banner<'a> {
    pub socket: &'a Path,
    pub socket_ready: bool,
    pub image: &'a Path,
    pub size: u64,
    pub queues: u32,
    pub writable: bool,
    pub workers: &'a [String],
    pub manager_url: &'a str,
    pub dir: &'a Path,
    pub blkmesh_io: PathBuf,
    pub blkmeshctl: PathBuf,
    pub notes: &'a [String],
}

impl Banner<'_> {
    pub fn render(&self) -> String {
        let sock = shell_quote(&self.socket.display().to_string());
        let io = shell_quote(&self.blkmesh_io.display().to_string());
        let ctl = shell_quote(&self.blkmeshctl.display().to_string());
        let mut s = String::new();
        let _ = writeln!(
            s,
            "blkmesh is up: export disk0 ({}, {} queue{}, {}) served by {}.",
            format_size(self.size),
            self.queues,
            if self.queues == 1 { "" } else { "s" },
            if self.writable {
                "writable"
            } else {
                "read-only"
            },
            self.workers.join(", ")
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "  socket:   {}", self.socket.display());
        if !self.socket_ready {
            let _ = writeln!(
                s,
                "            (not there yet: the frontend has not created it; see {}/logs/frontend.log)",
                self.dir.display()
            );
        }
        let _ = writeln!(s, "  image:    {}", self.image.display());
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
        let _ = writeln!(s, "Try it with blkmesh-io:");
        let _ = writeln!(
            s,
            "  {io} --socket {sock} -c \"write -P 0xab 0 64k\" -c \"read -P 0xab 0 64k\" -c info"
        );
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
            self.queues
        );
        let _ = writeln!(s);
        let _ = writeln!(s, "Look inside with blkmeshctl:");
        let _ = writeln!(s, "  {ctl} --addr {} worker list", self.manager_url);
        let _ = writeln!(s, "  {ctl} --addr {} export list", self.manager_url);
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

    fn banner<'a>(workers: &'a [String], notes: &'a [String], sock: &'a Path) -> Banner<'a> {
        Banner {
            socket: sock,
            socket_ready: true,
            image: Path::new("/srv/run/disk0.img"),
            size: 1 << 30,
            queues: 2,
            writable: true,
            workers,
            manager_url: "http://127.0.0.1:50051",
            dir: Path::new("/srv/run"),
            blkmesh_io: PathBuf::from("/opt/bin/blkmesh-io"),
            blkmeshctl: PathBuf::from("/opt/bin/blkmeshctl"),
            notes,
        }
    }

    #[test]
    fn banner_shows_socket_and_commands() {
        let workers = vec!["worker0".to_string(), "worker1".to_string()];
        let text = banner(&workers, &[], Path::new("/srv/run/disk0.sock")).render();
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
        let text = banner(&[], &[], Path::new("/tmp/my disk.sock")).render();
        assert!(text.contains("--socket '/tmp/my disk.sock'"), "{text}");
    }

    #[test]
    fn shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote("/a/b-c.sock"), "/a/b-c.sock");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
