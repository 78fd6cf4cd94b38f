//! The NIC models as a hostile guest sees them: register accesses of every width at real and
//! random offsets, guest memory full of rings, descriptors and buffers that point into, out
//! of and across the end of RAM, frames from the backend (short, oversized, 64 KiB with lying
//! virtio-net headers), a backend that pushes back or loses its link, timers, and resets in
//! the middle of it all.
//!
//! Each model starts as firmware leaves it (BARs placed, decoding and bus mastering on) on an
//! in-memory backend; a case usually begins with the Linux driver's own bring-up (`Init`), so
//! that most operations land on a working device rather than a dead one.

use super::frames::{self, backend_frame, frame, vnet_hdr};
use super::Bytes;
use crate::harness::{op, Target};
use crate::rng::Rng;
use devices::net::{NetEvent, Nic as DevNic, NicModel};
use devices::pci::PciDevice;
use net_backends::mem::{pair, MemPeer};
use net_backends::{Capabilities, Offloads};
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryMmap};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Ev {
    TxKick,
    RxKick,
    Backend,
    Timer,
    /// Whatever kicks the model left for the I/O thread.
    Pending,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NicOp {
    /// A fresh device on a backend with (or without) a virtio-net header.
    Fresh {
        vnet: bool,
    },
    /// The Linux driver's bring-up, in one of the model's variants.
    Init(u8),
    Read {
        bar: u8,
        off: u64,
        width: u8,
    },
    Write {
        bar: u8,
        off: u64,
        width: u8,
        val: u64,
    },
    CfgRead {
        off: u16,
        width: u8,
    },
    CfgWrite {
        off: u16,
        width: u8,
        val: u32,
    },
    /// Guest memory written as a driver (or an attacker) would.
    Mem {
        addr: u64,
        data: Bytes,
    },
    /// A frame from the network.
    Inject(Bytes),
    /// The backend refuses (or takes again) frames.
    Blocked(bool),
    /// The peer goes away (false) or comes back.
    Link(bool),
    /// What the I/O thread would do when that fd fires.
    Event(Ev),
    /// Time passes (microseconds), for timers.
    Sleep(u16),
    /// The NIC saved (through JSON text, as a snapshot file holds it), the state corrupted
    /// when `mutate` gives a seed, and restored into a new device on a copy of guest memory
    /// and a new backend, which replaces the old one when the restore succeeds.
    Snapshot {
        mutate: Option<u64>,
    },
}

/// A model wired up as the fuzzer drives it.
pub trait Rig {
    fn dev(&mut self) -> &mut dyn NicDevice;
    fn mem(&self) -> &GuestMemoryMmap;
    fn init(&mut self, variant: u8);
}

/// A NIC as the fuzzer drives it: the PCI device the vCPUs see, and the event handling the
/// I/O thread does.
pub trait NicDevice: PciDevice {
    fn handle(&mut self, ev: NetEvent);
    fn run_kicks(&mut self);
}

impl<M: NicModel> NicDevice for DevNic<M> {
    fn handle(&mut self, ev: NetEvent) {
        DevNic::handle(self, ev);
    }
    fn run_kicks(&mut self) {
        DevNic::run_kicks(self);
    }
}

/// What differs between the models: how to build one, and what a hostile driver writes.
pub trait Model: 'static {
    const NAME: &'static str;
    const ABOUT: &'static str;
    /// Guest RAM size of the model's test driver.
    const RAM: u64;
    const INIT_VARIANTS: u8;
    /// Per-case generator state (shadow ring indices and the like).
    type Gen: Default;
    fn rig(backend: net_backends::mem::MemBackend) -> Box<dyn Rig>;
    /// (bar, size) of every BAR.
    fn bars() -> &'static [(u8, u64)];
    /// (bar, offset, width) of the registers a driver uses.
    fn regs() -> &'static [(u8, u64, u8)];
    /// A group of operations a driver does together: descriptors, buffers, a doorbell, each
    /// possibly lying.
    fn driver_ops(g: &mut Self::Gen, rng: &mut Rng, vnet: bool, out: &mut Vec<NicOp>);
    /// A reset of the device through its registers.
    fn reset(g: &mut Self::Gen, rng: &mut Rng) -> NicOp;
}

pub struct Nic<M>(PhantomData<M>);

/// Guest RAM of `size` bytes from 0 in two regions back to back, so that rings, descriptors
/// and buffers that straddle the middle take the paths for memory across regions (a model
/// looks up one region for an access where it can, the general path otherwise).
fn split_ram(size: u64) -> GuestMemoryMmap {
    let half = size / 2;
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), half as usize),
        (GuestAddress(half), (size - half) as usize),
    ])
    .expect("guest RAM")
}

fn caps(vnet: bool) -> Capabilities {
    Capabilities {
        vnet_hdr: vnet,
        offloads: if vnet {
            Offloads::ALL
        } else {
            Offloads::default()
        },
    }
}

fn fresh<M: Model>(vnet: bool) -> (Box<dyn Rig>, MemPeer) {
    let (backend, peer) = pair(caps(vnet));
    (M::rig(backend), peer)
}

fn width(rng: &mut Rng, usual: u8) -> u8 {
    match rng.below(10) {
        0 => 1,
        1 => 2,
        2 => 4,
        3 => 8,
        4 => rng.range(1, 8) as u8, // page-crossing accesses split unevenly
        _ => usual,
    }
}

impl<M: Model> Target for Nic<M> {
    const NAME: &'static str = M::NAME;
    const ABOUT: &'static str = M::ABOUT;
    type Op = NicOp;

