//! Jobs on an image opened as a worker opens it, checked with qemu-img.

use std::path::{Path, PathBuf};
use std::process::Command;

use blkmesh_image::{open_chain, Format, Layer, Source};

use super::*;
use crate::qcow2::BackingLayer;

fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A 4 MiB raw base with 0x11 everywhere but its last MiB (zeroes), and a
/// qcow2 top over it holding 0x22 at 1 MiB.
fn chain(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.raw");
    let mut data = vec![0x11u8; 4 << 20];
    data[3 << 20..].fill(0);
    std::fs::write(&base, data).unwrap();
    let top = dir.join("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            s(&base),
            "-F",
            "raw",
            s(&top),
        ],
    );
    run("qemu-io", &["-c", "write -P 0x22 1M 64k", s(&top)]);
    (base, top)
}

fn layer(node: &str, top: &Path, base: &Path) -> Arc<Qcow2Layer> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(top)
        .unwrap();
    let header = file.try_clone().unwrap();
    let backing = vec![BackingLayer {
        format: Format::Raw,
        path: base.to_path_buf(),
        direct: false,
        no_backing: false,
    }];
    let mut layers = vec![Layer {
        format: Format::Qcow2,
        source: Source::File(file, top.to_path_buf()),
        writable: true,
        direct: false,
        no_backing: false,
    }];
    layers.extend(backing.iter().map(|b| b.layer(false)));
    Arc::new(Qcow2Layer::new(
        node,
        open_chain(layers).unwrap(),
        header,
        backing,
    ))
}

fn req(job: &str, action: JobAction, kind: JobKind) -> JobRequest {
    JobRequest {
        job: job.into(),
        action: action as i32,
        kind: kind as i32,
        speed: 0,
    }
}

fn start_on(l: &Arc<Qcow2Layer>, job: &str, kind: JobKind) -> JobStatus {
    request(Some(l), false, &req(job, JobAction::Start, kind)).unwrap()
}

fn wait_for(job: &str, state: JobState) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = status(job).unwrap();
        if st.state == state as i32 {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} never got {state:?}: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn stream_copies_the_backing_in_and_drops_it() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    let l = layer("n-stream", &top, &base);
    let st = start_on(&l, "s1", JobKind::Stream);
    assert_eq!(st.total, 4 << 20);
    let st = wait_for("s1", JobState::Completed);
    assert_eq!(st.done, 4 << 20);
    drop(l);
    let info = run("qemu-img", &["info", s(&top)]);
    assert!(!info.contains("backing file"), "{info}");
    run("qemu-img", &["check", s(&top)]);
    // The same disk without the base: the base's data, the top's own, and
    // zeroes where the base had zeroes (not copied: left unallocated).
    std::fs::remove_file(&base).unwrap();
    let image = open_chain(vec![Layer::read_only(Format::Qcow2, &top)]).unwrap();
    let read = |at: u64| {
        let mut b = vec![0u8; 4096];
        image.read(&mut b[..], at).unwrap();
        b[0]
    };
    assert_eq!(
        (read(0), read(1 << 20), read(2 << 20), read(3 << 20)),
        (0x11, 0x22, 0x11, 0)
    );
    let map = run("qemu-img", &["map", "--output=json", s(&top)]);
    assert!(
        map.contains("\"data\": false"),
        "the zero MiB stays unallocated: {map}"
    );
}

