//! pvpanic-pci (1b36:0011): the guest kernel writes PVPANIC_PANICKED when it panics and, with
//! our guest's backported driver, PVPANIC_SHUTDOWN on power-off (there is no ACPI to do it).

use crate::lifecycle::{ExitReason, Lifecycle};
use crate::pci::{BarKind, PciConfig, PciDevice};
use crate::snapshot::{RestoreError, State};
use std::sync::Arc;

pub const PVPANIC_PANICKED: u8 = 1 << 0;
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;
pub const PVPANIC_SHUTDOWN: u8 = 1 << 2;

pub struct PvPanic {
    config: PciConfig,
    lifecycle: Arc<Lifecycle>,
}

impl PvPanic {
    pub fn new(lifecycle: Arc<Lifecycle>) -> Self {
        // Class 0x08/0x80: "other system peripheral", as QEMU presents it.
        let mut config = PciConfig::new(0x1b36, 0x0011, (0x08, 0x80, 0x00), 1);
        config.set_subsystem(0x1af4, 0x1100);
        config.add_bar(0, BarKind::Mem32, 16);
        PvPanic { config, lifecycle }
    }
}

impl PciDevice for PvPanic {
    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 0 {
            data[0] = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED | PVPANIC_SHUTDOWN;
        }
    }

    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        let v = if offset == 0 { data[0] } else { 0 };
        if v & (PVPANIC_PANICKED | PVPANIC_CRASH_LOADED) != 0 {
            self.lifecycle.request_exit(ExitReason::GuestPanic);
        } else if v & PVPANIC_SHUTDOWN != 0 {
            self.lifecycle.guest_shutdown(ExitReason::PowerOff);
        }
    }

    fn save(&self) -> State {
        crate::pci::save_config_only(&self.config)
    }

    fn restore(&mut self, state: &State) -> Result<(), RestoreError> {
        crate::pci::restore_config_only(&mut self.config, state)
    }
}