    fn generate(rng: &mut Rng) -> Vec<NicOp> {
        let mut ops = vec![];
        let vnet = rng.chance(30);
        if vnet {
            ops.push(NicOp::Fresh { vnet });
        }
        if rng.chance(85) {
            ops.push(NicOp::Init(rng.below(M::INIT_VARIANTS as u64) as u8));
        }
        let mut g = M::Gen::default();
        let n = rng.range(1, 160) as usize;
        while ops.len() < n {
            match rng.weighted(&[30, 24, 10, 8, 10, 4, 3, 3, 2, 2, 1, 3]) {
                0 => M::driver_ops(&mut g, rng, vnet, &mut ops),
                1 => {
                    let (bar, off, w) = reg(rng, M::regs(), M::bars());
                    let width = width(rng, w);
                    ops.push(NicOp::Write {
                        bar,
                        off,
                        width,
                        val: rng.value(width),
                    });
                }
                2 => {
                    let (bar, off, w) = reg(rng, M::regs(), M::bars());
                    ops.push(NicOp::Read {
                        bar,
                        off,
                        width: width(rng, w),
                    });
                }
                3 => {
                    let ev =
                        rng.pick(&[Ev::TxKick, Ev::RxKick, Ev::Backend, Ev::Timer, Ev::Pending]);
                    ops.push(NicOp::Event(ev));
                }
                4 => {
                    ops.push(NicOp::Inject(Bytes(backend_frame(rng, vnet))));
                    ops.push(NicOp::Event(Ev::Backend));
                }
                5 => {
                    let len = rng.len(16, 256);
                    let data = rng.bytes(len);
                    let addr = frames::addr(rng, M::RAM, &[0, 0x1000, 0x1_0000, 0x2_0000]);
                    ops.push(NicOp::Mem {
                        addr,
                        data: Bytes(data),
                    });
                }
                6 => ops.push(NicOp::Blocked(rng.chance(50))),
                7 => ops.push(NicOp::Link(rng.chance(50))),
                8 => ops.push(M::reset(&mut g, rng)),
                9 => {
                    let off = if rng.chance(70) {
                        rng.pick(&[
                            0x04u16, 0x10, 0x14, 0x18, 0x20, 0x24, 0x3c, 0x40, 0x44, 0x50,
                        ])
                    } else {
                        rng.below(0x104) as u16
                    };
                    let width = rng.pick(&[1u8, 2, 4]);
                    if rng.chance(50) {
                        ops.push(NicOp::CfgWrite {
                            off,
                            width,
                            val: rng.value(width) as u32,
                        });
                    } else {
                        ops.push(NicOp::CfgRead { off, width });
                    }
                }
                10 => ops.push(NicOp::Sleep(rng.below(2000) as u16)),
                _ => ops.push(NicOp::Snapshot {
                    mutate: rng.chance(60).then(|| rng.next_u64()),
                }),
            }
        }
        ops
    }

    fn execute(ops: &[NicOp]) {
        let (mut rig, mut peer) = fresh::<M>(false);
        // The backend as the ops left it, for the one a restored device gets.
        let (mut vnet_now, mut link, mut blocked) = (false, true, false);
        for (i, o) in ops.iter().enumerate() {
            op(i);
            match o {
                NicOp::Fresh { vnet } => {
                    (rig, peer) = fresh::<M>(*vnet);
                    (vnet_now, link, blocked) = (*vnet, true, false);
                }
                NicOp::Snapshot { mutate } => {
                    let (new, new_peer) = fresh::<M>(vnet_now);
                    new_peer.set_link_up(link);
                    new_peer.set_blocked(blocked);
                    if let Some(new) = snapshot::<M>(&mut *rig, new, *mutate) {
                        (rig, peer) = (new, new_peer);
                    }
                }
                NicOp::Init(v) => rig.init(*v),
                NicOp::Read { bar, off, width } => {
                    let mut b = [0u8; 8];
                    let n = (*width as usize).min(8);
                    rig.dev().bar_read(*bar as usize, *off, &mut b[..n]);
                }
                NicOp::Write {
                    bar,
                    off,
                    width,
                    val,
                } => {
                    let n = (*width as usize).min(8);
                    rig.dev()
                        .bar_write(*bar as usize, *off, &val.to_le_bytes()[..n]);
                }
                NicOp::CfgRead { off, width } => {
                    let mut b = [0u8; 4];
                    let n = (*width as usize).min(4);
                    rig.dev().config().read(*off as usize, &mut b[..n]);
                }
                NicOp::CfgWrite { off, width, val } => {
                    let n = (*width as usize).min(4);
                    let d = rig.dev();
                    d.config_mut().write(*off as usize, &val.to_le_bytes()[..n]);
                    d.config_written(*off as usize, n);
                }
                NicOp::Mem { addr, data } => {
                    // Partial writes at the end of RAM are fine: what fits lands.
                    let _ = rig.mem().write(&data.0, GuestAddress(*addr));
                }
                NicOp::Inject(f) => peer.inject(&f.0),
                NicOp::Blocked(b) => {
                    blocked = *b;
                    peer.set_blocked(*b);
                }
                NicOp::Link(up) => {
                    link = *up;
                    peer.set_link_up(*up);
                }
                NicOp::Event(e) => {
                    let ev = match e {
                        Ev::TxKick => NetEvent::TxKick,
                        Ev::RxKick => NetEvent::RxKick,
                        Ev::Backend => NetEvent::Backend,
                        Ev::Timer => NetEvent::Timer,
                        Ev::Pending => {
                            rig.dev().run_kicks();
                            continue;
                        }
                    };
                    rig.dev().handle(ev);
                }
                NicOp::Sleep(us) => {
                    std::thread::sleep(std::time::Duration::from_micros(*us as u64))
                }
            }
        }
    }
}

/// Saves `old`'s device, through JSON text as a snapshot file holds it, corrupts the state
/// when `mutate` gives a seed, and restores it into `new` after copying `old`'s guest memory
/// into `new`'s. `new` when the restore succeeded; a refusal is fine for a corrupted state
/// (and for a model that does not restore yet), a panic or a hang never is.
fn snapshot<M: Model>(
    old: &mut dyn Rig,
    mut new: Box<dyn Rig>,
    mutate: Option<u64>,
) -> Option<Box<dyn Rig>> {
    let text = serde_json::to_string(&old.dev().save()).expect("a state serializes");
    let mut state: serde_json::Value = serde_json::from_str(&text).expect("and parses back");
    if let Some(seed) = mutate {
        let mut rng = Rng::new(seed);
        for _ in 0..rng.range(1, 3) {
            corrupt(&mut state, &mut rng);
        }
    }
    let mut chunk = vec![0u8; 64 << 10];
    for at in (0..M::RAM).step_by(chunk.len()) {
        let n = chunk.len().min((M::RAM - at) as usize);
        old.mem()
            .read_slice(&mut chunk[..n], GuestAddress(at))
            .expect("guest RAM");
        new.mem()
            .write_slice(&chunk[..n], GuestAddress(at))
            .expect("guest RAM");
    }
    match new.dev().restore(&state) {
        Ok(()) => Some(new),
        Err(_) if mutate.is_some() => None,
        Err(e) => panic!("{}: its own snapshot does not restore: {e}", M::NAME),
    }
}

