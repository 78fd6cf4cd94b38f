//! Realtek RTL8139C+ (PCI 10EC:8139), in both of its personalities:
//!
//! * **C+** (default, PCI revision 0x20): what Linux's `8139cp` drives. Descriptor rings for TX
//!   (TNPDS) and RX (RDSAR), checksum offload, large send (TCP segmentation in the model),
//!   VLAN insert/strip and the tally-counter dump (DTCCR), enabled through CPCR.
//! * **Normal** (`cplus=off`, PCI revision 0x10, TCR reports an RTL8139C): what `8139too`
//!   drives. Four TX slots (TSD0-3/TSAD0-3) and the RX ring buffer at RBSTART, read by the
//!   driver through CAPR while the device writes at CBR.
//!
//! Both: IDR/MAR filtering per RCR, ISR/IMR with a level-triggered INTx, the 93C46 EEPROM
//! behind 9346CR, the internal PHY's MII registers (BMCR/BMSR/ANAR/ANLPAR) with link up, and
//! the TCTR/TimerInt timer.
//!
//! Registers are named as in the RTL8139C(L)+ datasheet. Register access arrives on vCPU
//! threads and transmits there; receive runs on the I/O thread. Both hold the device lock.
//! The network side (backend, flow control, counters, the guest-error log) is the port's.
//!
//! Differences from the silicon, on purpose: received frames that do not fit wait in the
//! model (the backend stops being read) instead of being dropped, so a slow guest gets
//! backpressure, not loss; loopback modes of TCR and early RX/TX thresholds are not modelled;
//! a DMA access outside guest memory stops the engine that made it and raises SERR (ISR bit
//! 15), which is how a PCI master abort looks to the driver, until the driver resets the chip.
//! A backend with a virtio-net header is hidden behind the port (frames cross without it).

pub mod desc;
mod eeprom;
pub mod rx;
mod state;
pub mod tx;

/// A synthetic driver for tests, the fuzzer and the no-guest benchmark.
#[cfg(any(test, feature = "test-drivers"))]
pub mod driver;
#[cfg(test)]
mod tests;

use crate::interrupt::IntxLine;
use crate::net::guest_iov::Piece;
use crate::net::tx_stage::TxStage;
use crate::net::{NetPort, NicModel, Rx, RxFilter, RxState, Timer};
use crate::pci::{BarKind, PciConfig, PCI_COMMAND_INTX_DISABLE};
use desc::Tally;
use eeprom::Eeprom93c46;
use net_backends::vnet::VnetHdr;
use net_backends::MacAddr;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub const REALTEK_VENDOR: u16 = 0x10ec;
pub const RTL8139_DEVICE: u16 = 0x8139;
/// PCI revision IDs: 8139cp binds to >= 0x20, 8139too to anything below.
pub const REVISION_CPLUS: u8 = 0x20;
pub const REVISION_NORMAL: u8 = 0x10;
/// Both BARs (I/O at 0, memory at 1) map the same 256 registers.
pub const BAR_IO: usize = 0;
pub const BAR_MEM: usize = 1;
pub const REGS_SIZE: u64 = 0x100;

// Register offsets (datasheet section 6). Some offsets mean different things in C+ mode.
pub const IDR0: usize = 0x00;
pub const MAR0: usize = 0x08;
pub const TSD0: usize = 0x10;
pub const DTCCR: usize = 0x10; // C+ mode
pub const TSAD0: usize = 0x20;
pub const TNPDS: usize = 0x20; // C+ mode
pub const THPDS: usize = 0x28; // C+ mode
pub const RBSTART: usize = 0x30;
pub const CR: usize = 0x37;
pub const CAPR: usize = 0x38;
pub const CBR: usize = 0x3a;
pub const IMR: usize = 0x3c;
pub const ISR: usize = 0x3e;
pub const TCR: usize = 0x40;
pub const RCR: usize = 0x44;
pub const TCTR: usize = 0x48;
pub const MPC: usize = 0x4c;
pub const CR9346: usize = 0x50;
pub const CONFIG0: usize = 0x51;
pub const CONFIG1: usize = 0x52;
pub const TIMER_INT: usize = 0x54;
pub const MSR: usize = 0x58;
pub const CONFIG3: usize = 0x59;
pub const CONFIG4: usize = 0x5a;
pub const MULINT: usize = 0x5c;
pub const TSAD: usize = 0x60;
pub const BMCR: usize = 0x62;
pub const BMSR: usize = 0x64;
pub const ANAR: usize = 0x66;
pub const ANLPAR: usize = 0x68;
pub const ANER: usize = 0x6a;
/// CS Configuration Register; Linux's 8139too reads its link bits on a LinkChg interrupt.
pub const CSCR: usize = 0x74;
pub const CONFIG5: usize = 0xd8;
pub const TPPOLL: usize = 0xd9;
pub const CPCR: usize = 0xe0;
pub const INTR_MITIGATE: usize = 0xe2;
pub const RDSAR: usize = 0xe4;

