//! The frontend's side of the control channel: what it makes of a
//! worker's reply.

use blkmesh_frontend::config::BlkConfig;
use blkmesh_proto::ipc::v1 as ipc;

use crate::Reader;

/// The frontend's use of a worker's reply (workers.rs, export.rs).
pub(super) fn frontend_reply(r: &mut Reader<'_>, reply: ipc::Reply) {
    use ipc::reply::Result as R;
    match reply.result {
        Some(R::Opened(o)) => {
            let limits = o.limits.unwrap_or_default();
            let lbs = match r.u8() % 4 {
                0 => 512,
                1 => 4096,
                2 => limits.logical_block_size,
                _ => r.u32(),
            };
            let cfg = BlkConfig {
                num_queues: 1 + (r.u8() % 64) as u16,
                queue_size: 256,
                logical_block_size: if lbs == 0 { 512 } else { lbs },
                writable: r.bool(),
                limits,
            };
            let seg_max = cfg.seg_max();
            assert!((1..=126).contains(&seg_max), "seg_max {seg_max}");
            let _ = cfg.features();
            let c = cfg.config_space();
            assert_eq!(c.capacity.to_native(), limits.size / 512);
            let _ = (
                cfg.max_discard_sectors(),
                cfg.max_write_zeroes_sectors(),
                cfg.read_only(),
            );
        }
        Some(R::Failure(f)) => {
            let _ = format!("worker refused: {} (errno {})", f.message, f.errno);
        }
        Some(R::Ok(_)) | Some(R::Zones(_)) | Some(R::Job(_)) | None => {}
    }
}