/// A value inside `v` (or `v`): an element or field with some chance, recursively;
/// `descend` takes the first step for sure.
fn pick<'a>(
    v: &'a mut serde_json::Value,
    rng: &mut Rng,
    descend: bool,
) -> &'a mut serde_json::Value {
    use serde_json::Value as V;
    let n = match &*v {
        V::Object(m) => m.len(),
        V::Array(a) => a.len(),
        _ => 0,
    };
    if n == 0 || (!descend && rng.chance(30)) {
        return v;
    }
    let i = rng.usize(n);
    match v {
        V::Object(m) => pick(m.values_mut().nth(i).expect("in range"), rng, false),
        V::Array(a) => pick(&mut a[i], rng, false),
        other => other,
    }
}

/// One corruption of a saved state: a number changed (a bit flipped, an edge value), an
/// array cut short or grown, a field dropped or added, or a value of another type.
fn corrupt(state: &mut serde_json::Value, rng: &mut Rng) {
    use serde_json::Value as V;
    // Mostly one of the model's own fields (config space has its own checks, the wrapper
    // only two fields), then down with a chance to stop at each level.
    let v = if rng.chance(85) && state.get("model").is_some_and(|m| m.is_object()) {
        pick(&mut state["model"], rng, true)
    } else {
        pick(state, rng, false)
    };
    if rng.chance(15) {
        *v = match rng.below(6) {
            0 => V::Null,
            1 => V::Bool(true),
            2 => V::from(7),
            3 => V::from("7"),
            4 => V::Array(vec![]),
            _ => V::Object(Default::default()),
        };
        return;
    }
    match v {
        V::Number(n) => {
            let old = n.as_u64().unwrap_or(0);
            *v = match rng.below(6) {
                // Mostly values of the field's own width, which only the model can refuse.
                0 | 1 => V::from(old ^ 1 << rng.below(if old < 0x1_0000 { 16 } else { 64 })),
                2 => V::from(rng.pick(&[
                    0u64,
                    1,
                    4,
                    15,
                    16,
                    63,
                    64,
                    255,
                    256,
                    1023,
                    1024,
                    2048,
                    0xffff,
                    0x1_0000,
                    0xffff_ffff,
                    1 << 32,
                    u64::MAX,
                ])),
                3 => V::from(-(rng.below(1 << 20) as i64) - 1),
                4 => V::from(rng.below(old.saturating_mul(2).max(64))),
                _ => V::from(rng.next_u64() >> rng.below(64)),
            };
        }
        V::Bool(b) => *b = !*b,
        V::Array(a) => match rng.below(4) {
            0 => a.truncate(rng.usize(a.len() + 1)),
            1 => a.clear(),
            2 => {
                let last = a.last().cloned().unwrap_or(V::from(0));
                a.push(last);
            }
            _ => {
                for _ in 0..rng.range(1, 40) {
                    a.push(V::from(rng.below(0x1_0000)));
                }
            }
        },
        V::Object(m) => {
            if !m.is_empty() && rng.chance(50) {
                let k = m.keys().nth(rng.usize(m.len())).cloned().expect("in range");
                m.remove(&k);
            } else {
                m.insert("unknown".into(), V::from(1));
            }
        }
        V::String(_) => *v = V::from(rng.below(0x100)),
        V::Null => *v = V::from(rng.below(0x1_0000)),
    }
}

/// A register to access: usually one the driver uses, sometimes any offset of a BAR (or past
/// its end).
fn reg(rng: &mut Rng, regs: &[(u8, u64, u8)], bars: &[(u8, u64)]) -> (u8, u64, u8) {
    if rng.chance(80) {
        let (b, o, w) = rng.pick(regs);
        // Sometimes an unaligned or neighbouring byte of it.
        let o = if rng.chance(10) { o + rng.below(4) } else { o };
        return (b, o, w);
    }
    let (b, size) = rng.pick(bars);
    let off = if rng.chance(10) {
        size - rng.below(8)
    } else {
        rng.below(size + 16)
    };
    (b, off, 4)
}

// ---- rtl8139 ----------------------------------------------------------------------------------

pub struct Rtl8139Cplus;
pub struct Rtl8139Normal;

mod rtl {
    pub use devices::rtl8139::driver::*;
    pub use devices::rtl8139::tx::*;
    pub use devices::rtl8139::*;
}

struct RtlRig(rtl::driver::Driver);

impl Rig for RtlRig {
    fn dev(&mut self) -> &mut dyn NicDevice {
        &mut self.0.dev
    }
    fn mem(&self) -> &GuestMemoryMmap {
        &self.0.mem
    }
    fn init(&mut self, v: u8) {
        self.0.probe();
        match v {
            0 => self.0.open_cp(0),
            1 => self.0.open_cp(rtl::CPCR_RXVLAN),
            2 => self.0.open_too(0),
            _ => self.0.open_too(0x8000_0000),
        }
    }
}

#[derive(Default)]
pub struct RtlGen {
    /// The C+ TX descriptor the driver writes next, and the normal-mode slot.
    cp_tx: u16,
    cp_rx: u16,
    slot: u8,
}

const RTL_BARS: &[(u8, u64)] = &[(0, 0x100), (1, 0x100)];
const RTL_REGS: &[(u8, u64, u8)] = {
    use devices::rtl8139::*;
    &[
        (0, IDR0 as u64, 4),
        (0, MAR0 as u64, 4),
        (0, TSD0 as u64, 4),
        (0, TSD0 as u64 + 4, 4),
        (0, TSD0 as u64 + 8, 4),
        (0, TSD0 as u64 + 12, 4),
        (0, TSAD0 as u64, 4),
        (0, TSAD0 as u64 + 4, 4),
        (0, TNPDS as u64 + 4, 4),
        (0, THPDS as u64, 4),
        (0, RBSTART as u64, 4),
        (0, CR as u64, 1),
        (0, CR as u64, 1),
        (0, CAPR as u64, 2),
        (0, CBR as u64, 2),
        (0, IMR as u64, 2),
        (0, ISR as u64, 2),
        (0, TCR as u64, 4),
        (0, RCR as u64, 4),
        (0, TCTR as u64, 4),
        (0, MPC as u64, 4),
        (0, CR9346 as u64, 1),
        (0, CONFIG1 as u64, 1),
        (0, TIMER_INT as u64, 4),
        (0, MSR as u64, 1),
        (0, MULINT as u64, 2),
        (0, TSAD as u64, 2),
        (0, BMCR as u64, 2),
        (0, BMSR as u64, 2),
        (0, ANLPAR as u64, 2),
        (0, TPPOLL as u64, 1),
        (0, TPPOLL as u64, 1),
        (0, CPCR as u64, 2),
        (0, INTR_MITIGATE as u64, 2),
        (0, RDSAR as u64, 4),
        (0, RDSAR as u64 + 4, 4),
        (1, CR as u64, 1),
        (1, ISR as u64, 2),
        (1, DTCCR as u64, 4),
        (1, DTCCR as u64 + 4, 4),
    ]
};