// CR
pub const CR_BUFE: u8 = 0x01;
pub const CR_TE: u8 = 0x04;
pub const CR_RE: u8 = 0x08;
pub const CR_RST: u8 = 0x10;

// ISR / IMR
pub const INT_ROK: u16 = 1 << 0;
pub const INT_RER: u16 = 1 << 1;
pub const INT_TOK: u16 = 1 << 2;
pub const INT_TER: u16 = 1 << 3;
/// RX buffer overflow (normal mode) / RX descriptor unavailable (C+ mode).
pub const INT_RXOVW_RDU: u16 = 1 << 4;
pub const INT_LINKCHG: u16 = 1 << 5;
pub const INT_TIMEOUT: u16 = 1 << 14;
pub const INT_SERR: u16 = 1 << 15;

// RCR
pub const RCR_AAP: u32 = 1 << 0;
pub const RCR_APM: u32 = 1 << 1;
pub const RCR_AM: u32 = 1 << 2;
pub const RCR_AB: u32 = 1 << 3;
pub const RCR_WRAP: u32 = 1 << 7;
pub const RCR_RBLEN_SHIFT: u32 = 11;

// TCR: hardware version bits (30:26 and 23:22) are read-only.
const TCR_HWVERID_MASK: u32 = 0x7cc0_0000;
/// HWVERID of an RTL8139C+ (what QEMU and the silicon report) and of a plain RTL8139C.
const HWVERID_8139CPLUS: u32 = 0x7480_0000;
const HWVERID_8139C: u32 = 0x7400_0000;

// TSD0-3
pub const TSD_SIZE: u32 = 0x1fff;
pub const TSD_OWN: u32 = 1 << 13;
pub const TSD_TOK: u32 = 1 << 15;
pub const TSD_TABT: u32 = 1 << 30;

// CPCR
pub const CPCR_TXON: u16 = 1 << 0;
pub const CPCR_RXON: u16 = 1 << 1;
pub const CPCR_RXCHKSUM: u16 = 1 << 5;
pub const CPCR_RXVLAN: u16 = 1 << 6;

/// TPPoll: normal-priority queue polling request.
pub const TPPOLL_NPQ: u8 = 1 << 6;
/// DTCCR: start the tally-counter dump; cleared by the device when done.
pub const DTCCR_CMD: u32 = 1 << 3;

// 9346CR operating modes (bits 7:6).
const EEM_MASK: u8 = 0xc0;
const EEM_AUTOLOAD: u8 = 0x40;
const EEM_PROGRAM: u8 = 0x80;
const EEM_CONFIG_WRITE: u8 = 0xc0;

// MII
const BMCR_RESET: u16 = 0x8000;
const BMCR_DEFAULT: u16 = 0x3100; // 100 Mb/s, autonegotiation, full duplex
const BMSR_LINK: u16 = 0x0004;
const BMSR_AN_COMPLETE: u16 = 0x0020;
const BMSR_CAPS: u16 = 0x7809; // 100BASE-TX FD/HD, 10BASE-T FD/HD, autoneg, extended regs
const ANAR_DEFAULT: u16 = 0x05e1;
const MSR_LINKB: u8 = 0x04;
/// CSCR as 8139too names its bits: link OK, and "the link changed" (cleared when read).
const CSCR_LINK_OK: u16 = 0x0400;
const CSCR_LINK_CHANGE: u16 = 0x0800;

