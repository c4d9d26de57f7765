//! The zone layer's stage.

use blkmesh_ipc::ring::{Op, Segment};

use crate::errno::Errno;
use crate::graph::ZoneAccess;
use crate::slot::InFlight;
use crate::stages::{self, Verdict};
use crate::zoned::{self, Action, WriteKind, ZoneError, ZoneLayer, ZoneView};

/// Scratch space of the zone stage (zone reports), reused.
#[derive(Debug, Default)]
pub(super) struct ZoneScratch {
    views: Vec<ZoneView>,
    report: Vec<u8>,
}

/// How soon a write to a busy zone of a zoned device is tried again.
const ZONE_RETRY_NS: u64 = 20_000;

/// The zone layer's part of a request at its stage: reserve a write (an
/// append learns where it lands and becomes a write there), answer a report
/// or a management request.
pub(super) fn step(
    layer: &ZoneLayer,
    access: Option<&ZoneAccess>,
    request: &mut InFlight,
    segs: &[Segment],
    offset: &mut u64,
    scratch: &mut ZoneScratch,
) -> Verdict {
    let Some(access) = access else {
        return Verdict::Fail(Errno::EIO);
    };
    let (views, buf) = (&mut scratch.views, &mut scratch.report);
    let op = request.op;
    let done =
        |r: Result<(), ZoneError>| Verdict::Done(r.map_or_else(ZoneError::ring_result, |()| 0));
    match op {
        // A flush syncs the zone state once the leaf flushed (`complete`).
        Op::Read | Op::GetId | Op::Flush => Verdict::Pass,
        Op::Discard => Verdict::Fail(Errno::EOPNOTSUPP),
        Op::Write | Op::WriteZeroes | Op::ZoneAppend => {
            let kind = if op == Op::ZoneAppend {
                WriteKind::Append
            } else {
                WriteKind::Write
            };
            match layer.begin_write(kind, *offset, request.len) {
                Ok(t) => {
                    *offset = t.offset;
                    if op == Op::ZoneAppend {
                        request.op = Op::Write;
                        request.extra = t.offset - access.shift;
                    }
                    request.zone = Some(t);
                    Verdict::Pass
                }
                Err(ZoneError::Busy) => Verdict::RetryAt(stages::now() + ZONE_RETRY_NS),
                Err(e) => Verdict::Done(e.ring_result()),
            }
        }
        Op::ZoneReport => {
            let zone = (*offset / layer.geometry().zone_size) as u32;
            let room = usize::try_from(request.len).unwrap_or(usize::MAX);
            views.clear();
            let end = access.first + access.count;
            if let Err(e) = layer.report(zone, end, room.saturating_sub(64) / 64, views) {
                return Verdict::Done(e.ring_result());
            }
            let n = zoned::encode_report(views, access.shift, room, buf);
            let ram = &request.ram;
            let mut at = 0;
            for s in segs {
                if at == n {
                    break;
                }
                match ram.ram().buf(s) {
                    Ok(b) => at += b.copy_from(&buf[at..n]),
                    Err(_) => return Verdict::Fail(Errno::EFAULT),
                }
            }
            request.extra = n as u64;
            Verdict::Done(0)
        }
        Op::ZoneOpen | Op::ZoneClose | Op::ZoneFinish | Op::ZoneReset => {
            let action = match op {
                Op::ZoneOpen => Action::Open,
                Op::ZoneClose => Action::Close,
                Op::ZoneFinish => Action::Finish,
                _ => Action::Reset,
            };
            done(layer.manage(action, *offset).map(|_| ()))
        }
        Op::ZoneResetAll => done(layer.reset_all(access.zones())),
    }
}
