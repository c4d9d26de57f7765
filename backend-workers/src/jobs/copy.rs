//! What the jobs copy, chunk by chunk, and how a commit follows writes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blkmesh_image::{Image, ShallowMapping};
use blkmesh_proto::v1::JobState;

use super::{DirtyMap, Job};
use crate::qcow2::Qcow2Layer;

/// Most bytes copied in one step (and held in the job's buffer). A stream
/// holds its image exclusively for one step, so this bounds how long a
/// guest request can wait behind it.
const CHUNK: u64 = 256 << 10;

/// How often a ready commit looks for new writes when none came.
const FOLLOW_PERIOD: Duration = Duration::from_millis(20);

/// Keeps a copy to its job's speed: after each step, waits until the
/// bytes gone through are no more than the speed allows (waking early to
/// a cancel).
struct Pace {
    start: std::time::Instant,
}

impl Pace {
    fn new() -> Pace {
        Pace {
            start: std::time::Instant::now(),
        }
    }

    fn keep(&self, job: &Job, done: u64) {
        if job.speed == 0 {
            return;
        }
        let due = Duration::from_secs_f64(done as f64 / job.speed as f64);
        while !job.cancelled() {
            let Some(left) = due.checked_sub(self.start.elapsed()) else {
                return;
            };
            job.wait(left);
        }
    }
}

fn io(what: &str, at: u64) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what} at byte {at}: {e}")
}

/// Stream: every range the image reads from its backing chain (and that
/// is not all zeroes there) is written into the image, one chunk at a
/// time with the image held exclusively, so no guest write to the same
/// cluster can come between the read and the write. Then the header
/// names no backing file.
pub(super) fn stream(job: &Job, layer: &Qcow2Layer) -> Result<(), String> {
    let size = layer.size();
    let mut buf = Vec::new();
    let pace = Pace::new();
    let mut at = 0;
    while at < size {
        if job.cancelled() {
            return Ok(());
        }
        pace.keep(job, at);
        let want = CHUNK.min(size - at);
        let n = {
            let image = layer.exclusive();
            let (mapping, n) = image
                .get_shallow_mapping(at, want)
                .map_err(io("mapping", at))?;
            let n = n.min(want);
            let from_backing = matches!(mapping, ShallowMapping::Indirect { .. });
            if n == 0 || matches!(mapping, ShallowMapping::Eof { .. }) {
                break;
            }
            if from_backing {
                buf.resize(n as usize, 0);
                image.read(&mut buf[..], at).map_err(io("reading", at))?;
                if buf.iter().any(|&b| b != 0) {
                    image.write(&buf[..], at).map_err(io("writing", at))?;
                }
            }
            n
        };
        at += n;
        job.set(|p| p.done = at);
    }
    let image = layer.exclusive();
    image
        .flush()
        .and_then(|()| image.sync())
        .map_err(io("flushing", size))?;
    blkmesh_image::drop_backing_file(layer.file())
        .map_err(|e| format!("dropping the backing file from the header: {e}"))?;
    tracing::info!(
        node = layer.node(),
        "stream done: the image names no backing file"
    );
    Ok(())
}

/// Commit: opens the backing image writable, follows the image's writes,
/// copies everything the image holds, then what was written meanwhile,
/// and is READY. Once asked to finish and the old graph let go of the
/// image, copies the last writes and syncs the backing image.
pub(super) fn commit(job: &Job, layer: Arc<Qcow2Layer>) -> Result<(), String> {
    let chain = layer.backing();
    let base = blkmesh_image::open_chain(
        chain
            .iter()
            .enumerate()
            .map(|(i, b)| b.layer(i == 0))
            .collect(),
    )
    .map_err(|e| format!("opening the backing image for writing: {e}"))?;
    let map = Arc::new(DirtyMap::new(layer.size()));
    layer.follow_writes(Some(Arc::clone(&map)));
    let result = follow(job, &layer, &base, &map);
    layer.follow_writes(None);
    result
}

fn follow(job: &Job, layer: &Arc<Qcow2Layer>, base: &Image, map: &DirtyMap) -> Result<(), String> {
    let size = layer.size();
    let mut buf = Vec::new();
    let pace = Pace::new();
    let mut at = 0;
    while at < size {
        if job.cancelled() {
            return Ok(());
        }
        pace.keep(job, at);
        let n = CHUNK.min(size - at);
        copy_allocated(layer, base, at, n, &mut buf)?;
        at += n;
        job.set(|p| p.done = at);
    }
    job.set(|p| {
        if p.state == JobState::Running {
            p.state = JobState::Ready;
        }
    });
    tracing::info!(node = layer.node(), "commit ready: following writes");
    loop {
        if job.cancelled() {
            return Ok(());
        }
        // The old graph let go of the image: nothing writes it any more.
        let last = job.finish.load(Ordering::Relaxed) && Arc::strong_count(layer) == 1;
        let ranges = map.take();
        for &(at, len) in &ranges {
            copy_allocated(layer, base, at, len, &mut buf)?;
        }
        if last {
            base.flush()
                .and_then(|()| base.sync())
                .map_err(io("syncing the backing image", 0))?;
            tracing::info!(
                node = layer.node(),
                "commit done: the backing image holds it all"
            );
            return Ok(());
        }
        if ranges.is_empty() {
            if job.finish.load(Ordering::Relaxed) {
                // Waiting for the old graph to let go: not a busy loop.
                std::thread::sleep(Duration::from_millis(2));
            } else {
                job.wait(FOLLOW_PERIOD);
            }
        }
    }
}

/// Copies what the image itself holds in `len` bytes at `at` (data or
/// explicit zeroes; not what it reads from its backing) into `base`.
fn copy_allocated(
    layer: &Qcow2Layer,
    base: &Image,
    mut at: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    let end = at + len;
    let image = layer.shared();
    while at < end {
        let want = (end - at).min(CHUNK);
        let (mapping, n) = image
            .get_shallow_mapping(at, want)
            .map_err(io("mapping", at))?;
        let n = n.min(want);
        match mapping {
            _ if n == 0 => break,
            ShallowMapping::Eof { .. } => break,
            ShallowMapping::Indirect { .. }
            | ShallowMapping::Zero {
                explicit: false, ..
            } => {}
            ShallowMapping::Zero { .. } => base
                .write_zeroes(at, n)
                .map_err(io("zeroing the backing image", at))?,
            _ => {
                buf.resize(n as usize, 0);
                image.read(&mut buf[..], at).map_err(io("reading", at))?;
                base.write(&buf[..], at)
                    .map_err(io("writing the backing image", at))?;
            }
        }
        at += n;
    }
    Ok(())
}