fn rtl_desc(opts1: u32, opts2: u32, addr: u64) -> Vec<u8> {
    let mut d = Vec::with_capacity(16);
    d.extend(opts1.to_le_bytes());
    d.extend(opts2.to_le_bytes());
    d.extend(addr.to_le_bytes());
    d
}

fn rtl_driver_ops(g: &mut RtlGen, rng: &mut Rng, out: &mut Vec<NicOp>) {
    use rtl::*;
    match rng.below(5) {
        // C+ transmit: a frame in a buffer, one to three descriptors, TPPoll.
        0 | 1 => {
            let f = frame(rng);
            let parts = if rng.chance(80) {
                1
            } else {
                rng.range(2, 3) as usize
            };
            let chunk = f.len().div_ceil(parts).max(1);
            let opts_offload = match rng.below(6) {
                0 => TX_LGSEN | (rng.below(0x800) as u32) << TX_MSS_SHIFT,
                1 => TX_LGSEN | (rng.pick(&[0u32, 1, 8, 536, 1460]) << TX_MSS_SHIFT),
                2 => TX_IPCS | TX_TCPCS,
                3 => TX_IPCS | TX_UDPCS,
                4 => rng.below(8) as u32 * TX_UDPCS,
                _ => 0,
            };
            let opts2 = if rng.chance(20) {
                TX_TAGC | rng.below(0x1_0000) as u32
            } else {
                0
            };
            for (k, piece) in f.chunks(chunk).enumerate().take(parts) {
                let i = g.cp_tx % CP_RING;
                let buf = TX_BUFS + i as u64 * 0x1_0000;
                out.push(NicOp::Mem {
                    addr: buf,
                    data: Bytes(piece.to_vec()),
                });
                let mut opts1 = DESC_OWN | opts_offload;
                opts1 |= if rng.chance(90) {
                    piece.len() as u32
                } else {
                    rng.below(0x1_0000) as u32
                } & TX_LEN_MASK;
                if k == 0 {
                    opts1 |= DESC_FS;
                }
                if k + 1 == parts || rng.chance(5) {
                    opts1 |= DESC_LS;
                }
                if i == CP_RING - 1 || rng.chance(3) {
                    opts1 |= DESC_EOR;
                }
                if rng.chance(5) {
                    opts1 ^= 1 << rng.below(32);
                }
                let addr = if rng.chance(90) {
                    buf
                } else {
                    frames::addr(rng, MEM_SIZE as u64, &[TX_BUFS])
                };
                out.push(NicOp::Mem {
                    addr: TX_RING + i as u64 * 16,
                    data: Bytes(rtl_desc(opts1, opts2, addr)),
                });
                g.cp_tx = g.cp_tx.wrapping_add(1);
            }
            out.push(NicOp::Write {
                bar: 0,
                off: TPPOLL as u64,
                width: 1,
                val: TPPOLL_NPQ as u64,
            });
        }
        // C+ receive: give descriptors back to the device.
        2 => {
            for _ in 0..rng.range(1, 8) {
                let i = g.cp_rx % CP_RING;
                let size = match rng.below(8) {
                    0 => 0,
                    1 => rng.below(0x2000),
                    2 => rng.range(1, 64),
                    _ => RX_BUF_SZ as u64,
                } as u32;
                let mut opts1 = DESC_OWN | size;
                if i == CP_RING - 1 || rng.chance(3) {
                    opts1 |= DESC_EOR;
                }
                let buf = if rng.chance(90) {
                    RX_BUFS + i as u64 * RX_BUF_SZ as u64
                } else {
                    frames::addr(rng, MEM_SIZE as u64, &[RX_BUFS])
                };
                out.push(NicOp::Mem {
                    addr: RX_RING + i as u64 * 16,
                    data: Bytes(rtl_desc(opts1, 0, buf)),
                });
                g.cp_rx = g.cp_rx.wrapping_add(1);
            }
            out.push(NicOp::Write {
                bar: 0,
                off: ISR as u64,
                width: 2,
                val: 0xffff,
            });
        }
        // Normal mode transmit: a frame in the slot's buffer, then TSD.
        3 => {
            let slot = (g.slot % 4) as u64;
            g.slot = g.slot.wrapping_add(1);
            let f = frame(rng);
            let buf = TOO_TX_BUFS + slot * TOO_TX_SLOT;
            if rng.chance(20) {
                let addr = frames::addr(rng, MEM_SIZE as u64, &[TOO_TX_BUFS]);
                out.push(NicOp::Write {
                    bar: 0,
                    off: TSAD0 as u64 + 4 * slot,
                    width: 4,
                    val: addr & 0xffff_ffff,
                });
            }
            let len = if rng.chance(85) {
                f.len().max(60) as u64
            } else {
                rng.below(0x2000)
            };
            out.push(NicOp::Mem {
                addr: buf,
                data: Bytes(f),
            });
            let bits = if rng.chance(10) {
                rng.next_u64() & !0x1fff
            } else {
                0
            };
            out.push(NicOp::Write {
                bar: 0,
                off: TSD0 as u64 + 4 * slot,
                width: 4,
                val: (len | bits) & 0xffff_ffff & !(TSD_OWN as u64),
            });
        }
        // Normal mode receive: the driver reads and moves CAPR.
        _ => {
            let capr = rng.below(0x1_0000);
            out.push(NicOp::Write {
                bar: 0,
                off: CAPR as u64,
                width: 2,
                val: capr,
            });
            out.push(NicOp::Write {
                bar: 0,
                off: ISR as u64,
                width: 2,
                val: rng.value(2),
            });
        }
    }
}

