//! PCI as the guest reaches it: configuration mechanism #1 on 0xCF8/0xCFC at every width,
//! BAR sizing and relocation (into, across and out of the windows, onto each other), the
//! command register, capabilities, and accesses through the I/O and MMIO windows to wherever
//! the BARs went, MSI-X table and PBA included. The devices are the ones nicvm puts on its
//! root bus: the host bridge, one of each NIC and pvpanic.

use crate::harness::{op, Target};
use crate::rng::Rng;
use devices::bus::Bus;
use devices::e1000::E1000;
use devices::interrupt::{IntxLine, RecordingIrqChip};
use devices::lifecycle::Lifecycle;
use devices::net::{NetPort, Nic};
use devices::pci::{HostBridge, PciConfigIo, PciDevice, PciRoot, PciWindow};
use devices::rtl8139::Rtl8139;
use devices::virtio::net::VirtioNet;
use devices::virtio::NoIoEvents;
use net_backends::mem::pair;
use nicvm::layout::{PCI_IO_SIZE, PCI_IO_START, PCI_MMIO_SIZE, PCI_MMIO_START};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use vm_memory::{GuestAddress, GuestMemoryMmap};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PciOp {
    Pio {
        port: u16,
        width: u8,
        val: u32,
        write: bool,
    },
    Mmio {
        addr: u64,
        width: u8,
        val: u64,
        write: bool,
    },
}

pub struct Pci;

/// Slots as nicvm fills them: host bridge, NICs from slot 3, pvpanic after them.
const SLOTS: [u8; 6] = [0, 3, 4, 5, 6, 7];
/// Config registers worth poking: header fields, BARs, capability area.
const CFG_REGS: [u8; 14] = [
    0x00, 0x04, 0x06, 0x08, 0x0c, 0x10, 0x14, 0x18, 0x1c, 0x20, 0x24, 0x34, 0x3c, 0x40,
];

struct Machine {
    pio: Bus,
    mmio: Bus,
    _mem: GuestMemoryMmap,
}

fn machine() -> Machine {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let chip = Arc::new(RecordingIrqChip::default());
    let lifecycle = Arc::new(Lifecycle::new().unwrap());
    let mut root = PciRoot::new();
    let (mut io_next, mut mmio_next) = (PCI_IO_START, PCI_MMIO_START);
    root.add(0, Arc::new(Mutex::new(HostBridge::default())))
        .unwrap();
    let mac = |i: u8| net_backends::MacAddr::nth_default(i);
    let port = |i: u8| {
        let (b, _) = pair(Default::default());
        NetPort::new(format!("nic{i}"), Box::new(b)).unwrap()
    };
    let mut devs: Vec<Arc<Mutex<dyn PciDevice>>> = vec![];
    let virtio = VirtioNet::new(
        mac(0),
        Default::default(),
        mem.clone(),
        chip.clone(),
        IntxLine::new(chip.clone(), 19, 3),
        Arc::new(NoIoEvents),
    )
    .unwrap();
    devs.push(Arc::new(Mutex::new(Nic::new(virtio, port(0)))));
    let e1000 = E1000::new(mac(1), mem.clone(), IntxLine::new(chip.clone(), 20, 4)).unwrap();
    devs.push(Arc::new(Mutex::new(Nic::new(e1000, port(1)))));
    let rtl = Rtl8139::new(
        mac(2),
        mem.clone(),
        IntxLine::new(chip.clone(), 21, 5),
        true,
    )
    .unwrap();
    devs.push(Arc::new(Mutex::new(Nic::new(rtl, port(2)))));
    devs.push(Arc::new(Mutex::new(devices::pvpanic::PvPanic::new(
        lifecycle,
    ))));
    let rtl = Rtl8139::new(mac(3), mem.clone(), IntxLine::new(chip, 22, 7), false).unwrap();
    devs.push(Arc::new(Mutex::new(Nic::new(rtl, port(3)))));
    for (d, slot) in devs.into_iter().zip(&SLOTS[1..]) {
        nicvm::vm::assign_bars(&mut *d.lock().unwrap(), &mut io_next, &mut mmio_next).unwrap();
        root.add(*slot, d).unwrap();
    }
    let root = Arc::new(root);
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    pio.insert(0xcf8, 8, Arc::new(PciConfigIo(root.clone())))
        .unwrap();
    let window = |io: bool, base: u64| {
        Arc::new(PciWindow {
            root: root.clone(),
            io,
            base,
        })
    };
    pio.insert(PCI_IO_START, PCI_IO_SIZE, window(true, PCI_IO_START))
        .unwrap();
    mmio.insert(PCI_MMIO_START, PCI_MMIO_SIZE, window(false, PCI_MMIO_START))
        .unwrap();
    Machine {
        pio,
        mmio,
        _mem: mem,
    }
}

fn cfg_addr(slot: u8, reg: u8) -> u32 {
    0x8000_0000 | (slot as u32) << 11 | (reg as u32 & 0xfc)
}

