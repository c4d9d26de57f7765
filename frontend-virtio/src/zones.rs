//! Zone commands from the manager (the gRPC `ZoneService`), forwarded as
//! a `zone_command` on the frontend's agent session: the frontend runs them
//! on the export's worker with the control message `ZoneRequest` (not
//! through the rings) and answers with a `zone_answer` carrying the
//! command's id.
//!
//! Reports are fetched in chunks of at most [`CHUNK`] zones per control
//! message, so a reply stays well within one datagram
//! ([`blkmesh_ipc::channel::MAX_MESSAGE`]); a command asks for at most
//! [`MAX_ZONES`].

use std::sync::Arc;
use std::time::Duration;

use blkmesh_proto::agent::v1::zone_answer::Result as Done;
use blkmesh_proto::agent::v1::{ZoneCommand, ZoneError};
use blkmesh_proto::ipc::v1 as ipc;
use blkmesh_proto::v1::{ReportZonesResponse, Zone, ZoneAction, ZoneInfo};

use crate::workers::{LinkError, WorkerLinks};

/// Most zones one report returns (also what `max_zones` 0 means).
pub const MAX_ZONES: u32 = 4096;
/// Most zones asked of the worker in one control message.
pub const CHUNK: u32 = 1024;
/// How long a command waits for a worker that is being replaced.
const FAILOVER_WAIT: Duration = Duration::from_secs(3);

/// What a zone command runs against: the export's worker links and its
/// zone geometry as the workers reported it.
#[derive(Clone)]
pub struct ZoneTarget {
    pub links: Arc<WorkerLinks>,
    pub info: ZoneInfo,
    /// Bytes.
    pub capacity: u64,
}

fn error(errno: i32, message: impl Into<String>) -> Done {
    Done::Error(ZoneError {
        errno,
        message: message.into(),
    })
}

/// A worker's refusal keeps its errno and reason; anything else about the
/// link is the frontend's I/O error (EAGAIN while a dead worker is being
/// replaced).
fn link_error(e: &LinkError) -> Done {
    match e {
        LinkError::Refused { errno, message, .. } => error(*errno, message.clone()),
        LinkError::Dead { .. } => error(libc::EAGAIN, crate::error_chain(e)),
        LinkError::Protocol { .. } => error(libc::EPROTO, crate::error_chain(e)),
        _ => error(libc::EIO, crate::error_chain(e)),
    }
}

/// The action of a command, or why it has none we know.
fn action_of(cmd: &ZoneCommand) -> Result<ZoneAction, Done> {
    ZoneAction::try_from(cmd.action)
        .map_err(|_| error(libc::EINVAL, format!("unknown zone action {}", cmd.action)))
}

/// Runs `cmd` on `target` (`Err` when the export cannot take zone
/// commands) and returns the zone answer for the manager. Blocking.
pub fn run(target: Result<ZoneTarget, Done>, cmd: &ZoneCommand) -> Done {
    let t = match target {
        Ok(t) => t,
        Err(e) => return e,
    };
    let action = match action_of(cmd) {
        Ok(a) => a,
        Err(e) => return e,
    };
    match action {
        ZoneAction::Unspecified => report(&t, cmd.offset, cmd.max_zones),
        ZoneAction::ResetAll => act(&t, action, 0),
        _ => {
            if cmd.offset >= t.capacity {
                return error(
                    libc::EINVAL,
                    format!(
                        "offset {} is past the end of the export ({} bytes)",
                        cmd.offset, t.capacity
                    ),
                );
            }
            if t.info.zone_size == 0 || cmd.offset % t.info.zone_size != 0 {
                return error(
                    libc::EINVAL,
                    format!(
                        "offset {} is not the start of a zone (zone size {})",
                        cmd.offset, t.info.zone_size
                    ),
                );
            }
            act(&t, action, cmd.offset)
        }
    }
}

fn act(t: &ZoneTarget, action: ZoneAction, offset: u64) -> Done {
    let req = ipc::ZoneRequest {
        action: action as i32,
        offset,
        max_zones: 0,
    };
    match t.links.zone(0, req, FAILOVER_WAIT) {
        // The zone after the action; none for reset-all.
        Ok(zones) => Done::Zone(zones.into_iter().next().unwrap_or_default()),
        Err(e) => link_error(&e),
    }
}

/// Up to `max` zones from the one holding `offset`, in chunks of at most
/// [`CHUNK`] per control message, from the worker of `queue` (waiting up
/// to `wait` for one being replaced).
fn fetch(
    links: &WorkerLinks,
    queue: u32,
    wait: Duration,
    offset: u64,
    max: u32,
    capacity: u64,
) -> Result<Vec<Zone>, LinkError> {
    let mut zones: Vec<Zone> = Vec::new();
    let mut next = offset;
    while (zones.len() as u32) < max {
        let want = CHUNK.min(max - zones.len() as u32);
        let req = ipc::ZoneRequest {
            action: ZoneAction::Unspecified as i32,
            offset: next,
            max_zones: want,
        };
        let got = links.zone(queue, req, wait)?;
        if got.is_empty() {
            break;
        }
        // The worker may return fewer zones than asked (as many as one
        // message carries): go on from the zone after the last. It is not
        // trusted to stop: never more than asked for, and the next chunk
        // must start past this one.
        zones.extend(got.into_iter().take(want as usize));
        let Some(end) = zones.last().and_then(|z| z.start.checked_add(z.length)) else {
            break;
        };
        if end <= next || end >= capacity {
            break;
        }
        next = end;
    }
    Ok(zones)
}

