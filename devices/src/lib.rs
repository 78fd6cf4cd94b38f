//! Everything the nicvm guest sees: the I/O buses, PCI (config space, BARs, INTx, MSI-X),
//! legacy PC devices, pvpanic and the NIC models.

pub mod bus;
pub mod e1000;
pub mod interrupt;
pub mod legacy;
pub mod lifecycle;
pub mod net;
pub mod pci;
pub mod pvpanic;
pub mod rtl8139;
pub mod snapshot;
#[cfg(test)]
mod test_util;
pub mod virtio;
