//! Virtio 1.0 over PCI (modern interface) and the virtio-net device.

pub mod net;
pub mod transport;

pub use transport::{IoEventRegistry, NoIoEvents};

use virtio_bindings::virtio_config as cfg;
use virtio_bindings::virtio_ring as ring;

// Device status bits (virtio 1.0, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = cfg::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
pub const STATUS_DRIVER: u8 = cfg::VIRTIO_CONFIG_S_DRIVER as u8;
pub const STATUS_DRIVER_OK: u8 = cfg::VIRTIO_CONFIG_S_DRIVER_OK as u8;
pub const STATUS_FEATURES_OK: u8 = cfg::VIRTIO_CONFIG_S_FEATURES_OK as u8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = cfg::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
pub const STATUS_FAILED: u8 = cfg::VIRTIO_CONFIG_S_FAILED as u8;

// Feature bits as masks (virtio-bindings gives bit numbers).
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << ring::VIRTIO_RING_F_EVENT_IDX;
pub const VIRTIO_F_VERSION_1: u64 = 1 << cfg::VIRTIO_F_VERSION_1;

/// No MSI-X vector assigned.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
