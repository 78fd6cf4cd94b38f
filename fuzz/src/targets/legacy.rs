//! The legacy PC devices on the port bus (COM1, i8042, CMOS) and pvpanic's BAR, with
//! accesses of every width at and around their ports and console input for the UART. A
//! snapshot operation saves all four, edits the saved JSON (see [`StateEdit`]) and restores
//! into fresh devices: refused or restored, never a panic; when restored, the case goes on
//! with the restored devices.

use super::pci::StateEdit;
use super::Bytes;
use crate::harness::{op, Target};
use crate::rng::Rng;
use devices::bus::Bus;
use devices::legacy::{Cmos, Serial, I8042};
use devices::lifecycle::Lifecycle;
use devices::pci::PciDevice;
use devices::pvpanic::PvPanic;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LegacyOp {
    Pio {
        port: u16,
        width: u8,
        val: u32,
        write: bool,
    },
    PvPanic {
        off: u64,
        width: u8,
        val: u8,
        write: bool,
    },
    SerialInput(Bytes),
    Snapshot(StateEdit),
    /// A string instruction's exit (`rep ins`/`outs`): `data` cut into items of `size` bytes,
    /// each an access to `port`, as the vCPU thread dispatches it.
    StringPio {
        port: u16,
        size: u8,
        data: Bytes,
        write: bool,
    },
}

pub struct Legacy;

const PORTS: [(u16, u16); 3] = [(0x3f8, 8), (0x60, 5), (0x70, 2)];

impl Target for Legacy {
    const NAME: &'static str = "legacy";
    const ABOUT: &'static str = "16550 UART, i8042, CMOS RTC and pvpanic";
    type Op = LegacyOp;

    fn generate(rng: &mut Rng) -> Vec<LegacyOp> {
        let n = rng.range(1, 200) as usize;
        (0..n)
            .map(|_| match rng.below(40) {
                0 => LegacyOp::Snapshot(StateEdit::generate(rng)),
                1..=4 => {
                    let len = rng.len(16, 300);
                    LegacyOp::SerialInput(Bytes(rng.bytes(len)))
                }
                9..=11 => {
                    let (base, len) = rng.pick(&PORTS);
                    let n = rng.len(8, 64);
                    LegacyOp::StringPio {
                        port: base + rng.below(len as u64 + 2) as u16,
                        size: rng.pick(&[0u8, 1, 1, 2, 4]),
                        data: Bytes(rng.bytes(n)),
                        write: rng.chance(50),
                    }
                }
                5..=8 => LegacyOp::PvPanic {
                    off: rng.below(20),
                    width: rng.pick(&[1u8, 2, 4, 8]),
                    val: rng.below(256) as u8,
                    write: rng.chance(50),
                },
                _ => {
                    let (base, len) = rng.pick(&PORTS);
                    LegacyOp::Pio {
                        port: base + rng.below(len as u64 + 2) as u16,
                        width: rng.pick(&[1u8, 1, 1, 2, 4]),
                        val: rng.value(4) as u32,
                        write: rng.chance(60),
                    }
                }
            })
            .collect()
    }

    fn execute(ops: &[LegacyOp]) {
        let lifecycle = Arc::new(Lifecycle::new().unwrap());
        let mut m = Devices::new(&lifecycle);
        for (i, o) in ops.iter().enumerate() {
            op(i);
            match o {
                LegacyOp::Pio {
                    port,
                    width,
                    val,
                    write,
                } => {
                    let n = (*width as usize).min(4);
                    if *write {
                        m.pio.write(*port as u64, &val.to_le_bytes()[..n]);
                    } else {
                        let mut b = [0u8; 4];
                        m.pio.read(*port as u64, &mut b[..n]);
                    }
                }
                LegacyOp::StringPio {
                    port,
                    size,
                    data,
                    write,
                } => {
                    if *write {
                        m.pio.write_port(*port as u64, *size as usize, &data.0);
                    } else {
                        let mut b = data.0.clone();
                        m.pio.read_port(*port as u64, *size as usize, &mut b);
                    }
                }
                LegacyOp::PvPanic {
                    off,
                    width,
                    val,
                    write,
                } => {
                    let mut b = [0u8; 8];
                    b[0] = *val;
                    let n = (*width as usize).min(8);
                    if *write {
                        m.panic_dev.bar_write(0, *off, &b[..n]);
                    } else {
                        m.panic_dev.bar_read(0, *off, &mut b[..n]);
                    }
                }
                LegacyOp::SerialInput(b) => m.serial.lock().unwrap().queue_input(&b.0),
                LegacyOp::Snapshot(edit) => {
                    let text = serde_json::to_string(&m.save()).unwrap();
                    let mut state: serde_json::Value = serde_json::from_str(&text).unwrap();
                    edit.apply(&mut state);
                    let mut fresh = Devices::new(&lifecycle);
                    if fresh.restore(&state).is_ok() {
                        m = fresh;
                    }
                }
            }
        }
    }
}

/// The devices on their port bus, as nicvm builds them.
struct Devices {
    pio: Bus,
    serial: Arc<Mutex<Serial>>,
    i8042: Arc<Mutex<I8042>>,
    cmos: Arc<Mutex<Cmos>>,
    panic_dev: PvPanic,
}

impl Devices {
    fn new(lifecycle: &Arc<Lifecycle>) -> Devices {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(std::io::sink()))));
        let i8042 = Arc::new(Mutex::new(I8042::new(lifecycle.clone())));
        let cmos = Arc::new(Mutex::new(Cmos::default()));
        let mut pio = Bus::new();
        pio.insert(0x3f8, 8, serial.clone()).unwrap();
        pio.insert(0x60, 5, i8042.clone()).unwrap();
        pio.insert(0x70, 2, cmos.clone()).unwrap();
        Devices {
            pio,
            serial,
            i8042,
            cmos,
            panic_dev: PvPanic::new(lifecycle.clone()),
        }
    }

    fn save(&self) -> serde_json::Value {
        serde_json::json!({
            "serial": self.serial.lock().unwrap().save(),
            "i8042": self.i8042.lock().unwrap().save(),
            "cmos": self.cmos.lock().unwrap().save(),
            "pvpanic": self.panic_dev.save(),
        })
    }

    /// A missing part restores from `null`, which every device refuses.
    fn restore(&mut self, s: &serde_json::Value) -> Result<(), devices::snapshot::RestoreError> {
        let part = |k: &str| s.get(k).cloned().unwrap_or_default();
        self.serial.lock().unwrap().restore(&part("serial"))?;
        self.i8042.lock().unwrap().restore(&part("i8042"))?;
        self.cmos.lock().unwrap().restore(&part("cmos"))?;
        self.panic_dev.restore(&part("pvpanic"))
    }
}
