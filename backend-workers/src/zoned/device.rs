//! A Linux zoned block device passed through: what sysfs says about it,
//! and its zones through the block layer's ioctls (zone append emulated by
//! writes at the write pointer, one at a time per sequential zone).

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use blkmesh_ipc::zoned_dev::{self, ZoneMgmt};
use blkmesh_proto::v1::ZoneModel;

use super::types::{
    Action, Cond, Geometry, Ticket, WriteKind, ZoneError, ZoneLimits, ZoneView, TYPE_CONVENTIONAL,
};
use crate::errno::{Errno, OpenError};

/// What sysfs says about a zoned block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SysZoned {
    pub model: ZoneModel,
    /// Bytes (`chunk_sectors` × 512).
    pub zone_size: u64,
    pub nr_zones: u32,
    pub max_open: u32,
    pub max_active: u32,
    /// `zone_write_granularity` (0 when absent).
    pub granularity: u32,
}

fn sysfs_u64(dir: &Path, name: &str) -> Option<u64> {
    std::fs::read_to_string(dir.join(name))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Reads a block queue directory (`/sys/dev/block/M:m/queue`); `None` when
/// the device is not zoned.
pub fn probe_queue(queue: &Path) -> Option<SysZoned> {
    let model = match std::fs::read_to_string(queue.join("zoned")).ok()?.trim() {
        "host-managed" => ZoneModel::HostManaged,
        "host-aware" => ZoneModel::HostAware,
        _ => return None,
    };
    let zone_size = sysfs_u64(queue, "chunk_sectors")? * 512;
    let nr_zones = sysfs_u64(queue, "nr_zones")?;
    Some(SysZoned {
        model,
        zone_size,
        nr_zones: u32::try_from(nr_zones).unwrap_or(u32::MAX),
        max_open: sysfs_u64(queue, "max_open_zones").unwrap_or(0) as u32,
        max_active: sysfs_u64(queue, "max_active_zones").unwrap_or(0) as u32,
        granularity: sysfs_u64(queue, "zone_write_granularity").unwrap_or(0) as u32,
    })
}

/// The zone model of the block device at `path`, looked up under
/// `sys_root` (`/sys`); `None` for anything that is not a zoned block
/// device (regular files included).
pub fn probe_block_device(sys_root: &Path, path: &Path) -> Option<SysZoned> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.file_type().is_block_device() {
        return None;
    }
    let rdev = meta.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    probe_queue(&sys_root.join(format!("dev/block/{major}:{minor}/queue")))
}

/// Whether an NVMe generic character device (`/dev/ngXnY`) is a zoned
/// (ZNS) namespace, by its block device's sysfs entry (`nvmeXnY`).
pub fn nvme_generic_is_zoned(sys_root: &Path, path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    let Some(rest) = name.strip_prefix("ng") else {
        return false;
    };
    probe_queue(&sys_root.join(format!("block/nvme{rest}/queue"))).is_some()
}

/// Zone tracking of a device: appends are emulated by writes at the write
/// pointer, so one write at a time per sequential zone.
#[derive(Clone, Copy, Debug, Default)]
struct DevZone {
    conventional: bool,
    /// Writable bytes.
    capacity: u64,
    /// Bytes from the zone start; `None` = unknown (ask the device).
    wp: Option<u64>,
    /// A write is in flight.
    busy: bool,
}

/// A Linux zoned block device passed through.
pub struct ZonedDevice {
    file: File,
    path: String,
    pub(super) geo: Geometry,
    pub(super) model: ZoneModel,
    pub(super) limits: ZoneLimits,
    zones: Mutex<Vec<DevZone>>,
}

impl std::fmt::Debug for ZonedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZonedDevice")
            .field("path", &self.path)
            .field("geo", &self.geo)
            .finish_non_exhaustive()
    }
}

fn dev_view(z: &zoned_dev::BlkZone) -> ZoneView {
    ZoneView {
        start: z.start * 512,
        len: z.len * 512,
        capacity: z.capacity * 512,
        wp: z.wp * 512,
        zone_type: z.zone_type,
        cond: Cond::from_u8(z.cond).unwrap_or(Cond::Offline),
    }
}

fn dev_wp(z: &zoned_dev::BlkZone) -> Option<u64> {
    let writable = z.zone_type != TYPE_CONVENTIONAL
        && !matches!(
            Cond::from_u8(z.cond),
            Some(Cond::Full | Cond::ReadOnly | Cond::Offline) | None
        );
    writable.then(|| z.wp.saturating_sub(z.start) * 512)
}

