use blkmesh_ipc::ring::zone_status;
use blkmesh_proto::v1::ZoneModel;
use std::io;

use crate::errno::Errno;
use std::path::Path;

use super::metadata::le64;
use super::*;

#[test]
fn report_encoding() {
    let views = [ZoneView {
        start: 1 << 20,
        len: 1 << 20,
        capacity: 1 << 19,
        wp: (1 << 20) + 4096,
        zone_type: TYPE_SEQ_REQUIRED,
        cond: Cond::ImplicitOpen,
    }; 3];
    let mut out = Vec::new();
    // Room for the header and two descriptors (and a bit).
    assert_eq!(encode_report(&views, 1 << 20, 64 + 128 + 63, &mut out), 192);
    assert_eq!(le64(&out[0..]), 2);
    assert!(out[8..64].iter().all(|&b| b == 0));
    let d = &out[64..128];
    assert_eq!(le64(&d[0..]), (1 << 19) / 512);
    assert_eq!(le64(&d[8..]), 0);
    assert_eq!(le64(&d[16..]), 8);
    assert_eq!((d[24], d[25]), (2, 2));
    assert!(d[26..].iter().all(|&b| b == 0));
}

#[test]
fn sysfs_probe() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("block/nvme0n2/queue");
    std::fs::create_dir_all(&q).unwrap();
    let put = |n: &str, v: &str| std::fs::write(q.join(n), v).unwrap();
    put("zoned", "none\n");
    assert_eq!(probe_queue(&q), None);
    assert!(!nvme_generic_is_zoned(dir.path(), Path::new("/dev/ng0n2")));
    put("zoned", "host-managed\n");
    put("chunk_sectors", "524288\n");
    put("nr_zones", "3688\n");
    put("max_open_zones", "14\n");
    put("max_active_zones", "14\n");
    put("zone_write_granularity", "4096\n");
    assert_eq!(
        probe_queue(&q),
        Some(SysZoned {
            model: ZoneModel::HostManaged,
            zone_size: 256 << 20,
            nr_zones: 3688,
            max_open: 14,
            max_active: 14,
            granularity: 4096,
        })
    );
    assert!(nvme_generic_is_zoned(dir.path(), Path::new("/dev/ng0n2")));
    assert!(!nvme_generic_is_zoned(dir.path(), Path::new("/dev/ng1n1")));
    // A regular file is never a zoned device.
    let f = dir.path().join("img");
    std::fs::write(&f, b"").unwrap();
    assert_eq!(probe_block_device(dir.path(), &f), None);
}

#[test]
fn errno_mapping() {
    assert_eq!(ZoneError::InvalidCmd.errno().get(), libc::EBADRQC);
    assert_eq!(ZoneError::UnalignedWp.errno().get(), libc::EILSEQ);
    assert_eq!(ZoneError::OpenResource.errno().get(), libc::ETOOMANYREFS);
    assert_eq!(ZoneError::ActiveResource.errno().get(), libc::EOVERFLOW);
    assert_eq!(ZoneError::BadOffset.errno().get(), libc::EINVAL);
    assert_eq!(ZoneError::BadOffset.ring_result(), zone_status::INVALID_CMD);
    assert_eq!(ZoneError::Io(Errno::EIO).ring_result(), -libc::EIO);
    assert_eq!(
        ZoneError::from_io(&io::Error::from_raw_os_error(libc::ETOOMANYREFS)),
        ZoneError::OpenResource
    );
}
