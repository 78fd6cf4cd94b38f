//! PCI: configuration space, BARs, the root bus (mechanism #1 on 0xCF8/0xCFC), MSI-X and INTx.

mod config;
mod msix;
mod root;

pub use config::{BarKind, PciConfig};
pub use msix::{Msix, MSIX_ENTRY_SIZE};
pub use root::{PciConfigIo, PciRoot, PciWindow, SlotError};

use crate::snapshot::{RestoreError, State};

/// A function on the root bus. Config space lives in [`PciConfig`]; BAR accesses arrive with
/// the BAR index and the offset inside it, wherever the guest placed the BAR.
pub trait PciDevice: Send {
    fn config(&self) -> &PciConfig;
    fn config_mut(&mut self) -> &mut PciConfig;
    /// Called after the guest wrote `len` bytes at `offset` of config space.
    fn config_written(&mut self, _offset: usize, _len: usize) {}
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Everything the guest can observe of the device, config space included (the vCPUs
    /// are stopped).
    fn save(&self) -> State;
    /// Puts a saved state back into this freshly built device, with the side effects the
    /// guest's own writes would have had (interrupt routes, doorbells, a line left asserted).
    fn restore(&mut self, state: &State) -> Result<(), RestoreError>;
}

/// For devices whose whole state is their config space.
pub fn save_config_only(config: &PciConfig) -> State {
    crate::snapshot::to_state(&config.save())
}

pub fn restore_config_only(config: &mut PciConfig, state: &State) -> Result<(), RestoreError> {
    let regs: Vec<u8> = crate::snapshot::from_state(state, "PCI config space")?;
    config.restore(&regs)
}

/// IOAPIC pin for a slot's INTx pin (0 = INTA): pins 16-23, rotated by slot as on a real
/// board so devices in neighbouring slots do not share a line.
pub fn intx_gsi(slot: u8, pin: u8) -> u32 {
    16 + ((slot as u32 + pin as u32) % 8)
}

// Config-space register offsets (PCI Local Bus Specification 3.0, 6.1).
pub const PCI_VENDOR_ID: usize = 0x00;
pub const PCI_COMMAND: usize = 0x04;
pub const PCI_STATUS: usize = 0x06;
pub const PCI_REVISION_ID: usize = 0x08;
pub const PCI_CACHE_LINE_SIZE: usize = 0x0c;
pub const PCI_BAR0: usize = 0x10;
pub const PCI_SUBSYSTEM_VENDOR_ID: usize = 0x2c;
pub const PCI_CAPABILITY_LIST: usize = 0x34;
pub const PCI_INTERRUPT_LINE: usize = 0x3c;
pub const PCI_INTERRUPT_PIN: usize = 0x3d;

pub const PCI_COMMAND_IO: u16 = 1 << 0;
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;
pub const PCI_STATUS_INTERRUPT: u16 = 1 << 3;
pub const PCI_STATUS_CAP_LIST: u16 = 1 << 4;

pub const PCI_CAP_ID_MSIX: u8 = 0x11;
pub const PCI_CAP_ID_VNDR: u8 = 0x09;

/// 00:00.0, so guests that look for a host bridge before trusting mechanism #1 find one.
pub struct HostBridge {
    config: PciConfig,
}

/// The host bridge's (vendor, device): Red Hat's "QEMU PCIe host bridge".
pub const HOST_BRIDGE_ID: (u16, u16) = (0x1b36, 0x0008);

impl Default for HostBridge {
    fn default() -> Self {
        // Class 0x06/0x00 is what Linux's probe checks.
        let (vendor, device) = HOST_BRIDGE_ID;
        HostBridge {
            config: PciConfig::new(vendor, device, (0x06, 0x00, 0x00), 0),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn save(&self) -> State {
        save_config_only(&self.config)
    }
    fn restore(&mut self, state: &State) -> Result<(), RestoreError> {
        restore_config_only(&mut self.config, state)
    }
}

#[cfg(test)]
mod tests;