fn rtl_reset(rng: &mut Rng) -> NicOp {
    use rtl::*;
    if rng.chance(70) {
        NicOp::Write {
            bar: 0,
            off: CR as u64,
            width: 1,
            val: CR_RST as u64,
        }
    } else {
        // Transmitter and receiver off, or on.
        NicOp::Write {
            bar: 0,
            off: CR as u64,
            width: 1,
            val: rng.pick(&[0, CR_TE, CR_RE, CR_RE | CR_TE]) as u64,
        }
    }
}

impl Model for Rtl8139Cplus {
    const NAME: &'static str = "rtl8139";
    const ABOUT: &'static str = "RTL8139C+ (8139cp personality): C+ rings, offloads, both modes";
    const RAM: u64 = rtl::MEM_SIZE as u64;
    const INIT_VARIANTS: u8 = 4;
    type Gen = RtlGen;
    fn rig(b: net_backends::mem::MemBackend) -> Box<dyn Rig> {
        Box::new(RtlRig(rtl::driver::Driver::new_in(
            split_ram(Self::RAM),
            Box::new(b),
            true,
        )))
    }
    fn bars() -> &'static [(u8, u64)] {
        RTL_BARS
    }
    fn regs() -> &'static [(u8, u64, u8)] {
        RTL_REGS
    }
    fn driver_ops(g: &mut RtlGen, rng: &mut Rng, _vnet: bool, out: &mut Vec<NicOp>) {
        rtl_driver_ops(g, rng, out)
    }
    fn reset(_g: &mut RtlGen, rng: &mut Rng) -> NicOp {
        rtl_reset(rng)
    }
}

impl Model for Rtl8139Normal {
    const NAME: &'static str = "rtl8139-too";
    const ABOUT: &'static str = "plain RTL8139C (8139too personality, cplus=off)";
    const RAM: u64 = rtl::MEM_SIZE as u64;
    const INIT_VARIANTS: u8 = 4;
    type Gen = RtlGen;
    fn rig(b: net_backends::mem::MemBackend) -> Box<dyn Rig> {
        Box::new(RtlRig(rtl::driver::Driver::new_in(
            split_ram(Self::RAM),
            Box::new(b),
            false,
        )))
    }
    fn bars() -> &'static [(u8, u64)] {
        RTL_BARS
    }
    fn regs() -> &'static [(u8, u64, u8)] {
        RTL_REGS
    }
    fn driver_ops(g: &mut RtlGen, rng: &mut Rng, _vnet: bool, out: &mut Vec<NicOp>) {
        rtl_driver_ops(g, rng, out)
    }
    fn reset(_g: &mut RtlGen, rng: &mut Rng) -> NicOp {
        rtl_reset(rng)
    }
}

// ---- e1000 ------------------------------------------------------------------------------------

pub struct E1000;

mod e1k {
    pub use devices::e1000::driver::*;
    pub use devices::e1000::regs::*;
}

struct E1000Rig(e1k::Driver);

impl Rig for E1000Rig {
    fn dev(&mut self) -> &mut dyn NicDevice {
        &mut self.0.dev
    }
    fn mem(&self) -> &GuestMemoryMmap {
        &self.0.mem
    }
    fn init(&mut self, v: u8) {
        self.0.probe();
        match v {
            0 => self.0.open(),
            1 => {
                self.0.tx_ide = false;
                self.0.open();
                self.0.w(e1k::RDTR, 0);
                self.0.w(e1k::TIDV, 0);
            }
            _ => {
                self.0.configure_tx(8);
                self.0
                    .configure_rx(8, e1k::RCTL_EN | e1k::RCTL_BAM | e1k::RCTL_LPE);
                self.0.post_rx_all();
            }
        }
    }
}

#[derive(Default)]
pub struct E1000Gen {
    tdt: u32,
    rdt: u32,
}

const E1000_BARS: &[(u8, u64)] = &[(0, e1k::MMIO_SIZE), (1, e1k::IO_SIZE)];
const E1000_REGS: &[(u8, u64, u8)] = {
    use e1k::*;
    &[
        (0, CTRL as u64, 4),
        (0, STATUS as u64, 4),
        (0, EECD as u64, 4),
        (0, EERD as u64, 4),
        (0, MDIC as u64, 4),
        (0, VET as u64, 4),
        (0, ICR as u64, 4),
        (0, ITR as u64, 4),
        (0, ICS as u64, 4),
        (0, IMS as u64, 4),
        (0, IMC as u64, 4),
        (0, RCTL as u64, 4),
        (0, RCTL as u64, 4),
        (0, TCTL as u64, 4),
        (0, RDBAL as u64, 4),
        (0, RDBAH as u64, 4),
        (0, RDLEN as u64, 4),
        (0, RDH as u64, 4),
        (0, RDT as u64, 4),
        (0, RDT as u64, 4),
        (0, RDTR as u64, 4),
        (0, RADV as u64, 4),
        (0, TDBAL as u64, 4),
        (0, TDBAH as u64, 4),
        (0, TDLEN as u64, 4),
        (0, TDH as u64, 4),
        (0, TDT as u64, 4),
        (0, TDT as u64, 4),
        (0, TIDV as u64, 4),
        (0, TADV as u64, 4),
        (0, RXCSUM as u64, 4),
        (0, MTA as u64, 4),
        (0, RAL0 as u64, 4),
        (0, RAH0 as u64, 4),
        (0, VFTA as u64, 4),
        (0, GPRC as u64, 4),
        (0, GORCH as u64, 4),
        (1, IOADDR, 4),
        (1, IODATA, 4),
    ]
};

