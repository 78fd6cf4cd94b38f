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

/// One level-triggered line as a device holds it. The chip hears only changes of level:
/// devices re-drive their line after every register access that may move it, and most
/// leave it where it was (each call into the chip takes its lock). One line per (gsi,
/// source), owned by its device (not `Clone`, and `set` takes `&mut self`: a second holder,
/// or two calls at once, would make the level this line last drove stale).
pub struct IntxLine {
    chip: Arc<dyn IrqChip>,
    gsi: u32,
    source: u32,
    /// The level last driven; `None` before the first (the chip's state is not known).
    driven: Option<bool>,
}

impl IntxLine {
    pub fn new(chip: Arc<dyn IrqChip>, gsi: u32, source: u32) -> Self {
        Self {
            chip,
            gsi,
            source,
            driven: None,
        }
    }

    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    pub fn set(&mut self, asserted: bool) {
        if self.driven != Some(asserted) {
            self.driven = Some(asserted);
            self.chip.set_level(self.gsi, self.source, asserted);
        }
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
        Ok((
            gsi,
            EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK | vmm_sys_util::eventfd::EFD_CLOEXEC)?,
        ))
    }

    fn route_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        self.inner.lock().unwrap().routes.insert(gsi, msg);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A chip that keeps every call it gets.
    #[derive(Default)]
    struct Calls(Mutex<Vec<(u32, u32, bool)>>);

    impl IrqChip for Calls {
        fn set_level(&self, gsi: u32, source: u32, asserted: bool) {
            self.0.lock().unwrap().push((gsi, source, asserted));
        }
        fn alloc_msi(&self) -> io::Result<(u32, EventFd)> {
            Err(io::ErrorKind::Unsupported.into())
        }
        fn route_msi(&self, _: u32, _: Option<MsiMessage>) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_line_tells_the_chip_its_changes_only() {
        let chip = Arc::new(Calls::default());
        let mut line = IntxLine::new(chip.clone(), 10, 3);
        // The first level goes whatever it is: the chip's state is not known before.
        line.set(false);
        line.set(false);
        line.set(true);
        line.set(true);
        line.set(true);
        line.set(false);
        let mut other = IntxLine::new(chip.clone(), 10, 4);
        other.set(true);
        assert_eq!(
            *chip.0.lock().unwrap(),
            [(10, 3, false), (10, 3, true), (10, 3, false), (10, 4, true)]
        );
    }
}