impl Target for Pci {
    const NAME: &'static str = "pci";
    const ABOUT: &'static str =
        "PCI root: config mechanism #1, BAR sizing/relocation, windows, MSI-X";
    type Op = PciOp;

    fn generate(rng: &mut Rng) -> Vec<PciOp> {
        let mut ops = vec![];
        // Where BARs are likely to be: the start of each window, and wherever we move them.
        let mut mmio_bases = vec![
            PCI_MMIO_START,
            PCI_MMIO_START + 0x1000,
            PCI_MMIO_START + 0x4000,
            PCI_MMIO_START + 0x2_0000,
        ];
        let mut io_bases = vec![PCI_IO_START, PCI_IO_START + 0x40, PCI_IO_START + 0x100];
        let n = rng.range(1, 120) as usize;
        while ops.len() < n {
            match rng.weighted(&[30, 25, 15, 20, 10]) {
                // Select a register, then read or write CONFIG_DATA at some byte of it.
                0 | 1 => {
                    let slot = if rng.chance(90) {
                        rng.pick(&SLOTS)
                    } else {
                        rng.below(32) as u8
                    };
                    let reg = if rng.chance(70) {
                        rng.pick(&CFG_REGS)
                    } else {
                        rng.below(256) as u8
                    };
                    let mut a = cfg_addr(slot, reg);
                    if rng.chance(5) {
                        a ^= 1 << rng.below(32);
                    }
                    ops.push(PciOp::Pio {
                        port: 0xcf8,
                        width: 4,
                        val: a,
                        write: true,
                    });
                    let width = rng.pick(&[1u8, 2, 4, 4, 4]);
                    let port = 0xcfc + rng.below(4) as u16;
                    let write = rng.chance(50);
                    let val = match rng.below(6) {
                        0 => u32::MAX,
                        1 => (PCI_MMIO_START + rng.below(0x10_0000) * 0x1000) as u32,
                        2 => (PCI_IO_START + rng.below(0x40) * 0x40) as u32 | 1,
                        3 => rng.pick(&[0x7u32, 0x407, 0x0, 0x400]),
                        _ => rng.value(4) as u32,
                    };
                    if write && (0x10..0x28).contains(&reg) {
                        if val & 1 == 1 {
                            io_bases.push((val & !3) as u64);
                        } else if val != u32::MAX {
                            mmio_bases.push((val & !0xf) as u64);
                        }
                    }
                    ops.push(PciOp::Pio {
                        port,
                        width,
                        val,
                        write,
                    });
                }
                2 => {
                    let port = if rng.chance(50) {
                        0xcf8 + rng.below(8) as u16
                    } else {
                        (rng.pick(&io_bases) as u16).wrapping_add(rng.below(0x100) as u16)
                    };
                    let width = rng.pick(&[1u8, 2, 4]);
                    ops.push(PciOp::Pio {
                        port,
                        width,
                        val: rng.value(4) as u32,
                        write: rng.chance(50),
                    });
                }
                3 => {
                    let base = rng.pick(&mmio_bases);
                    let off = match rng.below(6) {
                        0 => rng.below(0x20),
                        1 => 0x800 + rng.below(0x20),
                        2 => rng.below(0x4000),
                        3 => rng.below(0x2_0000),
                        _ => rng.below(0x40) * 4,
                    };
                    let width = rng.pick_or(&[1u8, 2, 4, 8, 8], |r| r.range(1, 8) as u8);
                    ops.push(PciOp::Mmio {
                        addr: base.wrapping_add(off),
                        width,
                        val: rng.value(8),
                        write: rng.chance(60),
                    });
                }
                _ => {
                    let addr = match rng.below(4) {
                        0 => PCI_MMIO_START + PCI_MMIO_SIZE - rng.below(16),
                        1 => rng.next_u64(),
                        _ => PCI_MMIO_START + rng.below(PCI_MMIO_SIZE),
                    };
                    ops.push(PciOp::Mmio {
                        addr,
                        width: rng.pick(&[1u8, 2, 4, 8]),
                        val: rng.value(8),
                        write: rng.chance(50),
                    });
                }
            }
        }
        ops
    }

    fn execute(ops: &[PciOp]) {
        let m = machine();
        for (i, o) in ops.iter().enumerate() {
            op(i);
            match *o {
                PciOp::Pio {
                    port,
                    width,
                    val,
                    write,
                } => {
                    let n = (width as usize).min(4);
                    if write {
                        m.pio.write(port as u64, &val.to_le_bytes()[..n]);
                    } else {
                        let mut b = [0u8; 4];
                        m.pio.read(port as u64, &mut b[..n]);
                    }
                }
                PciOp::Mmio {
                    addr,
                    width,
                    val,
                    write,
                } => {
                    let n = (width as usize).min(8);
                    if write {
                        m.mmio.write(addr, &val.to_le_bytes()[..n]);
                    } else {
                        let mut b = [0u8; 8];
                        m.mmio.read(addr, &mut b[..n]);
                    }
                }
            }
        }
    }
}