impl ZonedDevice {
    /// Opens `path` (a zoned block device `sys` describes) for zone
    /// operations, with `nr_zones` whole zones exposed, and reads its zones.
    pub fn open(
        path: &str,
        sys: &SysZoned,
        nr_zones: u32,
        read_only: bool,
        limits: ZoneLimits,
    ) -> Result<ZonedDevice, OpenError> {
        let fail =
            |e: io::Error| OpenError::new(Errno::of_io(&e), format!("zoned device {path}: {e}"));
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)
            .map_err(fail)?;
        let zone_sectors = sys.zone_size / 512;
        let mut zones = Vec::with_capacity(nr_zones as usize);
        while zones.len() < nr_zones as usize {
            let sector = zones.len() as u64 * zone_sectors;
            let want = (nr_zones as usize - zones.len()).min(zoned_dev::MAX_REPORT as usize);
            let got = zoned_dev::report_zones(file.as_fd(), sector, want as u32).map_err(fail)?;
            if got.is_empty() {
                return Err(OpenError::new(
                    Errno::EIO,
                    format!("zoned device {path}: reported no zone at sector {sector}"),
                ));
            }
            for z in got.iter().take(want) {
                zones.push(DevZone {
                    conventional: z.zone_type == TYPE_CONVENTIONAL,
                    capacity: z.capacity * 512,
                    wp: dev_wp(z),
                    busy: false,
                });
            }
        }
        let capacity = zones
            .iter()
            .find(|z| !z.conventional)
            .map_or(sys.zone_size, |z| z.capacity);
        Ok(ZonedDevice {
            file,
            path: path.to_string(),
            geo: Geometry {
                zone_size: sys.zone_size,
                capacity,
                nr_zones,
            },
            model: sys.model,
            limits,
            zones: Mutex::new(zones),
        })
    }

    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// Replaces the limits (granularity, append size, open / active zones).
    pub fn with_limits(self, limits: ZoneLimits) -> ZonedDevice {
        ZonedDevice { limits, ..self }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<DevZone>> {
        self.zones.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report_one(&self, z: usize) -> Result<zoned_dev::BlkZone, ZoneError> {
        let sector = self.geo.start(z) / 512;
        zoned_dev::report_zones(self.file.as_fd(), sector, 1)
            .map_err(|e| ZoneError::from_io(&e))?
            .into_iter()
            .next()
            .ok_or(ZoneError::Io(Errno::EIO))
    }

    pub(super) fn report(
        &self,
        first: u32,
        end: u32,
        max: usize,
        out: &mut Vec<ZoneView>,
    ) -> Result<(), ZoneError> {
        let end = end.min(self.geo.nr_zones);
        let mut z = first;
        let mut left = max;
        while z < end && left > 0 {
            let want = ((end - z) as usize)
                .min(left)
                .min(zoned_dev::MAX_REPORT as usize);
            let sector = self.geo.start(z as usize) / 512;
            let got = zoned_dev::report_zones(self.file.as_fd(), sector, want as u32)
                .map_err(|e| ZoneError::from_io(&e))?;
            if got.is_empty() {
                break;
            }
            for d in got.iter().take(want) {
                out.push(dev_view(d));
            }
            let n = got.len().min(want);
            z += n as u32;
            left -= n;
        }
        Ok(())
    }

    pub(super) fn manage(&self, action: Action, z: usize) -> Result<ZoneView, ZoneError> {
        let op = match action {
            Action::Open => ZoneMgmt::Open,
            Action::Close => ZoneMgmt::Close,
            Action::Finish => ZoneMgmt::Finish,
            Action::Reset => ZoneMgmt::Reset,
        };
        let sector = self.geo.start(z) / 512;
        let result = zoned_dev::zone_mgmt(self.file.as_fd(), op, sector, self.geo.zone_size / 512);
        // Whatever happened, ask the device where the write pointer is.
        let d = self.report_one(z);
        if let Ok(d) = &d {
            self.lock()[z].wp = dev_wp(d);
        }
        result.map_err(|e| ZoneError::from_io(&e))?;
        Ok(dev_view(&d?))
    }

    pub(super) fn reset_all(&self, zones: Range<u32>) -> Result<(), ZoneError> {
        let mut result = Ok(());
        for z in zones.start as usize..zones.end.min(self.geo.nr_zones) as usize {
            if self.lock()[z].conventional {
                continue;
            }
            if let Err(e) = self.manage(Action::Reset, z) {
                result = Err(e);
            }
        }
        result
    }

    pub(super) fn begin_write(
        &self,
        kind: WriteKind,
        offset: u64,
        len: u64,
    ) -> Result<Ticket, ZoneError> {
        let geo = self.geo;
        let (z, zstart, rel) = geo.locate(offset)?;
        let mut zones = self.lock();
        let dz = zones[z];
        if dz.conventional {
            if kind == WriteKind::Append {
                return Err(ZoneError::InvalidCmd);
            }
            return Ok(Ticket {
                zone: z as u32,
                offset,
                len,
                gen: 0,
                untracked: true,
            });
        }
        if dz.busy {
            return Err(ZoneError::Busy);
        }
        let wp = match dz.wp {
            Some(w) => w,
            None => {
                let d = self.report_one(z)?;
                zones[z].wp = dev_wp(&d);
                zones[z].wp.ok_or(ZoneError::InvalidCmd)?
            }
        };
        let gran = self.limits.granularity.max(1) as u64;
        let start = match kind {
            WriteKind::Append => {
                if rel != 0 {
                    return Err(ZoneError::BadOffset);
                }
                if len > self.limits.max_append {
                    return Err(ZoneError::InvalidCmd);
                }
                wp
            }
            // Host-aware zones take writes anywhere.
            WriteKind::Write if self.model == ZoneModel::HostAware => rel,
            WriteKind::Write => {
                if rel != wp {
                    return Err(ZoneError::UnalignedWp);
                }
                rel
            }
        };
        if len == 0 || len % gran != 0 || start % gran != 0 {
            return Err(ZoneError::UnalignedWp);
        }
        let end = start.checked_add(len).ok_or(ZoneError::InvalidCmd)?;
        if end > dz.capacity {
            return Err(ZoneError::InvalidCmd);
        }
        zones[z].busy = true;
        zones[z].wp = if start == wp { Some(end) } else { None };
        Ok(Ticket {
            zone: z as u32,
            offset: zstart + start,
            len,
            gen: 0,
            untracked: false,
        })
    }

    pub(super) fn end_write(&self, t: &Ticket, ok: bool) {
        if t.untracked {
            return;
        }
        let mut zones = self.lock();
        let dz = &mut zones[t.zone as usize];
        dz.busy = false;
        if !ok {
            dz.wp = None;
        }
    }
}
