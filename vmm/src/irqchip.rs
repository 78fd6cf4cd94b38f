//! The in-kernel irqchip (PIC, IOAPIC, LAPIC) as devices see it.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so every update rewrites the default routes
//! (GSI 0-15 to the PICs and IOAPIC, 16-23 to the IOAPIC) together with the MSI routes.

use devices::interrupt::{IrqChip, MsiMessage};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

pub const IOAPIC_PINS: u32 = 24;

#[derive(Default)]
struct State {
    /// Sources currently asserting each level-triggered GSI.
    asserted: BTreeMap<u32, BTreeSet<u32>>,
    msi: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
}

pub struct KvmIrqChip {
    vm: Arc<VmFd>,
    state: Mutex<State>,
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

impl KvmIrqChip {
    pub fn new(vm: Arc<VmFd>) -> io::Result<Self> {
        let chip = KvmIrqChip {
            vm,
            state: Mutex::new(State {
                next_gsi: IOAPIC_PINS,
                ..Default::default()
            }),
        };
        chip.commit(&chip.state.lock().unwrap())?;
        Ok(chip)
    }

    fn commit(&self, s: &State) -> io::Result<()> {
        let mut entries = vec![];
        for gsi in 0..IOAPIC_PINS {
            if gsi < 16 && gsi != 2 {
                let pic = if gsi < 8 {
                    KVM_IRQCHIP_PIC_MASTER
                } else {
                    KVM_IRQCHIP_PIC_SLAVE
                };
                entries.push(irqchip_entry(gsi, pic, gsi % 8));
            }
            entries.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, m) in &s.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let table = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| io::Error::other("routing table too large"))?;
        self.vm.set_gsi_routing(&table).map_err(io::Error::from)
    }
}

impl IrqChip for KvmIrqChip {
    fn set_level(&self, gsi: u32, source: u32, asserted: bool) {
        let mut s = self.state.lock().unwrap();
        let set = s.asserted.entry(gsi).or_default();
        let before = !set.is_empty();
        if asserted {
            set.insert(source);
        } else {
            set.remove(&source);
        }
        let after = !set.is_empty();
        if before != after {
            if let Err(e) = self.vm.set_irq_line(gsi, after) {
                log::error!("KVM_IRQ_LINE gsi {gsi}: {e}");
            }
        }
    }

    fn alloc_msi(&self) -> io::Result<(u32, EventFd)> {
        let gsi = {
            let mut s = self.state.lock().unwrap();
            let g = s.next_gsi;
            s.next_gsi += 1;
            g
        };
        let fd = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
        self.vm.register_irqfd(&fd, gsi).map_err(io::Error::from)?;
        Ok((gsi, fd))
    }

    fn route_msi(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let mut s = self.state.lock().unwrap();
        match msg {
            Some(m) => s.msi.insert(gsi, m),
            None => s.msi.remove(&gsi),
        };
        self.commit(&s)
    }
}