/// The counter behind TCTR runs at the PCI clock.
const TCTR_HZ: u64 = 33_000_000;
/// TCTR's period: its 32 bits counted at TCTR_HZ (about 130 s).
const TCTR_PERIOD: Duration = Duration::from_nanos((1u64 << 32) * 1_000_000_000 / TCTR_HZ);

/// The first time TCTR matches again at or after `now`, given one match at `t`: `t` itself,
/// or `t` plus as many whole periods as it takes.
fn next_match(t: Instant, now: Instant) -> Instant {
    let late = now.saturating_duration_since(t);
    if late.is_zero() {
        return t;
    }
    let period = TCTR_PERIOD.as_nanos();
    let periods = late.as_nanos().div_ceil(period);
    let ahead = u64::try_from(periods * period).unwrap_or(u64::MAX);
    t.checked_add(Duration::from_nanos(ahead))
        .unwrap_or(now + TCTR_PERIOD)
}

/// The longest frame either driver accepts from the normal-mode ring (8139too's
/// MAX_ETH_FRAME_SIZE); the TX slots have the same limit.
pub const MAX_NORMAL_FRAME: usize = 1792;
/// How often a stalled C+ receiver looks at its ring again when the driver gave it no hint.
const RX_POLL: Duration = Duration::from_millis(1);

pub struct Rtl8139 {
    config: PciConfig,
    intx: IntxLine,
    line: bool,
    /// Assertions of the line so far.
    interrupts: u64,
    mem: GuestMemoryMmap,
    mac: MacAddr,
    /// Whether the backend's link is up, as the port last said.
    wire_up: bool,
    /// C+ personality (revision 0x20) rather than a plain RTL8139C.
    cplus: bool,
    /// Storage for registers without side effects, at their offsets.
    regs: [u8; 256],
    isr: u16,
    imr: u16,
    tsd: [u32; 4],
    /// Normal-mode RX write offset (CBR).
    cbr: u16,
    eeprom: Eeprom93c46,
    /// TCTR counts from here.
    tctr_epoch: Instant,
    timer_int_at: Option<Instant>,
    timer: Timer,

    /// Next C+ descriptor index of each ring.
    cp_tx_index: u16,
    cp_rx_index: u16,
    /// Options of the first descriptor of the C+ frame being gathered.
    cp_tx_opts: (u32, u32),
    /// The C+ frame being gathered grew too large; its descriptors are consumed unsent.
    cp_tx_drop: bool,
    /// Where the C+ frame being gathered lies in guest memory, and its length so far.
    cp_tx_pieces: Vec<Piece>,
    cp_tx_len: usize,
    /// Its descriptors, with the status each gets once the frame is sent (the guest may
    /// reuse a buffer as soon as its descriptor is back).
    cp_tx_descs: Vec<(GuestAddress, u32)>,
    /// A C+ frame's first bytes copied out of guest memory for the offloads once it is
    /// whole (or all of it, when an offload needs it); while a frame is gathered, the bytes
    /// a snapshot of an earlier build had copied.
    tx_buf: TxStage,
    /// The I/O vectors of the frame going out (kept for their allocation).
    tx_iov: Vec<IoSlice<'static>>,
    tx_scratch: Vec<u8>,
    /// Frames the backend could not take yet, in order, each with the offload header it goes
    /// with; transmit waits while the list is not empty.
    tx_backlog: VecDeque<(Option<VnetHdr>, Vec<u8>)>,
    /// Normal-mode slots written by the driver and not yet sent (backend full), in order.
    tx_waiting: VecDeque<usize>,
    /// A DMA error stopped this engine until the next reset.
    tx_dead: bool,
    rx_dead: bool,
    /// The link state the driver last saw (changes raise LinkChg).
    link: bool,
    /// The link changed since the driver last read CSCR.
    cscr_link_change: bool,