#[test]
fn commit_copies_the_top_follows_writes_and_finishes_once_the_graph_let_go() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    let l = layer("n-commit", &top, &base);
    start_on(&l, "c1", JobKind::Commit);
    wait_for("c1", JobState::Ready);
    // A guest write after the copy: marked as the queue marks it.
    l.shared().write(&[0x33u8; 4096][..], 2 << 20).unwrap();
    l.written(2 << 20, 4096);
    // Not yet: the graph (this test) still holds the image.
    let e = finish_commit("c1").unwrap_err();
    assert_eq!(e.errno, Errno::EBUSY, "{e:?}");
    l.shared().write(&[0x44u8; 512][..], 3 << 20).unwrap();
    l.written(3 << 20, 512);
    drop(l);
    finish_commit("c1").unwrap();
    assert_eq!(status("c1").unwrap().state, JobState::Completed as i32);
    // Again on the same worker (a second open of the plan): fine.
    finish_commit("c1").unwrap();
    // The base alone now reads as the chain did.
    let raw = std::fs::read(&base).unwrap();
    assert_eq!(raw[0], 0x11);
    assert_eq!(raw[1 << 20], 0x22);
    assert_eq!(raw[(2 << 20) + 4095], 0x33);
    assert_eq!(raw[3 << 20], 0x44);
    assert_eq!(raw[(3 << 20) + 512], 0);
    run(
        "qemu-img",
        &["compare", "-f", "qcow2", "-F", "raw", s(&top), s(&base)],
    );
}

#[test]
fn bad_requests_get_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    let l = layer("n-bad", &top, &base);
    let e = |r: Result<JobStatus, JobError>| r.unwrap_err().errno;
    assert_eq!(e(status("nope")), Errno::ENOENT);
    assert_eq!(
        e(request(
            Some(&l),
            false,
            &req("", JobAction::Status, JobKind::Stream)
        )),
        Errno::EINVAL
    );
    let bad_kind = JobRequest {
        kind: 99,
        ..req("k", JobAction::Start, JobKind::Stream)
    };
    assert_eq!(e(request(Some(&l), false, &bad_kind)), Errno::EINVAL);
    let bad_action = JobRequest {
        action: 99,
        ..req("k", JobAction::Start, JobKind::Stream)
    };
    assert_eq!(e(request(Some(&l), false, &bad_action)), Errno::EINVAL);
    assert_eq!(
        e(request(
            None,
            false,
            &req("k", JobAction::Start, JobKind::Stream)
        )),
        Errno::EINVAL
    );
    assert_eq!(
        e(request(
            Some(&l),
            true,
            &req("k", JobAction::Start, JobKind::Stream)
        )),
        Errno::EROFS
    );
    assert_eq!(
        e(finish_commit("nope").map(|_| JobStatus::default())),
        Errno::ESTALE
    );
    // One job per node; a second start of the same id is the same job.
    start_on(&l, "b1", JobKind::Commit);
    start_on(&l, "b1", JobKind::Commit);
    assert_eq!(
        e(request(
            Some(&l),
            false,
            &req("b2", JobAction::Start, JobKind::Stream)
        )),
        Errno::EBUSY
    );
    // Finishing a job that is not ready, or not a commit.
    request(
        Some(&l),
        false,
        &req("b1", JobAction::Cancel, JobKind::Unspecified),
    )
    .unwrap();
    wait_for("b1", JobState::Cancelled);
    assert_eq!(
        e(finish_commit("b1").map(|_| JobStatus::default())),
        Errno::EINVAL
    );
}

#[test]
fn a_reopened_node_interrupts_its_job_which_the_manager_starts_again() {
    let dir = tempfile::tempdir().unwrap();
    let (base, top) = chain(dir.path());
    let l = layer("n-reopen", &top, &base);
    start_on(&l, "r1", JobKind::Commit);
    wait_for("r1", JobState::Ready);
    // The old graph let go; a new one opens the node: the job stops and
    // is forgotten (ENOENT: the manager starts it again on the new graph).
    drop(l);
    release_node("n-reopen").unwrap();
    assert_eq!(status("r1").unwrap_err().errno, Errno::ENOENT);
    let l = layer("n-reopen", &top, &base);
    start_on(&l, "r1", JobKind::Commit);
    wait_for("r1", JobState::Ready);
    release_node("n-other").unwrap();
    assert_eq!(status("r1").unwrap().state, JobState::Ready as i32);
}
