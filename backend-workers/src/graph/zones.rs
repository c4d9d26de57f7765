//! The zone layer of a graph, built once the walk reached the leaf: an
//! emulation over a regular child (a `zoned` node), or a zoned device passed
//! through; and the export's view of it, through the windows above.

use std::path::Path;
use std::sync::Arc;

use blkmesh_proto::ipc::v1::Limits;
use blkmesh_proto::v1::{ZoneInfo, ZonedOptions};

use super::limits::fit_window;
use super::types::{ZoneAccess, DEFAULT_MAX_APPEND};
use crate::errno::OpenError;
use crate::zoned::{self, Geometry, SysZoned, ZoneLayer, ZoneLimits, ZonedDevice};

/// The raw windows above a zone layer, in its coordinates.
pub(super) struct ZoneWindows<'a> {
    /// The raw nodes: (name, offset, size).
    pub raws: Vec<(&'a str, u64, u64)>,
    /// Where the export starts in the layer, and how large it may be.
    pub base: u64,
    pub window: Option<u64>,
}

/// Largest zone append: a zone's capacity, bounded by the graph's maximum
/// transfer (or [`DEFAULT_MAX_APPEND`] without one) so that an append
/// reaches the leaf as one request; a multiple of `granularity`.
pub(super) fn max_append(capacity: u64, max_transfer: u64, granularity: u32) -> u64 {
    let g = granularity.max(1) as u64;
    let m = capacity.min(if max_transfer == 0 {
        DEFAULT_MAX_APPEND
    } else {
        max_transfer
    });
    (m - m % g).max(g)
}

/// The zone layer of `zoned` node `name` over a regular child of
/// `child_size` bytes.
pub(super) fn emulated_layer(
    name: &str,
    o: &ZonedOptions,
    child_size: u64,
    lbs: u32,
    max_transfer: u64,
) -> Result<Arc<ZoneLayer>, OpenError> {
    let zone_size = o.zone_size;
    let capacity = if o.zone_capacity == 0 {
        zone_size
    } else {
        o.zone_capacity
    };
    let nr = child_size / zone_size;
    if nr == 0 {
        return Err(OpenError::inval(format!(
            "node {name}: its child has {child_size} bytes, less than one zone of {zone_size}"
        )));
    }
    if nr > zoned::MAX_ZONES {
        return Err(OpenError::inval(format!(
            "node {name}: {nr} zones of {zone_size} bytes are more than the {} supported; \
             use larger zones",
            zoned::MAX_ZONES
        )));
    }
    let geo = Geometry {
        zone_size,
        capacity,
        nr_zones: nr as u32,
    };
    let zl = ZoneLimits {
        granularity: lbs,
        max_append: max_append(capacity, max_transfer, lbs),
        max_open: o.max_open_zones,
        max_active: o.max_active_zones,
    };
    zoned::open_emulated(name, Path::new(&o.metadata_path), geo, zl)
}

/// The zone layer of leaf `name`, the zoned device at `path` (of
/// `dev_size` bytes) as `sys` describes it: its whole zones.
pub(super) fn device_layer(
    name: &str,
    path: &str,
    sys: &SysZoned,
    dev_size: u64,
    read_only: bool,
    lbs: u32,
    max_transfer: u64,
) -> Result<Arc<ZoneLayer>, OpenError> {
    if sys.zone_size == 0 || !sys.zone_size.is_power_of_two() || sys.zone_size < 4096 {
        return Err(OpenError::inval(format!(
            "node {name}: zoned device {path} has zones of {} bytes (not a power of two)",
            sys.zone_size
        )));
    }
    let nr = (dev_size / sys.zone_size).min(sys.nr_zones as u64) as u32;
    if nr == 0 {
        return Err(OpenError::inval(format!(
            "node {name}: zoned device {path} has no whole zone"
        )));
    }
    let granularity = sys.granularity.max(lbs);
    let zl = ZoneLimits {
        granularity,
        max_append: max_append(sys.zone_size, max_transfer, granularity),
        max_open: sys.max_open,
        max_active: sys.max_active,
    };
    let dev = ZonedDevice::open(path, sys, nr, read_only, zl)?;
    let zl = ZoneLimits {
        max_append: max_append(dev.geometry().capacity, max_transfer, granularity),
        ..zl
    };
    Ok(Arc::new(ZoneLayer::Device(dev.with_limits(zl))))
}

/// The export's view of a zone layer (its stage at `stage`) whose node
/// `node` sees `windows` above it: every window zone-aligned, the export a
/// whole number of zones. Sets the size, zone info and discard limit.
pub(super) fn zone_access(
    layer: Arc<ZoneLayer>,
    stage: usize,
    node: &str,
    windows: &ZoneWindows<'_>,
    lbs: u32,
    limits: &mut Limits,
) -> Result<ZoneAccess, OpenError> {
    let geo = layer.geometry();
    let zs = geo.zone_size;
    for (raw, offset, size) in &windows.raws {
        if offset % zs != 0 || size % zs != 0 {
            return Err(OpenError::inval(format!(
                "node {raw}: over zoned node {node}, raw offset ({offset}) and size ({size}) must \
                 be multiples of its zone size {zs}"
            )));
        }
    }
    let base = windows.base;
    let size = fit_window(node, geo.nr_zones as u64 * zs, base, windows.window, lbs)?;
    let zl = layer.limits();
    let info = ZoneInfo {
        model: layer.model() as i32,
        zone_size: zs,
        zone_capacity: geo.capacity,
        nr_zones: (size / zs) as u32,
        max_open_zones: zl.max_open,
        max_active_zones: zl.max_active,
        write_granularity: zl.granularity,
        max_append: zl.max_append,
    };
    limits.size = size;
    // Zoned devices take no discard (a reset empties a zone).
    limits.max_discard = 0;
    limits.zones = Some(info);
    Ok(ZoneAccess {
        layer,
        stage,
        shift: base,
        first: (base / zs) as u32,
        count: info.nr_zones,
        info,
    })
}
