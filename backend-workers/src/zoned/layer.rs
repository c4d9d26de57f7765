//! The zone layer of a graph: an emulated zoned node or a zoned device,
//! one interface for the stage and the control channel.

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use blkmesh_proto::v1::ZoneModel;

use super::device::ZonedDevice;
use super::emulated::ZonedState;
use super::types::{Action, Geometry, Ticket, WriteKind, ZoneError, ZoneLimits, ZoneView};
use crate::errno::{Errno, OpenError};

/// The zone layer of a graph.
#[derive(Debug)]
pub enum ZoneLayer {
    Emulated(ZonedState),
    Device(ZonedDevice),
}

impl ZoneLayer {
    pub fn geometry(&self) -> Geometry {
        match self {
            ZoneLayer::Emulated(s) => s.geometry(),
            ZoneLayer::Device(d) => d.geo,
        }
    }

    pub fn limits(&self) -> ZoneLimits {
        match self {
            ZoneLayer::Emulated(s) => s.limits(),
            ZoneLayer::Device(d) => d.limits,
        }
    }

    pub fn model(&self) -> ZoneModel {
        match self {
            ZoneLayer::Emulated(_) => ZoneModel::HostManaged,
            ZoneLayer::Device(d) => d.model,
        }
    }

    /// Up to `max` zones from zone `first`, stopping before zone `end`.
    pub fn report(
        &self,
        first: u32,
        end: u32,
        max: usize,
        out: &mut Vec<ZoneView>,
    ) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => {
                s.report(first, end, max, out);
                Ok(())
            }
            ZoneLayer::Device(d) => d.report(first, end, max, out),
        }
    }

    /// Applies `action` to the zone starting at `offset`; the zone after it.
    pub fn manage(&self, action: Action, offset: u64) -> Result<ZoneView, ZoneError> {
        let geo = self.geometry();
        let z = geo.zone_of(offset).ok_or(ZoneError::BadOffset)?;
        if offset != geo.start(z) {
            return Err(ZoneError::BadOffset);
        }
        match self {
            ZoneLayer::Emulated(s) => s.manage(action, z),
            ZoneLayer::Device(d) => d.manage(action, z),
        }
    }

    /// Resets every zone of `zones` that can be.
    pub fn reset_all(&self, zones: Range<u32>) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.reset_all(zones),
            ZoneLayer::Device(d) => d.reset_all(zones),
        }
    }

    /// Checks and reserves a write of `len` bytes at `offset` (layer
    /// coordinates; for an append, the zone start).
    pub fn begin_write(&self, kind: WriteKind, offset: u64, len: u64) -> Result<Ticket, ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.begin_write(kind, offset, len),
            ZoneLayer::Device(d) => d.begin_write(kind, offset, len),
        }
    }

    /// A reserved write completed (`ok`) or failed. An error means the
    /// zone state could not be recorded (the write should fail).
    pub fn end_write(&self, t: &Ticket, ok: bool) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.end_write(t, ok),
            ZoneLayer::Device(d) => {
                d.end_write(t, ok);
                Ok(())
            }
        }
    }

    /// Makes recorded zone state durable (flush, FUA).
    pub fn sync(&self) -> Result<(), ZoneError> {
        match self {
            ZoneLayer::Emulated(s) => s.sync(),
            ZoneLayer::Device(_) => Ok(()),
        }
    }
}

/// Writes `views` (zones `start` shifted down by `shift`) as virtio-blk's
/// `struct virtio_blk_zone_report` into `out`, as many as fit in `room`
/// bytes; returns the bytes written. `room` must hold the 64-byte header.
pub fn encode_report(views: &[ZoneView], shift: u64, room: usize, out: &mut Vec<u8>) -> usize {
    let n = views.len().min(room.saturating_sub(64) / 64);
    out.clear();
    out.resize(64 + 64 * n, 0);
    out[..8].copy_from_slice(&(n as u64).to_le_bytes());
    for (i, v) in views[..n].iter().enumerate() {
        let d = &mut out[64 + 64 * i..128 + 64 * i];
        d[0..8].copy_from_slice(&(v.capacity / 512).to_le_bytes());
        d[8..16].copy_from_slice(&((v.start - shift) / 512).to_le_bytes());
        d[16..24].copy_from_slice(&(v.wp.saturating_sub(shift) / 512).to_le_bytes());
        d[24] = v.zone_type;
        d[25] = v.cond as u8;
    }
    out.len()
}

/// The emulated zone layers of this process, by metadata path: every graph
/// that uses a node shares its state (queues of one export on several
/// connections, a reopened graph and the one it replaces).
fn registry() -> &'static Mutex<HashMap<PathBuf, Weak<ZoneLayer>>> {
    static R: OnceLock<Mutex<HashMap<PathBuf, Weak<ZoneLayer>>>> = OnceLock::new();
    R.get_or_init(Default::default)
}

/// The zone layer of emulated zoned node `node` (its metadata at `path`),
/// shared with the graphs of this process that already use it.
pub fn open_emulated(
    node: &str,
    path: &Path,
    geo: Geometry,
    limits: ZoneLimits,
) -> Result<Arc<ZoneLayer>, OpenError> {
    let mut reg = registry().lock().unwrap_or_else(|p| p.into_inner());
    reg.retain(|_, w| w.strong_count() > 0);
    if let Some(layer) = reg.get(path).and_then(Weak::upgrade) {
        if layer.geometry() != geo {
            return Err(OpenError::new(
                Errno::EBUSY,
                format!(
                    "node {node}: zone metadata {} is in use by an open graph with another \
                     zone geometry",
                    path.display()
                ),
            ));
        }
        if let ZoneLayer::Emulated(s) = &*layer {
            s.set_limits(limits);
        }
        return Ok(layer);
    }
    let state =
        ZonedState::open(path, geo, limits).map_err(|e| e.context(format_args!("node {node}")))?;
    let layer = Arc::new(ZoneLayer::Emulated(state));
    reg.insert(path.to_path_buf(), Arc::downgrade(&layer));
    Ok(layer)
}
