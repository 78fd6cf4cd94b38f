//! How devices raise interrupts, independent of KVM so device tests can run without it.
//!
//! * Legacy INTx is level-triggered: a device says whether its line is asserted; several
//!   devices may share one IOAPIC pin, and the chip ORs them.
//! * MSI/MSI-X: each vector owns a GSI whose route the device programs from the guest's
//!   address/data pair; raising it is a write to that GSI's irqfd.

use std::io;
use std::sync::Arc;
use vmm_sys_util::eventfd::EventFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

pub trait IrqChip: Send + Sync {
    /// Drive level-triggered `gsi` on behalf of `source` (a per-device id).
    fn set_level(&self, gsi: u32, source: u32, asserted: bool);
    /// Allocates a GSI for an MSI vector and returns it with the eventfd that raises it.
    fn alloc_msi(&self) -> io::Result<(u32, EventFd)>;
    /// Points `gsi` at `msg`, or removes its route (`None`: masked or disabled).
    fn route_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()>;
}

/// One level-triggered line as a device holds it.
#[derive(Clone)]
pub struct IntxLine {
    chip: Arc<dyn IrqChip>,
    gsi: u32,
    source: u32,
}

impl IntxLine {
    pub fn new(chip: Arc<dyn IrqChip>, gsi: u32, source: u32) -> Self {
        Self { chip, gsi, source }
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn set(&self, asserted: bool) {
        self.chip.set_level(self.gsi, self.source, asserted);
    }
}

/// Records what devices do, for tests without KVM.
#[cfg(any(test, feature = "test-drivers"))]
#[derive(Default)]
pub struct RecordingIrqChip {
    inner: std::sync::Mutex<RecordingState>,
}

#[cfg(any(test, feature = "test-drivers"))]
#[derive(Default)]
pub struct RecordingState {
    pub levels: std::collections::BTreeMap<(u32, u32), bool>,
    pub routes: std::collections::BTreeMap<u32, Option<MsiMessage>>,
    pub next_gsi: u32,
}

#[cfg(any(test, feature = "test-drivers"))]
impl RecordingIrqChip {
    pub fn level(&self, gsi: u32) -> bool {
        let s = self.inner.lock().unwrap();
        s.levels.iter().any(|(&(g, _), &l)| g == gsi && l)
    }

    pub fn route(&self, gsi: u32) -> Option<MsiMessage> {
        self.inner
            .lock()
            .unwrap()
            .routes
            .get(&gsi)
            .copied()
            .flatten()
    }
}

#[cfg(any(test, feature = "test-drivers"))]
impl IrqChip for RecordingIrqChip {
    fn set_level(&self, gsi: u32, source: u32, asserted: bool) {
        self.inner
            .lock()
            .unwrap()
            .levels
            .insert((gsi, source), asserted);
    }

    fn alloc_msi(&self) -> io::Result<(u32, EventFd)> {
        let mut s = self.inner.lock().unwrap();
        let gsi = 24 + s.next_gsi;
        s.next_gsi += 1;
        Ok((gsi, EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)?))
    }

    fn route_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        self.inner.lock().unwrap().routes.insert(gsi, msg);
        Ok(())
    }
}