/// A legacy, context or data TX descriptor with plausible (and sometimes lying) fields.
fn e1000_tx_desc(rng: &mut Rng, buf: u64, len: usize, eop: bool) -> [u8; 16] {
    use e1k::*;
    let mut d = [0u8; 16];
    let kind = rng.below(10);
    let cmd_extra = if rng.chance(50) { TXD_CMD_RS } else { 0 }
        | if rng.chance(20) { TXD_CMD_IDE } else { 0 }
        | if rng.chance(20) { TXD_CMD_VLE } else { 0 }
        | if eop { TXD_CMD_EOP } else { 0 };
    if kind < 2 {
        // Context descriptor: offsets for checksums and TSO.
        d[0] = rng.pick_or(&[14u8, 18, 0, 200], |r| r.below(256) as u8);
        d[1] = rng.pick_or(&[24u8, 28], |r| r.below(256) as u8);
        d[2..4].copy_from_slice(
            &(rng.pick_or(&[0u16, 33, 37], |r| r.below(0x1_0000) as u16)).to_le_bytes(),
        );
        d[4] = rng.pick_or(&[34u8, 38, 54], |r| r.below(256) as u8);
        d[5] = rng.pick_or(&[50u8, 40, 54], |r| r.below(256) as u8);
        d[6..8].copy_from_slice(&(rng.below(0x1_0000) as u16 * rng.below(2) as u16).to_le_bytes());
        let paylen = rng.below(1 << 20) as u32;
        d[8..11].copy_from_slice(&paylen.to_le_bytes()[..3]);
        d[10] = (d[10] & 0xf) | TXD_DTYP_CONTEXT << 4;
        let tucmd = rng.below(4) as u8 | if rng.chance(50) { TXD_CMD_TSE } else { 0 };
        d[11] = tucmd | TXD_CMD_DEXT | cmd_extra & (TXD_CMD_RS | TXD_CMD_IDE);
        d[13] = rng.pick_or(&[54u8, 58, 0, 20], |r| r.below(256) as u8);
        d[14..16].copy_from_slice(
            &(rng.pick_or(&[1448u16, 0, 1, 8], |r| r.below(0x1_0000) as u16)).to_le_bytes(),
        );
        return d;
    }
    d[..8].copy_from_slice(&buf.to_le_bytes());
    if kind < 6 {
        // Data descriptor.
        d[8..11].copy_from_slice(&(len as u32).to_le_bytes()[..3]);
        d[10] = (d[10] & 0xf) | TXD_DTYP_DATA << 4;
        d[11] = TXD_CMD_DEXT | cmd_extra | if rng.chance(30) { TXD_CMD_TSE } else { 0 };
        d[13] = rng.below(4) as u8;
    } else {
        // Legacy descriptor.
        d[8..10].copy_from_slice(&(len as u16).to_le_bytes());
        d[10] = rng.pick_or(&[0u8, 24, 40, 50], |r| r.below(256) as u8);
        d[11] = cmd_extra | if rng.chance(30) { TXD_CMD_IC } else { 0 };
        d[13] = rng.pick_or(&[0u8, 14, 34], |r| r.below(256) as u8);
    }
    d[14..16].copy_from_slice(&(rng.below(0x1_0000) as u16).to_le_bytes());
    if rng.chance(4) {
        d[rng.usize(16)] ^= 1 << rng.below(8);
    }
    d
}

impl Model for E1000 {
    const NAME: &'static str = "e1000";
    const ABOUT: &'static str = "Intel 82540EM: rings, context/TSO descriptors, EEPROM, PHY";
    const RAM: u64 = e1k::MEM_SIZE as u64;
    const INIT_VARIANTS: u8 = 3;
    type Gen = E1000Gen;
    fn rig(b: net_backends::mem::MemBackend) -> Box<dyn Rig> {
        Box::new(E1000Rig(e1k::Driver::new_in(
            split_ram(Self::RAM),
            Box::new(b),
        )))
    }
    fn bars() -> &'static [(u8, u64)] {
        E1000_BARS
    }
    fn regs() -> &'static [(u8, u64, u8)] {
        E1000_REGS
    }
    fn driver_ops(g: &mut E1000Gen, rng: &mut Rng, _vnet: bool, out: &mut Vec<NicOp>) {
        use e1k::*;
        let ring = RING_SIZE as u32;
        if rng.chance(65) {
            let f = frame(rng);
            let parts = if rng.chance(70) {
                1
            } else {
                rng.range(2, 4) as usize
            };
            let chunk = f.len().div_ceil(parts).max(1);
            let pieces: Vec<&[u8]> = f.chunks(chunk).collect();
            if rng.chance(30) {
                // A context descriptor first.
                let i = g.tdt % ring;
                let d = e1000_tx_desc(&mut Rng::new(rng.next_u64() | 1), 0, 0, false);
                let mut d = d;
                d[10] &= 0xf;
                d[11] |= TXD_CMD_DEXT;
                out.push(NicOp::Mem {
                    addr: TX_RING + i as u64 * 16,
                    data: Bytes(d.to_vec()),
                });
                g.tdt += 1;
            }
            for (k, p) in pieces.iter().enumerate() {
                let i = g.tdt % ring;
                let buf = TX_BUFS + i as u64 * 0x1000;
                let buf = if p.len() > 0x1000 {
                    0x30_0000 - (p.len() as u64 & !0xfff)
                } else {
                    buf
                };
                out.push(NicOp::Mem {
                    addr: buf,
                    data: Bytes(p.to_vec()),
                });
                let addr = if rng.chance(92) {
                    buf
                } else {
                    frames::addr(rng, Self::RAM, &[TX_BUFS])
                };
                let len = if rng.chance(90) {
                    p.len()
                } else {
                    rng.below(0x2_0000) as usize
                };
                let d = e1000_tx_desc(rng, addr, len, k + 1 == pieces.len());
                out.push(NicOp::Mem {
                    addr: TX_RING + i as u64 * 16,
                    data: Bytes(d.to_vec()),
                });
                g.tdt += 1;
            }
            let tdt = if rng.chance(90) {
                (g.tdt % ring) as u64
            } else {
                rng.value(4)
            };
            out.push(NicOp::Write {
                bar: 0,
                off: TDT as u64,
                width: 4,
                val: tdt,
            });
        } else {
            for _ in 0..rng.range(1, 16) {
                let i = g.rdt % ring;
                let buf = if rng.chance(92) {
                    RX_BUFS + i as u64 * RX_BUF_SIZE as u64
                } else {
                    frames::addr(rng, Self::RAM, &[RX_BUFS])
                };
                let mut d = [0u8; 16];
                d[..8].copy_from_slice(&buf.to_le_bytes());
                if rng.chance(10) {
                    d[12] = rng.below(256) as u8;
                }
                out.push(NicOp::Mem {
                    addr: RX_RING + i as u64 * 16,
                    data: Bytes(d.to_vec()),
                });
                g.rdt += 1;
            }
            let rdt = if rng.chance(90) {
                (g.rdt % ring) as u64
            } else {
                rng.value(4)
            };
            out.push(NicOp::Write {
                bar: 0,
                off: RDT as u64,
                width: 4,
                val: rdt,
            });
        }
    }
    fn reset(g: &mut E1000Gen, _rng: &mut Rng) -> NicOp {
        *g = E1000Gen::default();
        NicOp::Write {
            bar: 0,
            off: e1k::CTRL as u64,
            width: 4,
            val: e1k::CTRL_RST as u64,
        }
    }
}