    /// Scratch for a received frame without its VLAN tag, and for the descriptors a frame
    /// goes into.
    rx_scratch: Vec<u8>,
    rx_descs: Vec<(vm_memory::GuestAddress, u32, u64, usize)>,
    /// The C+ receiver found no descriptor: it looks again every [`RX_POLL`] (8139cp gives no
    /// other hint when it refills).
    rx_poll: bool,
    pub tally: Tally,
}

impl Rtl8139 {
    /// `cplus` picks the personality: true for the RTL8139C+ (8139cp), false for a plain
    /// RTL8139C (8139too).
    pub fn new(
        mac: MacAddr,
        mem: GuestMemoryMmap,
        intx: IntxLine,
        cplus: bool,
    ) -> io::Result<Self> {
        let revision = if cplus {
            REVISION_CPLUS
        } else {
            REVISION_NORMAL
        };
        let mut config =
            PciConfig::new(REALTEK_VENDOR, RTL8139_DEVICE, (0x02, 0x00, 0x00), revision);
        config.set_subsystem(REALTEK_VENDOR, RTL8139_DEVICE);
        config.set_interrupt(1, intx.gsi() as u8);
        config.add_bar(BAR_IO, BarKind::Io, REGS_SIZE);
        config.add_bar(BAR_MEM, BarKind::Mem32, REGS_SIZE);

        let mut words = [0u16; 64];
        words[0] = 0x8129;
        words[1] = REALTEK_VENDOR;
        words[2] = RTL8139_DEVICE;
        words[3] = REALTEK_VENDOR;
        words[4] = RTL8139_DEVICE;
        for i in 0..3 {
            words[7 + i] = u16::from_le_bytes([mac.0[2 * i], mac.0[2 * i + 1]]);
        }
        let mut dev = Rtl8139 {
            config,
            intx,
            line: false,
            interrupts: 0,
            mem,
            mac,
            wire_up: true,
            cplus,
            regs: [0; 256],
            isr: 0,
            imr: 0,
            tsd: [TSD_OWN; 4],
            cbr: 0,
            eeprom: Eeprom93c46::new(words),
            tctr_epoch: Instant::now(),
            timer_int_at: None,
            timer: Timer::new()?,
            cp_tx_index: 0,
            cp_rx_index: 0,
            cp_tx_opts: (0, 0),
            cp_tx_drop: false,
            cp_tx_pieces: Vec::new(),
            cp_tx_len: 0,
            cp_tx_descs: Vec::new(),
            tx_buf: TxStage::with_capacity(net_backends::MAX_FRAME),
            tx_iov: Vec::new(),
            tx_scratch: Vec::with_capacity(2048),
            tx_backlog: VecDeque::new(),
            tx_waiting: VecDeque::with_capacity(4),
            tx_dead: false,
            rx_dead: false,
            link: true,
            cscr_link_change: false,
            rx_scratch: Vec::with_capacity(2048),
            rx_descs: Vec::with_capacity(4),
            rx_poll: false,
            tally: Tally::default(),
        };
        dev.load_mac_from_eeprom();
        dev.set16(BMCR, BMCR_DEFAULT);
        dev.set16(ANAR, ANAR_DEFAULT);
        dev.reset(None);
        Ok(dev)
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.regs[off], self.regs[off + 1]])
    }
    fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.regs[off..off + 4].try_into().unwrap())
    }
    fn get64(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.regs[off..off + 8].try_into().unwrap())
    }
    fn set16(&mut self, off: usize, v: u16) {
        self.regs[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32(&mut self, off: usize, v: u32) {
        self.regs[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn load_mac_from_eeprom(&mut self) {
        for i in 0..3 {
            let w = self.eeprom.words[7 + i].to_le_bytes();
            self.regs[IDR0 + 2 * i..IDR0 + 2 * i + 2].copy_from_slice(&w);
        }
    }

    /// The address the receive filter matches (IDR0-5, which the driver may rewrite).
    fn station_address(&self) -> [u8; 6] {
        self.regs[IDR0..IDR0 + 6].try_into().unwrap()
    }

    /// CR.RST (and power-up): the engines stop, pointers and interrupts clear. IDR, MAR and
    /// the EEPROM keep their contents.
    fn reset(&mut self, port: Option<&mut NetPort>) {
        self.isr = 0;
        self.imr = 0;
        self.regs[CR] = 0;
        self.set16(CAPR, 0xfff0);
        self.cbr = 0;
        self.set32(RCR, 0);
        self.set32(TCR, 0);
        self.tsd = [TSD_OWN; 4];
        self.set16(CPCR, 0);
        self.cp_tx_index = 0;
        self.cp_rx_index = 0;
        self.cp_tx_pieces.clear();
        self.cp_tx_len = 0;
        // Bytes gathered before the reset are not the start of the next frame.
        self.tx_buf.clear();
        self.cp_tx_descs.clear();
        self.cp_tx_drop = false;
        self.tx_waiting.clear();
        self.tx_dead = false;
        self.rx_dead = false;
        self.rx_poll = false;
        self.update_irq();
        self.arm_timer();
        // The receiver state changed: let the I/O thread look again.
        if let Some(port) = port {
            port.kick_rx();
        }
    }

    /// C+ registers are decoded when the personality has them and the driver turned C+
    /// transmit or receive on.
    fn cplus_mode(&self) -> bool {
        self.cplus && self.get16(CPCR) & (CPCR_TXON | CPCR_RXON) != 0
    }

    fn link_up(&self) -> bool {
        self.wire_up
    }

    /// A device error: logged through the port (once, then rate-limited); every one raises
    /// SERR.
    fn dma_error(&mut self, port: &mut NetPort, what: &str) {
        port.guest_error(format_args!(
            "{what}; the engine stops until the driver resets the chip"
        ));
        self.raise(INT_SERR);
    }

    fn raise(&mut self, bits: u16) {
        self.isr |= bits;
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let level = self.isr & self.imr != 0;
        if level && !self.line {
            self.interrupts += 1;
        }
        self.line = level;
        let masked = self.config.command() & PCI_COMMAND_INTX_DISABLE != 0;
        self.intx.set(level && !masked);
        self.config.set_interrupt_status(level);
    }

    fn tctr(&self) -> u32 {
        let ns = self.tctr_epoch.elapsed().as_nanos() as u64;
        (ns as u128 * TCTR_HZ as u128 / 1_000_000_000) as u32
    }

    /// Points the timer at the next TimerInt match or RX retry, whichever comes first.
    fn arm_timer(&mut self) {
        let mut next = self.timer_int_at;
        if self.rx_poll && self.cplus_mode() {
            let poll = Instant::now() + RX_POLL;
            next = Some(next.map_or(poll, |t| t.min(poll)));
        }
        match next {
            Some(t) => self.timer.arm(t.saturating_duration_since(Instant::now())),
            None => self.timer.disarm(),
        }
    }

    /// TCTR was reset or TimerInt written: the next match is when TCTR next counts to
    /// TimerInt: TimerInt ticks after the epoch, or, that being past (TCTR has counted beyond
    /// it), a whole number of TCTR's wraps later.
    fn schedule_timer_int(&mut self) {
        let ticks = self.get32(TIMER_INT) as u64;
        self.timer_int_at = (ticks != 0).then(|| {
            let first = self.tctr_epoch + Duration::from_nanos(ticks * 1_000_000_000 / TCTR_HZ);
            next_match(first, Instant::now())
        });
        self.arm_timer();
    }

    fn on_timer(&mut self, port: &mut NetPort) {
        self.timer.take();
        if let Some(t) = self.timer_int_at {
            let now = Instant::now();
            if now >= t {
                self.raise(INT_TIMEOUT);
                // TCTR wraps; it matches again a full period later (once, however late this
                // turn came: one interrupt, not one per period missed).
                self.timer_int_at = Some(next_match(t, now + Duration::from_nanos(1)));
            }
        }
        if self.rx_poll {
            // The stalled receiver looks at its ring again.
            self.rx_poll = false;
            port.kick_rx();
        }
        self.arm_timer();
    }

    fn read_byte(&mut self, off: usize, tctr: u32) -> u8 {
        let cp = self.cplus_mode();
        match off {
            TSD0..=0x1f if !cp => self.tsd[(off - TSD0) / 4].to_le_bytes()[off % 4],
            CR => self.regs[CR] & (CR_TE | CR_RE) | if self.rx_ring_empty() { CR_BUFE } else { 0 },
            CBR..=0x3b => self.cbr.to_le_bytes()[off - CBR],
            IMR..=0x3d => self.imr.to_le_bytes()[off - IMR],
            ISR..=0x3f => self.isr.to_le_bytes()[off - ISR],
            TCR..=0x43 => {
                let hw = if self.cplus {
                    HWVERID_8139CPLUS
                } else {
                    HWVERID_8139C
                };
                ((self.get32(TCR) & !TCR_HWVERID_MASK) | hw).to_le_bytes()[off - TCR]
            }
            TCTR..=0x4b => tctr.to_le_bytes()[off - TCTR],
            CR9346 => {
                let v = self.regs[CR9346] & !eeprom::EE_DO;
                v | if self.eeprom.data_out() {
                    eeprom::EE_DO
                } else {
                    0
                }
            }
            MSR => {
                if self.link_up() {
                    0
                } else {
                    MSR_LINKB
                }
            }
            TSAD..=0x61 => self.tx_summary().to_le_bytes()[off - TSAD],
            BMSR..=0x65 => {
                let link = if self.link_up() {
                    BMSR_LINK | BMSR_AN_COMPLETE
                } else {
                    0
                };
                (BMSR_CAPS | link).to_le_bytes()[off - BMSR]
            }
            ANLPAR..=0x69 => {
                let lpa: u16 = if self.link_up() {
                    ANAR_DEFAULT | 0x4000
                } else {
                    0
                };
                lpa.to_le_bytes()[off - ANLPAR]
            }
            ANER => 1, // the link partner can autonegotiate
            CSCR..=0x75 => {
                let mut v = u16::from_le_bytes([self.regs[CSCR], self.regs[CSCR + 1]])
                    & !(CSCR_LINK_OK | CSCR_LINK_CHANGE);
                if self.link_up() {
                    v |= CSCR_LINK_OK;
                }
                if self.cscr_link_change {
                    v |= CSCR_LINK_CHANGE;
                }
                if off == CSCR + 1 {
                    self.cscr_link_change = false;
                }
                v.to_le_bytes()[off - CSCR]
            }
            CPCR..=0xe1 | INTR_MITIGATE..=0xe3 | RDSAR..=0xeb | DTCCR..=0x17 | TNPDS..=0x2f
                if !self.cplus =>
            {
                0
            }
            TPPOLL => 0,
            _ => self.regs[off],
        }
    }

    /// TSAD: TOK, TUN, TABT and OWN of the four slots, one nibble each.
    fn tx_summary(&self) -> u16 {
        let mut v = 0u16;
        for (i, t) in self.tsd.iter().enumerate() {
            v |= ((t & TSD_TOK != 0) as u16) << (12 + i);
            v |= ((t & TSD_TABT != 0) as u16) << (4 + i);
            v |= ((t & TSD_OWN != 0) as u16) << i;
        }
        v
    }

    /// Applies one written byte: storage, write-1-to-clear or nothing for read-only bytes.
    fn write_byte(&mut self, off: usize, v: u8, cp: bool) {
        match off {
            TSD0..=0x1f if !cp => {
                let i = (off - TSD0) / 4;
                let mut b = self.tsd[i].to_le_bytes();
                b[off % 4] = v;
                self.tsd[i] = u32::from_le_bytes(b);
            }
            CBR..=0x3b | TSAD..=0x61 | BMSR..=0x65 | ANLPAR..=0x6b | MSR => {}
            IMR..=0x3d => {
                let mut b = self.imr.to_le_bytes();
                b[off - IMR] = v;
                self.imr = u16::from_le_bytes(b);
            }
            ISR..=0x3f => self.isr &= !((v as u16) << (8 * (off - ISR))),
            TCTR..=0x4b => {}
            MPC..=0x4f => self.regs[off] = 0,
            CONFIG0..=CONFIG1 | CONFIG3..=CONFIG4 | CONFIG5 => {
                if self.regs[CR9346] & EEM_MASK == EEM_CONFIG_WRITE {
                    self.regs[off] = v;
                }
            }
            CPCR..=0xe1 | INTR_MITIGATE..=0xe3 | RDSAR..=0xeb if !self.cplus => {}
            _ => self.regs[off] = v,
        }
    }

    fn write_regs(&mut self, port: &mut NetPort, off: usize, data: &[u8]) {
        let cp = self.cplus_mode();
        for (i, &b) in data.iter().enumerate() {
            self.write_byte(off + i, b, cp);
        }
        let end = off + data.len();
        let touched = |reg: usize, len: usize| off < reg + len && reg < end;
        if !cp {
            for slot in 0..4 {
                if touched(TSD0 + 4 * slot, 4) {
                    self.tsd_written(port, slot);
                }
            }
        } else if touched(DTCCR, 4) {
            self.dump_tally(port);
        }
        if touched(CR, 1) {
            self.cr_written(port);
        }
        if touched(CAPR, 2) && port.rx_stalled() {
            port.kick_rx();
        }
        if touched(IMR, 2) || touched(ISR, 2) {
            if !cp && !self.rx_ring_empty() {
                // ROK stays set while unread frames remain. 8139too acks ROK after every
                // frame and its poll reads the ring only while a receive cause is pending;
                // a poll that ends on its budget would leave frames with nothing to fetch
                // them (seen as guest TCP stalls whose ACKs sat in the ring).
                self.isr |= INT_ROK;
            }
            self.update_irq();
            // 8139cp refills its ring and then writes IMR/ISR: a stalled receiver retries.
            if port.rx_stalled() {
                port.kick_rx();
            }
        }
        if touched(TCTR, 4) {
            self.tctr_epoch = Instant::now();
            self.schedule_timer_int();
        }
        if touched(TIMER_INT, 4) {
            self.schedule_timer_int();
        }
        if touched(CR9346, 1) {
            self.cr9346_written();
        }
        if touched(BMCR, 2) {
            let v = self.get16(BMCR);
            if v & BMCR_RESET != 0 {
                self.set16(BMCR, BMCR_DEFAULT);
            }
        }
        if touched(TPPOLL, 1) && self.regs[TPPOLL] & TPPOLL_NPQ != 0 {
            self.regs[TPPOLL] = 0;
            self.cp_transmit(port);
        }
        if touched(CPCR, 2) {
            // C+ receive may have just been turned on.
            port.kick_rx();
        }
    }

    fn cr_written(&mut self, port: &mut NetPort) {
        if self.regs[CR] & CR_RST != 0 {
            self.reset(Some(port));
            return;
        }
        // Receiver or transmitter turned on or off: the receiver looks again, and slots
        // written while the transmitter was off go out now that it is on.
        port.kick_rx();
        if self.regs[CR] & CR_TE != 0 && !self.tx_waiting.is_empty() {
            self.flush_tx(port);
        }
    }

    fn cr9346_written(&mut self) {
        let v = self.regs[CR9346];
        match v & EEM_MASK {
            EEM_PROGRAM => self.eeprom.set_pins(v),
            EEM_AUTOLOAD => {
                self.load_mac_from_eeprom();
                self.regs[CR9346] = 0;
                self.eeprom.set_pins(0);
            }
            _ => self.eeprom.set_pins(0),
        }
    }

    /// DTCCR with its command bit: writes the tally block to the 64-byte aligned address.
    fn dump_tally(&mut self, port: &mut NetPort) {
        let v = self.get64(DTCCR);
        if v & DTCCR_CMD as u64 == 0 {
            return;
        }
        let addr = vm_memory::GuestAddress(v & !0x3f);
        if vm_memory::Bytes::write_obj(&self.mem, self.tally, addr).is_err() {
            self.dma_error(port, "tally dump address is outside guest memory");
        }
        self.set32(DTCCR, self.get32(DTCCR) & !DTCCR_CMD);
    }
}

impl NicModel for Rtl8139 {
    fn save(&self) -> crate::snapshot::State {
        self.save_state()
    }
    fn restore(
        &mut self,
        port: &mut NetPort,
        state: &crate::snapshot::State,
    ) -> Result<(), crate::snapshot::RestoreError> {
        self.restore_state(port, state)
    }

    fn config(&self) -> &PciConfig {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }
    fn config_written(&mut self, _port: &mut NetPort, offset: usize, _len: usize) {
        if offset <= crate::pci::PCI_COMMAND + 1 {
            self.update_irq();
        }
    }

    fn bar_read(&mut self, _port: &mut NetPort, _bar: usize, offset: u64, data: &mut [u8]) {
        let off = offset as usize;
        if off + data.len() > REGS_SIZE as usize {
            data.fill(0xff);
            return;
        }
        // TCTR's value is the clock's: read once for an access that covers it, and not for
        // the others (ISR and TSD reads come with every frame).
        let covers_tctr = off < TCTR + 4 && TCTR < off + data.len();
        let tctr = if covers_tctr { self.tctr() } else { 0 };
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.read_byte(off + i, tctr);
        }
    }

    fn bar_write(&mut self, port: &mut NetPort, _bar: usize, offset: u64, data: &[u8]) {
        let off = offset as usize;
        if off + data.len() <= REGS_SIZE as usize && !data.is_empty() {
            self.write_regs(port, off, data);
        }
    }

    fn transmit(&mut self, port: &mut NetPort) {
        self.flush_tx(port);
    }

    fn rx_ready(&self) -> bool {
        true // a receiver that is off takes frames and drops them, as the wire would
    }

    fn rx_room(&self, _port: &NetPort, max: usize) -> usize {
        self.rx_room_for(max)
    }

    fn receive(&mut self, port: &mut NetPort, frame: &[u8]) -> Rx {
        self.receive_frame(port, frame)
    }

    /// The interrupt line for the burst's frames (each set ROK as it arrived), once: the
    /// guest cannot look at ISR before the burst ends (it holds the NIC's lock).
    fn rx_burst_done(&mut self, _port: &mut NetPort) {
        self.update_irq();
    }

    fn timer_fd(&self) -> Option<RawFd> {
        Some(self.timer.fd())
    }

    fn timer(&mut self, port: &mut NetPort) {
        self.on_timer(port);
    }

    fn link_changed(&mut self, _port: &mut NetPort, up: bool) {
        if up != self.link {
            self.link = up;
            self.cscr_link_change = true;
            self.raise(INT_LINKCHG);
        }
        self.wire_up = up;
    }

    fn interrupts(&self) -> u64 {
        self.interrupts
    }

    fn filter_register(&self, _bar: usize, offset: u64) -> bool {
        let o = offset as usize;
        (IDR0..MAR0 + 8).contains(&o) || (RCR..RCR + 4).contains(&o)
    }

    fn rx_filter(&self) -> RxFilter {
        let rcr = self.get32(RCR);
        let mar = &self.regs[MAR0..MAR0 + 8];
        let multicast = if rcr & RCR_AM == 0 || mar.iter().all(|&b| b == 0) {
            RxState::None
        } else if mar.iter().all(|&b| b == 0xff) {
            RxState::All
        } else {
            RxState::Normal
        };
        RxFilter {
            main_mac: self.station_address(),
            promiscuous: rcr & RCR_AAP != 0,
            broadcast_allowed: rcr & RCR_AB != 0,
            unicast: if rcr & RCR_AAP != 0 {
                RxState::All
            } else if rcr & RCR_APM != 0 {
                RxState::Normal
            } else {
                RxState::None
            },
            multicast,
            vlan: RxState::All,
            unicast_overflow: false,
            // A 64-bit hash, not a table of addresses.
            multicast_overflow: multicast == RxState::Normal,
            unicast_table: vec![],
            multicast_table: vec![],
            vlan_table: vec![],
        }
    }
}
