//! Virtio 1.0 over PCI (modern interface) and the virtio-net device.

pub mod net;
pub mod transport;

pub use transport::{IoEventRegistry, NoIoEvents};

// Device status bits (virtio 1.0, 2.1).
pub const STATUS_ACKNOWLEDGE: u8 = 1;
pub const STATUS_DRIVER: u8 = 2;
pub const STATUS_DRIVER_OK: u8 = 4;
pub const STATUS_FEATURES_OK: u8 = 8;
pub const STATUS_DEVICE_NEEDS_RESET: u8 = 0x40;
pub const STATUS_FAILED: u8 = 0x80;

pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// No MSI-X vector assigned.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