// ---- virtio-net -------------------------------------------------------------------------------

pub struct VirtioNet;

mod vio {
    pub use devices::virtio::net::driver::*;
    pub use devices::virtio::net::*;
    pub use devices::virtio::transport::*;
    pub use devices::virtio::*;
}

/// Two queue pairs (VIRTIO_NET_F_MQ offered) on two in-memory backends; the second backend's
/// peer is kept for the rig's life.
struct VirtioRig(vio::Driver, net_backends::mem::MemPeer);

/// Queues the rig's driver sets up: two pairs, then the control queue (index 4 with
/// VIRTIO_NET_F_MQ; without it the control queue is 2).
const VIRTIO_QUEUES: usize = 5;

impl Rig for VirtioRig {
    fn dev(&mut self) -> &mut dyn NicDevice {
        &mut self.0.dev
    }
    fn mem(&self) -> &GuestMemoryMmap {
        &self.0.mem
    }
    fn init(&mut self, v: u8) {
        use vio::*;
        let offered = self.0.device_features();
        let want = match v {
            0 => offered,
            1 => offered & !(VIRTIO_NET_F_MRG_RXBUF | VIRTIO_F_RING_EVENT_IDX),
            _ => offered & !VIRTIO_F_RING_INDIRECT_DESC,
        };
        let want = if v == 1 {
            want & !VIRTIO_NET_F_MQ
        } else {
            want
        };
        if !self.0.negotiate(want) {
            return;
        }
        for q in 0..VIRTIO_QUEUES {
            self.0.setup_queue(q, QSIZE);
        }
        if v < 3 {
            self.0.driver_ok();
        }
        if v == 0 {
            // Both pairs in use, as Linux asks with two vCPUs, and frames waiting on the
            // second backend queue for whatever RX buffers the ops give queue 2.
            let _ = self.0.ctrl(4, 4, 0, &2u16.to_le_bytes());
            for len in [60, 1514, 9000] {
                let mut f = vec![0xa5u8; len];
                f[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
                self.1.inject(&f);
            }
        }
    }
}

#[derive(Default)]
pub struct VirtioGen {
    avail: [u16; VIRTIO_QUEUES],
    desc: [u16; VIRTIO_QUEUES],
}

/// A control command as Linux's virtio_net sends them (class, command, data), sometimes
/// bent: RX mode switches, MAC tables (some over the device's 64 entries, some with counts
/// past their data), the MAC address, queue pairs (0 to 3 of the device's 2), unknown ones.
fn ctrl_command(rng: &mut Rng) -> Vec<u8> {
    let mut c = match rng.below(6) {
        0 => vec![0, rng.below(7) as u8, rng.below(2) as u8],
        1 => {
            let mut c = vec![1, 0];
            for _ in 0..2 {
                let n = rng.pick(&[0u32, 1, 3, 64, 65, 200]);
                let claimed = if rng.chance(10) {
                    rng.next_u64() as u32
                } else {
                    n
                };
                c.extend(claimed.to_le_bytes());
                for _ in 0..n {
                    c.extend(rng.bytes(6));
                }
            }
            c
        }
        2 => {
            let mut c = vec![1, 1];
            c.extend(rng.bytes(6));
            c
        }
        3 => vec![4, 0, rng.below(4) as u8, 0],
        4 => {
            let n = rng.below(12) as usize;
            rng.bytes(n)
        }
        _ => vec![rng.below(9) as u8, rng.below(3) as u8, rng.below(2) as u8],
    };
    if rng.chance(10) && !c.is_empty() {
        let at = rng.usize(c.len());
        c[at] ^= 1 << rng.below(8);
    }
    c
}

const VIRTIO_BARS: &[(u8, u64)] = &[(1, 0x1000), (4, 0x4000)];
const VIRTIO_REGS: &[(u8, u64, u8)] = &[
    (4, 0x00, 4),
    (4, 0x04, 4),
    (4, 0x08, 4),
    (4, 0x0c, 4),
    (4, 0x10, 2),
    (4, 0x12, 2),
    (4, 0x14, 1),
    (4, 0x14, 1),
    (4, 0x15, 1),
    (4, 0x16, 2),
    (4, 0x16, 2),
    (4, 0x18, 2),
    (4, 0x1a, 2),
    (4, 0x1c, 2),
    (4, 0x1e, 2),
    (4, 0x20, 8),
    (4, 0x20, 4),
    (4, 0x24, 4),
    (4, 0x28, 8),
    (4, 0x30, 8),
    (4, 0x1000, 1),
    (4, 0x2000, 4),
    (4, 0x2006, 2),
    (4, 0x3000, 2),
    (4, 0x3004, 2),
    (4, 0x3008, 2),
    (4, 0x300c, 2),
    (4, 0x3010, 2),
    (4, 0x2008, 2),
    (1, 0x00, 4),
    (1, 0x08, 4),
    (1, 0x0c, 4),
    (1, 0x1c, 4),
    (1, 0x800, 8),
];

fn vdesc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(16);
    b.extend(addr.to_le_bytes());
    b.extend(len.to_le_bytes());
    b.extend(flags.to_le_bytes());
    b.extend(next.to_le_bytes());
    b
}

