//! The virtio PCI transport's layout (virtio 1.0, 4.1): where the common, ISR, device and
//! notify structures live, the vendor capabilities that point at them, and the common
//! configuration register file.

use crate::pci::{PciConfig, PCI_CAP_ID_VNDR};
use std::io;
use vmm_sys_util::eventfd::EventFd;

// Capability types (virtio 1.0, 4.1.4).
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// BAR holding the virtio structures (64-bit memory, as QEMU lays it out), and offsets in it.
pub const VIRTIO_BAR: usize = 4;
pub const VIRTIO_BAR_SIZE: u64 = 0x4000;
pub const COMMON_CFG: u64 = 0x0000;
pub const COMMON_CFG_LEN: u64 = 0x38;
pub const ISR_CFG: u64 = 0x1000;
pub const DEVICE_CFG: u64 = 0x2000;
pub const DEVICE_CFG_LEN: u64 = 0x1000;
pub const NOTIFY_CFG: u64 = 0x3000;
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// BAR holding the MSI-X table and PBA.
pub const MSIX_BAR: usize = 1;
pub const MSIX_BAR_SIZE: u64 = 0x1000;
pub const MSIX_TABLE: u64 = 0;
pub const MSIX_PBA: u64 = 0x800;

// Common configuration registers (virtio 1.0, 4.1.4.3).
pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
pub const DEVICE_FEATURE: u64 = 0x04;
pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
pub const DRIVER_FEATURE: u64 = 0x0c;
pub const MSIX_CONFIG: u64 = 0x10;
pub const NUM_QUEUES: u64 = 0x12;
pub const DEVICE_STATUS: u64 = 0x14;
pub const CONFIG_GENERATION: u64 = 0x15;
pub const QUEUE_SELECT: u64 = 0x16;
pub const QUEUE_SIZE: u64 = 0x18;
pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
pub const QUEUE_ENABLE: u64 = 0x1c;
pub const QUEUE_NOTIFY_OFF: u64 = 0x1e;
pub const QUEUE_DESC: u64 = 0x20;
pub const QUEUE_DRIVER: u64 = 0x28;
pub const QUEUE_DEVICE: u64 = 0x30;

/// Adds the four virtio vendor capabilities to `config`.
pub fn add_capabilities(config: &mut PciConfig) {
    let cap = |kind: u8, offset: u64, length: u64, extra: Option<u32>| {
        let mut b = vec![0u8; if extra.is_some() { 20 } else { 16 }];
        b[0] = PCI_CAP_ID_VNDR;
        b[2] = b.len() as u8;
        b[3] = kind;
        b[4] = VIRTIO_BAR as u8;
        b[8..12].copy_from_slice(&(offset as u32).to_le_bytes());
        b[12..16].copy_from_slice(&(length as u32).to_le_bytes());
        if let Some(x) = extra {
            b[16..20].copy_from_slice(&x.to_le_bytes());
        }
        b
    };
    for body in [
        cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_CFG, COMMON_CFG_LEN, None),
        cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG, 1, None),
        cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_CFG, DEVICE_CFG_LEN, None),
        cap(
            VIRTIO_PCI_CAP_NOTIFY_CFG,
            NOTIFY_CFG,
            0x1000,
            Some(NOTIFY_OFF_MULTIPLIER),
        ),
    ] {
        let mask = vec![0u8; body.len()];
        config.add_capability(&body, &mask);
    }
}

/// Registers queue-notify addresses with the hypervisor so guest kicks reach the I/O thread
/// without a vCPU exit to userspace (KVM ioeventfd).
pub trait IoEventRegistry: Send + Sync {
    fn register(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
    fn unregister(&self, addr: u64, fd: &EventFd) -> io::Result<()>;
}

/// For tests and hosts without ioeventfd: kicks arrive as MMIO writes instead.
pub struct NoIoEvents;

impl IoEventRegistry for NoIoEvents {
    fn register(&self, _addr: u64, _fd: &EventFd) -> io::Result<()> {
        Ok(())
    }
    fn unregister(&self, _addr: u64, _fd: &EventFd) -> io::Result<()> {
        Ok(())
    }
}

/// Reads `data.len()` bytes at `offset` out of a little-endian value of `width` bytes.
pub fn read_le(value: u64, width: usize, offset: usize, data: &mut [u8]) {
    let b = value.to_le_bytes();
    for (i, d) in data.iter_mut().enumerate() {
        *d = if offset + i < width { b[offset + i] } else { 0 };
    }
}

/// Merges a partial write into a little-endian value.
pub fn write_le(value: &mut u64, offset: usize, data: &[u8]) {
    let mut b = value.to_le_bytes();
    for (i, d) in data.iter().enumerate() {
        if offset + i < 8 {
            b[offset + i] = *d;
        }
    }
    *value = u64::from_le_bytes(b);
}
