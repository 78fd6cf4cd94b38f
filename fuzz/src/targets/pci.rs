//! PCI as the guest reaches it: configuration mechanism #1 on 0xCF8/0xCFC at every width,
//! BAR sizing and relocation (into, across and out of the windows, onto each other), the
//! command register, capabilities, and accesses through the I/O and MMIO windows to wherever
//! the BARs went, MSI-X table and PBA included. The devices are the ones nicvm puts on its
//! root bus: the host bridge, one of each NIC and pvpanic. A snapshot operation saves the
//! bus, alters the saved JSON as a damaged or hostile file would, and restores it into a
//! freshly built machine: refused or restored, never a panic; when restored, the case goes on
//! against the restored machine.

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
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
    /// Save the bus, edit the state, restore it into a fresh machine.
    Snapshot(StateEdit),
}

/// How a snapshot case alters a saved state before restoring it. Nodes are counted
/// depth-first among those of the kind the edit applies to, modulo their number.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StateEdit {
    /// Restore what was saved.
    Keep,
    /// A number becomes `val`.
    Number { node: u32, val: u64 },
    /// One bit of a number flips.
    Flip { node: u32, bit: u8 },
    /// An array is cut to `len` items, or grown to it with copies of its last.
    Resize { node: u32, len: u32 },
    /// Any value becomes one of another JSON type.
    Retype { node: u32, to: u8 },
    /// An object loses a field, or gains one the device does not know.
    Field { node: u32, remove: bool },
}

impl StateEdit {
    pub fn generate(rng: &mut Rng) -> StateEdit {
        let node = rng.below(4096) as u32;
        match rng.weighted(&[15, 35, 20, 10, 10, 10]) {
            0 => StateEdit::Keep,
            1 => StateEdit::Number {
                node,
                val: rng.pick_or(&[0, 1, 2, 3, 0xff, 0xffff, 0x1_0000, u64::MAX], |r| {
                    r.value(8)
                }),
            },
            2 => StateEdit::Flip {
                node,
                bit: rng.below(64) as u8,
            },
            3 => StateEdit::Resize {
                node,
                len: rng.pick_or(&[0, 1, 2, 3], |r| r.below(300) as u32),
            },
            4 => StateEdit::Retype {
                node,
                to: rng.below(7) as u8,
            },
            _ => StateEdit::Field {
                node,
                remove: rng.chance(50),
            },
        }
    }

    /// Applies the edit to `state` (nothing when it has no node of the kind).
    pub fn apply(&self, state: &mut serde_json::Value) {
        use serde_json::Value;
        let (node, kind): (u32, fn(&Value) -> bool) = match *self {
            StateEdit::Keep => return,
            StateEdit::Number { node, .. } | StateEdit::Flip { node, .. } => {
                (node, Value::is_number)
            }
            StateEdit::Resize { node, .. } => (node, Value::is_array),
            StateEdit::Retype { node, .. } => (node, |_| true),
            StateEdit::Field { node, .. } => (node, Value::is_object),
        };
        let count = nodes(state, kind, &mut |_| {});
        if count == 0 {
            return;
        }
        let mut at = node as usize % count;
        nodes(state, kind, &mut |v| {
            if at == 0 {
                self.edit(v);
            }
            at = at.wrapping_sub(1);
        });
    }

    fn edit(&self, v: &mut serde_json::Value) {
        use serde_json::Value;
        match *self {
            StateEdit::Keep => {}
            StateEdit::Number { val, .. } => *v = val.into(),
            StateEdit::Flip { bit, .. } => {
                let n = v.as_u64().or(v.as_i64().map(|i| i as u64)).unwrap_or(0);
                *v = (n ^ 1u64 << (bit % 64)).into();
            }
            StateEdit::Resize { len, .. } => {
                let a = v.as_array_mut().expect("an array");
                let last = a.last().cloned().unwrap_or(Value::Null);
                a.resize(len as usize, last);
            }
            StateEdit::Retype { to, .. } => {
                *v = match to {
                    0 => Value::Null,
                    1 => true.into(),
                    2 => "7".into(),
                    3 => 1.5.into(),
                    4 => Value::Array(vec![]),
                    5 => Value::Object(Default::default()),
                    _ => (-1).into(),
                }
            }
            StateEdit::Field { remove, .. } => {
                let o = v.as_object_mut().expect("an object");
                if remove {
                    if let Some(k) = o.keys().next().cloned() {
                        o.remove(&k);
                    }
                } else {
                    o.insert("unknown".into(), 0.into());
                }
            }
        }
    }
}

/// Calls `f` on every node of `v` that `kind` accepts, depth-first (a node before what it
/// holds); returns how many there were.
fn nodes(
    v: &mut serde_json::Value,
    kind: fn(&serde_json::Value) -> bool,
    f: &mut dyn FnMut(&mut serde_json::Value),
) -> usize {
    let mut n = 0;
    if kind(v) {
        n += 1;
        f(v);
    }
    match v {
        serde_json::Value::Array(a) => {
            for x in a {
                n += nodes(x, kind, f);
            }
        }
        serde_json::Value::Object(o) => {
            for (_, x) in o.iter_mut() {
                n += nodes(x, kind, f);
            }
        }
        _ => {}
    }
    n
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
    root: Arc<PciRoot>,
    mem: GuestMemoryMmap,
}

const MEM_SIZE: usize = 1 << 20;

/// The machine as nicvm builds it, on `ram` (a restored machine's is the saved one's).
fn machine(ram: Option<&[u8]>) -> Machine {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    if let Some(ram) = ram {
        mem.write_slice(ram, GuestAddress(0)).unwrap();
    }
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
        Default::default(),
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
        root,
        mem,
    }
}

/// Saves `m`, edits the state as text would carry it, restores into a fresh machine: the
/// fresh one when that worked, else `m` as it was.
fn snapshot(m: Machine, edit: &StateEdit) -> Machine {
    let text = serde_json::to_string(&m.root.save()).unwrap();
    let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit.apply(&mut state);
    let mut ram = vec![0u8; MEM_SIZE];
    m.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
    let fresh = machine(Some(&ram));
    match fresh.root.restore(&state) {
        Ok(()) => fresh,
        Err(_) => m,
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
            match rng.weighted(&[30, 25, 15, 20, 10, 3]) {
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
                5 => ops.push(PciOp::Snapshot(StateEdit::generate(rng))),
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
        let mut m = machine(None);
        for (i, o) in ops.iter().enumerate() {
            op(i);
            match *o {
                PciOp::Snapshot(ref edit) => m = snapshot(m, edit),
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