impl Model for VirtioNet {
    const NAME: &'static str = "virtio-net";
    const ABOUT: &'static str =
        "virtio-net-pci: two queue pairs and the control queue, mergeable RX, indirect, offloads";
    const RAM: u64 = vio::MEM_SIZE as u64;
    const INIT_VARIANTS: u8 = 4;
    type Gen = VirtioGen;
    fn rig(b: net_backends::mem::MemBackend) -> Box<dyn Rig> {
        use net_backends::NetBackend;
        let (b2, peer2) = net_backends::mem::pair(b.capabilities());
        // With an MTU offered (host_mtu=9000): its feature bit and configuration field.
        let opts = devices::virtio::net::VirtioNetOptions {
            mq: true,
            mtu: Some(9000),
            ..Default::default()
        };
        let d = vio::Driver::new_in(split_ram(Self::RAM), vec![Box::new(b), Box::new(b2)], opts);
        Box::new(VirtioRig(d, peer2))
    }
    fn bars() -> &'static [(u8, u64)] {
        VIRTIO_BARS
    }
    fn regs() -> &'static [(u8, u64, u8)] {
        VIRTIO_REGS
    }
    fn driver_ops(g: &mut VirtioGen, rng: &mut Rng, vnet: bool, out: &mut Vec<NicOp>) {
        use vio::*;
        let q = rng.usize(VIRTIO_QUEUES);
        let qsize = QSIZE;
        // The control queue's slot, or queue 2 taken as the control queue (without MQ).
        let ctrl = q == 4 || (q == 2 && rng.chance(30));
        let chain = if ctrl { 2 } else { rng.range(1, 4) as u16 };
        let head = g.desc[q] % qsize;
        for k in 0..chain {
            let i = (g.desc[q] % qsize) as u64;
            g.desc[q] = g.desc[q].wrapping_add(1);
            let buf = buf_base(q) + i * 0x1000;
            let mut len: u32 = if ctrl && k == 0 {
                let c = ctrl_command(rng);
                let n = c.len() as u32;
                out.push(NicOp::Mem {
                    addr: buf,
                    data: Bytes(c),
                });
                n
            } else if ctrl {
                1
            } else if q % 2 == 1 {
                let mut f = vnet_hdr(rng, 0).to_vec();
                if k == 0 || rng.chance(50) {
                    f.extend(frame(rng));
                }
                let n = f.len() as u32;
                out.push(NicOp::Mem {
                    addr: buf,
                    data: Bytes(f),
                });
                n
            } else {
                rng.pick(&[12u32, 1526, 65562, 4096, 1, 0, 11])
            };
            if rng.chance(10) {
                len = rng.pick_or(&[0, u32::MAX, 0x1_0000], |r| r.next_u64() as u32);
            }
            let writable = if ctrl {
                k + 1 == chain
            } else {
                q.is_multiple_of(2)
            };
            let mut flags = if writable { VRING_DESC_F_WRITE } else { 0 };
            if k + 1 < chain {
                flags |= VRING_DESC_F_NEXT;
            }
            if rng.chance(5) {
                flags ^= 1 << rng.below(3); // NEXT, WRITE or INDIRECT where it should not be
            }
            let next = if rng.chance(90) {
                g.desc[q] % qsize
            } else {
                rng.below(0x1_0000) as u16
            };
            let addr = if rng.chance(92) {
                buf
            } else {
                let a = frames::addr(rng, Self::RAM, &[buf_base(q)]);
                if rng.chance(50) {
                    u64::MAX - rng.below(16)
                } else {
                    a
                }
            };
            out.push(NicOp::Mem {
                addr: desc_base(q) + i * 16,
                data: Bytes(vdesc(addr, len, flags, next)),
            });
        }
        if rng.chance(5) {
            // An indirect table somewhere, named by the head descriptor.
            let table = buf_base(q) + 0xf000;
            let n = rng.range(1, 20);
            let mut t = vec![];
            for j in 0..n {
                let f = if q.is_multiple_of(2) {
                    VRING_DESC_F_WRITE
                } else {
                    0
                } | if j + 1 < n { VRING_DESC_F_NEXT } else { 0 };
                t.extend(vdesc(
                    buf_base(q) + j * 64,
                    rng.pick(&[12, 64, 0]),
                    f,
                    (j + 1) as u16,
                ));
            }
            out.push(NicOp::Mem {
                addr: table,
                data: Bytes(t),
            });
            out.push(NicOp::Mem {
                addr: desc_base(q) + head as u64 * 16,
                data: Bytes(vdesc(table, (n * 16) as u32, 4, 0)),
            });
        }
        // Publish the head in the available ring, then move its index.
        let slot = g.avail[q] % qsize;
        out.push(NicOp::Mem {
            addr: avail_base(q) + 4 + 2 * slot as u64,
            data: Bytes(head.to_le_bytes().to_vec()),
        });
        g.avail[q] = g.avail[q].wrapping_add(1);
        let idx = match rng.below(20) {
            0 => rng.below(0x1_0000) as u16,
            1 => g.avail[q].wrapping_add(qsize + rng.below(300) as u16),
            2 => g.avail[q].wrapping_sub(rng.below(4) as u16),
            _ => g.avail[q],
        };
        out.push(NicOp::Mem {
            addr: avail_base(q) + 2,
            data: Bytes(idx.to_le_bytes().to_vec()),
        });
        if rng.chance(10) {
            // used_event / avail flags
            let at = if rng.chance(50) {
                avail_base(q) + 4 + 2 * qsize as u64
            } else {
                avail_base(q)
            };
            out.push(NicOp::Mem {
                addr: at,
                data: Bytes(rng.bytes(2)),
            });
        }
        let _ = vnet;
        // The control queue's doorbell is the last offset (2 * pairs) whatever its index.
        let off = if ctrl { 4 } else { q as u64 };
        if ctrl || rng.chance(60) {
            out.push(NicOp::Write {
                bar: 4,
                off: NOTIFY_CFG + off * NOTIFY_OFF_MULTIPLIER as u64,
                width: 2,
                val: q as u64,
            });
        }
        out.push(NicOp::Event(match q {
            0 => Ev::RxKick,
            1 => Ev::TxKick,
            _ => Ev::Pending,
        }));
    }
    fn reset(g: &mut VirtioGen, _rng: &mut Rng) -> NicOp {
        *g = VirtioGen::default();
        NicOp::Write {
            bar: 4,
            off: devices::virtio::transport::DEVICE_STATUS,
            width: 1,
            val: 0,
        }
    }
}

/// The NIC targets' entries.
pub type Rtl8139CplusTarget = Nic<Rtl8139Cplus>;
pub type Rtl8139NormalTarget = Nic<Rtl8139Normal>;
pub type E1000Target = Nic<E1000>;
pub type VirtioNetTarget = Nic<VirtioNet>;
