//! Refusing a VMM that cannot use the device the export is.

use std::sync::Arc;

use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_ZONED, VIRTIO_BLK_Z_HM};

use crate::config::ZONED_OFFSET;

/// Why a VMM connection is refused: it cannot use the device the export
/// is. vhost-user gives the back-end no FEATURES_OK veto, so the refusal
/// comes at the first message that shows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// A pre-negotiation config read that stops before the zoned
    /// characteristics: the VMM's own config space has no room for them,
    /// so it cannot pass VIRTIO_BLK_F_ZONED on to its guest (QEMU's
    /// vhost-user-blk reads 57 bytes when it starts).
    #[error(
        "host-managed zoned export refused: the VMM's virtio-blk config space ends at byte \
         {end}, before the zoned characteristics (bytes {ZONED_OFFSET}..{ZONED_MODEL_END}), so it \
         cannot pass VIRTIO_BLK_F_ZONED on to its guest, which would see an ordinary disk whose \
         writes fail (QEMU's vhost-user-blk is such a VMM; use one that passes zoned devices \
         through, e.g. a libblkio-based one)"
    )]
    ZonedConfigTooShort { end: u64 },
    /// The driver negotiated without VIRTIO_BLK_F_ZONED: a host-managed
    /// device must then fail FEATURES_OK (virtio 1.3, 5.2.3.1).
    #[error(
        "host-managed zoned export refused: the driver did not accept VIRTIO_BLK_F_ZONED \
         (features {features:#x}), so it would see an ordinary disk whose writes fail \
         (writes must be at a zone's write pointer)"
    )]
    ZonedNotAccepted { features: u64 },
}

/// Told of a refusal (`Some`) and of a VMM whose features were accepted
/// (`None`, which ends an earlier refusal).
pub type RefusalReporter = Arc<dyn Fn(Option<&Refusal>) + Send + Sync>;

/// The end of the zoned characteristics' `model` byte in the config space:
/// a config space shorter than this cannot describe a zoned device.
pub const ZONED_MODEL_END: usize = ZONED_OFFSET + 21;

/// Whether SET_FEATURES with `acked` must be refused for a device that
/// offered `offered` with zoned model `model` (`VIRTIO_BLK_Z_*`): a
/// host-managed device whose driver did not accept VIRTIO_BLK_F_ZONED.
/// A host-aware device serves such a driver as an ordinary disk (writes
/// anywhere are allowed), and a device that is not zoned never needs it.
pub fn refusal_on_features(offered: u64, model: u8, acked: u64) -> Option<Refusal> {
    let zoned = 1u64 << VIRTIO_BLK_F_ZONED;
    (offered & zoned != 0 && acked & zoned == 0 && model == VIRTIO_BLK_Z_HM as u8)
        .then_some(Refusal::ZonedNotAccepted { features: acked })
}

/// Whether a GET_CONFIG of `size` bytes at `offset`, before SET_FEATURES,
/// must be refused: for a host-managed device, a read that ends before
/// the zoned model byte is a VMM whose config space cannot carry it.
pub fn refusal_on_config(offered: u64, model: u8, offset: u32, size: u32) -> Option<Refusal> {
    let end = offset as u64 + size as u64;
    let zoned = offered & (1u64 << VIRTIO_BLK_F_ZONED) != 0;
    (zoned && model == VIRTIO_BLK_Z_HM as u8 && end < ZONED_MODEL_END as u64)
        .then_some(Refusal::ZonedConfigTooShort { end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_Z_HA, VIRTIO_BLK_Z_NONE};
    const ZONED: u64 = 1 << VIRTIO_BLK_F_ZONED;
    const BASE: u64 = 1 << 32 | 1 << 30 | 1 << 9;
    const HM: u8 = VIRTIO_BLK_Z_HM as u8;
    const HA: u8 = VIRTIO_BLK_Z_HA as u8;
    const NONE: u8 = VIRTIO_BLK_Z_NONE as u8;

    #[test]
    fn host_managed_needs_a_driver_that_accepts_zoned() {
        assert_eq!(
            refusal_on_features(BASE | ZONED, HM, BASE),
            Some(Refusal::ZonedNotAccepted { features: BASE })
        );
        assert_eq!(refusal_on_features(BASE | ZONED, HM, BASE | ZONED), None);
    }

    #[test]
    fn host_aware_and_regular_devices_serve_drivers_without_zoned() {
        assert_eq!(refusal_on_features(BASE | ZONED, HA, BASE), None);
        assert_eq!(refusal_on_features(BASE, NONE, BASE), None);
        // Not offered (no valid zone geometry): nothing to refuse.
        assert_eq!(refusal_on_features(BASE, HM, BASE), None);
    }

    #[test]
    fn a_config_space_without_the_zoned_model_is_refused_for_host_managed() {
        // QEMU's vhost-user-blk reads 57 bytes when it starts.
        assert_eq!(
            refusal_on_config(BASE | ZONED, HM, 0, 57),
            Some(Refusal::ZonedConfigTooShort { end: 57 })
        );
        assert!(refusal_on_config(BASE | ZONED, HM, 0, ZONED_MODEL_END as u32).is_none());
        assert!(refusal_on_config(BASE | ZONED, HM, 0, 96).is_none());
        assert!(refusal_on_config(BASE | ZONED, HA, 0, 57).is_none());
        assert!(refusal_on_config(BASE, NONE, 0, 57).is_none());
        // Offsets do not overflow.
        assert!(refusal_on_config(BASE | ZONED, HM, u32::MAX, u32::MAX).is_none());
    }

    #[test]
    fn refusals_name_the_reason() {
        let r = Refusal::ZonedConfigTooShort { end: 57 }.to_string();
        assert!(r.contains("VIRTIO_BLK_F_ZONED") && r.contains("57"), "{r}");
        let r = Refusal::ZonedNotAccepted { features: BASE }.to_string();
        assert!(r.contains("did not accept VIRTIO_BLK_F_ZONED"), "{r}");
    }
}