/// After a failover, tells which writes the lost worker applied: asks the
/// replacement worker of `queue` for the zones holding them. See
/// [`crate::vring::WorkerEnds::zones`].
#[derive(Clone)]
pub struct ZoneOracle {
    pub links: Arc<WorkerLinks>,
    pub queue: u32,
}

impl std::fmt::Debug for ZoneOracle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneOracle")
            .field("queue", &self.queue)
            .finish_non_exhaustive()
    }
}

impl ZoneOracle {
    /// The sequential zones holding `offsets` with their write pointers,
    /// one small report per zone; zones the worker does not answer about
    /// are left out (their writes are resubmitted).
    pub fn map(&self, offsets: impl IntoIterator<Item = u64>) -> ZoneMap {
        use blkmesh_proto::v1::{ZoneCondition, ZoneType};
        let mut map = ZoneMap::default();
        for off in offsets {
            if map.zone_of(off).is_some() {
                continue;
            }
            let zones = match fetch(&self.links, self.queue, Duration::ZERO, off, 1, u64::MAX) {
                Ok(z) => z,
                Err(e) => {
                    tracing::warn!(
                        queue = self.queue,
                        offset = off,
                        "zone write pointer after failover: {e}"
                    );
                    continue;
                }
            };
            // Only a sequential zone holding `off`, with a write pointer
            // that means something.
            let Some(z) = zones.into_iter().next().filter(|z| {
                z.start <= off
                    && off - z.start < z.length
                    && z.r#type != ZoneType::Conventional as i32
                    && z.condition != ZoneCondition::ReadOnly as i32
                    && z.condition != ZoneCondition::Offline as i32
            }) else {
                continue;
            };
            let i = map.0.partition_point(|e| e.0 < z.start);
            map.0.insert(
                i,
                (z.start, z.start.saturating_add(z.length), z.write_pointer),
            );
        }
        map
    }
}

/// Zones as (start, end, write pointer) in bytes, sorted by start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneMap(pub Vec<(u64, u64, u64)>);

impl ZoneMap {
    /// The zone holding `offset`.
    fn zone_of(&self, offset: u64) -> Option<(u64, u64, u64)> {
        let i = self.0.partition_point(|z| z.0 <= offset);
        let z = *self.0.get(i.checked_sub(1)?)?;
        (offset < z.1).then_some(z)
    }

    /// Whether `[offset, offset + len)` lies in one zone, below its write
    /// pointer: data a zoned node has written (it never moves a write
    /// pointer past data that was not).
    pub fn written(&self, offset: u64, len: u64) -> bool {
        let Some(end) = offset.checked_add(len) else {
            return false;
        };
        self.zone_of(offset)
            .is_some_and(|(_, zend, wp)| end <= zend && end <= wp)
    }
}

fn report(t: &ZoneTarget, offset: u64, max_zones: u32) -> Done {
    if offset >= t.capacity {
        return error(
            libc::EINVAL,
            format!(
                "offset {offset} is past the end of the export ({} bytes)",
                t.capacity
            ),
        );
    }
    let max = match max_zones {
        0 => MAX_ZONES,
        n => n.min(MAX_ZONES),
    };
    let zones = match fetch(&t.links, 0, FAILOVER_WAIT, offset, max, t.capacity) {
        Ok(z) => z,
        Err(e) => return link_error(&e),
    };
    Done::Report(ReportZonesResponse {
        info: Some(t.info),
        zones,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_errors_keep_the_workers_errno() {
        let refused = LinkError::Refused {
            worker: "w0".into(),
            errno: libc::EBUSY,
            message: "zone 3 is full".into(),
        };
        assert_eq!(
            link_error(&refused),
            error(libc::EBUSY, "zone 3 is full".to_string())
        );
        let dead = LinkError::Dead {
            worker: "w0".into(),
        };
        assert!(matches!(link_error(&dead), Done::Error(e) if e.errno == libc::EAGAIN));
    }

    #[test]
    fn zone_map_knows_written_ranges() {
        let m = ZoneMap(vec![(0, 100, 40), (100, 200, 100), (200, 300, 300)]);
        assert!(m.written(0, 40));
        assert!(m.written(8, 16));
        assert!(!m.written(32, 16), "crosses the write pointer");
        assert!(!m.written(100, 8), "an empty zone");
        assert!(m.written(250, 50), "a full zone");
        assert!(!m.written(90, 20), "crosses zones");
        assert!(!m.written(300, 1), "past the end");
        assert!(!m.written(u64::MAX, 2));
        assert!(!ZoneMap::default().written(0, 1));
    }

    #[test]
    fn unknown_actions_are_einval() {
        let cmd = ZoneCommand {
            action: 99,
            ..Default::default()
        };
        assert!(matches!(action_of(&cmd), Err(Done::Error(e)) if e.errno == libc::EINVAL));
        // Not zoned (or unknown export): the caller's error is the answer.
        let not_zoned = error(libc::ENOTSUP, "not zoned");
        assert_eq!(run(Err(not_zoned.clone()), &cmd), not_zoned);
    }
}
