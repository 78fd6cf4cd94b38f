//! Intel 82540EM gigabit Ethernet controller ("e1000", PCI 8086:100E), as Linux's e1000
//! driver drives it (the sequences its tests replay; other drivers are untested).
//!
//! Covered: the 128 KiB register BAR and the IOADDR/IODATA I/O BAR; the Microwire EEPROM
//! (bit-banged through EECD, or through EERD); the M88E1011 PHY through MDIC; INTx with
//! ICR/ICS/IMS/IMC, ITR interrupt throttling and the interrupt delay timers (RDTR/RADV for
//! RXT0, TIDV/TADV for TXDW on descriptors with IDE); one RX and one TX descriptor ring; receive
//! filtering (RAL/RAH exact match, MTA hash, broadcast, promiscuous, VFTA); VLAN strip and
//! insertion; RX checksum reporting; TX checksum insertion (legacy and context descriptors)
//! and TCP segmentation; statistics counters.
//!
//! Where it differs from the hardware:
//! * The link comes up as soon as the driver sets CTRL.SLU (or negotiation is restarted);
//!   there is no negotiation delay. Speed is always 1000 Mb/s full duplex.
//! * No FIFO: when the guest has no receive buffers the model stops reading the backend
//!   (counting RNBC and raising RXO once), so frames wait in the backend instead of being
//!   dropped. Frames that could never fit the ring are dropped and counted in MPC.
//! * The receive descriptor's packet checksum field is left 0; flow-control frames, wake-up,
//!   manageability and the flash BAR are absent. Unknown registers are plain storage, and
//!   only 1-, 2- and 4-byte register accesses do anything.
//! * Over a backend with a virtio-net header the model still segments and checksums itself;
//!   its port sends an empty header and skips received ones (e1000 backends are opened
//!   without offloads).
//! * A guest that programs an impossible ring (outside memory, head/tail past the end,
//!   zero length) or an over-long frame puts that ring in an error state until CTRL.RST
//!   (logged through the port: once, then rate-limited). The TX side runs synchronously on the
//!   vCPU thread that writes TDT, at most [`TX_BUDGET`] descriptors at a time, and stops at the
//!   end of a frame once [`crate::net::port::TX_SENDS_PER_WALK`] wire frames went out (TSO cut
//!   in software with a tiny MSS); the I/O thread goes on from there.

pub mod desc;
pub mod eeprom;
pub mod phy;
pub mod regs;
mod rx;
mod state;
mod tx;

use crate::interrupt::IntxLine;
use crate::net::guest_iov::Piece;
use crate::net::tx_stage::TxStage;
use crate::net::{NetPort, NicModel, Rx, RxFilter, RxState, Timer};
use crate::pci::{BarKind, PciConfig, PCI_COMMAND_INTX_DISABLE};
use eeprom::Eeprom;
use net_backends::{MacAddr, MAX_FRAME};
use phy::Phy;
use regs::*;
use std::io::{self, IoSlice};
use std::os::fd::RawFd;
use std::time::{Duration, Instant};
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Transmit descriptors one doorbell (or one turn of the I/O thread) walks at most; the rest
/// wait for the next turn, which the model asks for through its port.
pub const TX_BUDGET: usize = 256;

pub use eeprom::EEPROM_SUM;
pub use phy::{M88E1011_ID1, M88E1011_ID2, PHY_ADDR};

pub const E1000_VENDOR: u16 = 0x8086;
pub const E1000_DEVICE_82540EM: u16 = 0x100e;
/// Subsystem of Intel's PRO/1000 MT Desktop adapter.
pub const E1000_SUBSYSTEM: (u16, u16) = (0x8086, 0x001e);
pub const MMIO_BAR: usize = 0;
pub const IO_BAR: usize = 1;

/// One interrupt cause held back by a pair of delay timers (RXT0 behind RDTR/RADV, TXDW
/// behind TIDV/TADV): due when the packet timer, restarted by every event, or the absolute
/// timer, started by the first event since the cause was last raised, runs out.
#[derive(Debug, Default, Clone, Copy)]
struct DelayedCause {
    packet: Option<Instant>,
    absolute: Option<Instant>,
}

impl DelayedCause {
    /// Another event: the packet timer starts again (`delay`), the absolute one (`absolute`,
    /// zero for none) keeps running if it already was.
    fn restart(&mut self, now: Instant, delay: Duration, absolute: Duration) {
        self.packet = Some(now + delay);
        if self.absolute.is_none() && !absolute.is_zero() {
            self.absolute = Some(now + absolute);
        }
    }

    fn due_at(&self) -> Option<Instant> {
        match (self.packet, self.absolute) {
            (Some(p), Some(a)) => Some(p.min(a)),
            (p, a) => p.or(a),
        }
    }

    /// True (and cleared) when the cause is due at `now`.
    fn take_due(&mut self, now: Instant) -> bool {
        let due = self.due_at().is_some_and(|t| t <= now);
        if due {
            *self = DelayedCause::default();
        }
        due
    }
}

/// A delay register's value (16 bits, in units of 1.024 us) as a duration.
fn delay_ticks(v: u32) -> Duration {
    Duration::from_nanos((v & 0xffff) as u64 * 1024)
}

/// The TCP/IP context last loaded by a context descriptor.
#[derive(Debug, Default, Clone, Copy)]
struct TxContext {
    ipcss: usize,
    ipcso: usize,
    ipcse: usize,
    tucss: usize,
    tucso: usize,
    tucse: usize,
    tucmd: u8,
    hdrlen: usize,
    mss: usize,
}

pub struct E1000 {
    config: PciConfig,
    intx: IntxLine,
    mem: GuestMemoryMmap,
    mac: MacAddr,
    /// Whether the backend's link is up, as the port last said.
    wire_up: bool,
    /// The register file, indexed by offset / 4; registers with side effects are handled
    /// around it.
    regs: Box<[u32]>,
    eeprom: Eeprom,
    phy: Phy,
    /// IOADDR: the register the I/O window's IODATA reaches.
    io_addr: u32,
    /// STATUS.LU as last reported (an LSC is raised when it changes).
    link_up: bool,
    /// The driver restarted negotiation or reset the PHY since CTRL.RST: like CTRL.SLU, this
    /// lets the MAC take the PHY's link.
    an_started: bool,

    /// The INTx line as the device drives it (before PCI_COMMAND_INTX_DISABLE).
    line: bool,
    /// Assertions of the line so far.
    interrupts: u64,
    last_irq: Option<Instant>,
    /// When ITR lets the line be asserted again, while a cause waits for that.
    itr_due: Option<Instant>,
    rx_delay: DelayedCause,
    tx_delay: DelayedCause,
    /// One timer for ITR and both delays, armed for the earliest of them.
    timer: Timer,
    timer_at: Option<Instant>,

    ctx: TxContext,
    /// Where the frame being gathered lies in guest memory, and its length so far.
    tx_pieces: Vec<Piece>,
    tx_len: usize,
    /// The frame's first bytes (its headers, changed where an offload asks), or all of it
    /// when it must be changed further in.
    tx_buf: TxStage,
    /// The I/O vectors of the frame going out (kept for their allocation).
    tx_iov: Vec<IoSlice<'static>>,
    tx_scratch: Vec<u8>,
    /// Descriptors of the frame being gathered that asked for a status write-back, and
    /// whether each allows a delayed TXDW (IDE).
    tx_rs: Vec<(u16, bool)>,
    /// Segments of a blocked TSO frame that already went out.
    tx_segs_sent: usize,
    tx_error: bool,

    /// The frame offered last found no buffers: it is offered again (and not counted again)
    /// until it is placed; RNBC and RXO count the stall once.
    rx_no_buffers: bool,
    rx_error: bool,
}

impl E1000 {
    pub fn new(mac: MacAddr, mem: GuestMemoryMmap, intx: IntxLine) -> io::Result<Self> {
        let mut config = PciConfig::new(E1000_VENDOR, E1000_DEVICE_82540EM, (0x02, 0x00, 0x00), 2);
        config.set_subsystem(E1000_SUBSYSTEM.0, E1000_SUBSYSTEM.1);
        config.set_interrupt(1, intx.gsi() as u8);
        config.add_bar(MMIO_BAR, BarKind::Mem32, MMIO_SIZE);
        config.add_bar(IO_BAR, BarKind::Io, IO_SIZE);
        let mut dev = E1000 {
            config,
            intx,
            mem,
            mac,
            wire_up: true,
            regs: vec![0u32; MMIO_SIZE as usize / 4].into_boxed_slice(),
            eeprom: Eeprom::new(mac, E1000_DEVICE_82540EM, E1000_SUBSYSTEM),
            phy: Phy::default(),
            io_addr: 0,
            link_up: false,
            an_started: false,
            line: false,
            interrupts: 0,
            last_irq: None,
            itr_due: None,
            rx_delay: DelayedCause::default(),
            tx_delay: DelayedCause::default(),
            timer: Timer::new()?,
            timer_at: None,
            ctx: TxContext::default(),
            tx_pieces: Vec::new(),
            tx_len: 0,
            tx_buf: TxStage::with_capacity(MAX_FRAME),
            tx_iov: Vec::new(),
            tx_scratch: Vec::with_capacity(MAX_FRAME),
            tx_rs: Vec::new(),
            tx_segs_sent: 0,
            tx_error: false,
            rx_no_buffers: false,
            rx_error: false,
        };
        dev.reset(None);
        Ok(dev)
    }

    pub fn mac(&self) -> MacAddr {
        self.mac
    }

    fn reg(&self, off: usize) -> u32 {
        self.regs[off / 4]
    }

    fn set_reg(&mut self, off: usize, v: u32) {
        self.regs[off / 4] = v;
    }

    /// The base address of a ring of `n` descriptors, if all of it is guest memory.
    fn ring_base(&self, bal: usize, bah: usize, n: usize) -> Option<u64> {
        let base = (self.reg(bah) as u64) << 32 | self.reg(bal) as u64;
        let len = n * DESC_LEN as usize;
        crate::net::guest_iov::is_memory(&self.mem, GuestAddress(base), len).then_some(base)
    }

    /// CTRL.RST (and power-on): registers to their defaults; the EEPROM, the MAC address it
    /// holds and the PHY are untouched. Frames waiting in the backend stay there.
    fn reset(&mut self, port: Option<&mut NetPort>) {
        self.regs.fill(0);
        self.set_reg(CTRL, CTRL_FD | CTRL_ASDE | CTRL_SPD_1000);
        self.set_reg(VET, 0x8100);
        self.set_reg(LEDCTL, 0x0706_0302);
        self.set_reg(PBA, 0x0010_0030); // 48 KB receive, 16 KB transmit
        self.set_reg(TIPG, 0x0060_2008);
        let m = self.mac.0;
        self.set_reg(RAL0, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        self.set_reg(RAH0, u16::from_le_bytes([m[4], m[5]]) as u32 | RAH_AV);
        self.link_up = false;
        self.an_started = false;
        self.line = false;
        self.apply_line();
        self.timer.disarm();
        self.timer_at = None;
        self.itr_due = None;
        self.rx_delay = DelayedCause::default();
        self.tx_delay = DelayedCause::default();
        self.ctx = TxContext::default();
        self.tx_pieces.clear();
        self.tx_len = 0;
        self.tx_segs_sent = 0;
        self.tx_error = false;
        self.rx_no_buffers = false;
        self.rx_error = false;
        // The I/O thread may have stopped reading for this device: let it look again.
        if let Some(port) = port {
            port.kick_rx();
        }
    }

    /// A guest programming error on one ring: stop that ring until the next reset.
    fn ring_error(&mut self, port: &mut NetPort, tx: bool, what: &str) {
        port.guest_error(format_args!(
            "{what}; the ring stops until the device is reset"
        ));
        if tx {
            self.tx_error = true;
        } else {
            self.rx_error = true;
        }
    }

    // ---- interrupts -------------------------------------------------------------------------

    fn raise(&mut self, causes: u32) {
        let icr = self.reg(ICR) | (causes & ICR_VALID);
        self.set_reg(ICR, icr);
        self.update_irq();
    }

    /// Drives the line from ICR & IMS, spacing assertions at least ITR * 256 ns apart.
    fn update_irq(&mut self) {
        let want = self.reg(ICR) & self.reg(IMS) != 0;
        if !want || self.line {
            if !want {
                self.itr_due = None;
                if self.line {
                    self.line = false;
                    self.apply_line();
                }
            }
            return;
        }
        let interval = Duration::from_nanos((self.reg(ITR) & 0xffff) as u64 * 256);
        let now = Instant::now();
        if let Some(next) = self.last_irq.map(|t| t + interval).filter(|&n| n > now) {
            self.itr_due = Some(next);
            self.schedule_timer();
            return;
        }
        self.last_irq = Some(now);
        self.interrupts += 1;
        self.line = true;
        self.apply_line();
    }

    /// RXT0 after a frame was received: at once with RDTR 0, else behind RDTR/RADV.
    fn rx_done(&mut self) -> u32 {
        let rdtr = delay_ticks(self.reg(RDTR));
        if rdtr.is_zero() {
            self.rx_delay = DelayedCause::default();
            return ICR_RXT0;
        }
        let radv = delay_ticks(self.reg(RADV));
        self.rx_delay.restart(Instant::now(), rdtr, radv);
        self.schedule_timer();
        0
    }

    /// TXDW after descriptors were written back: at once unless they all asked for a
    /// delay (IDE) and TIDV is set, else behind TIDV/TADV.
    fn tx_done(&mut self, delayed_only: bool) -> u32 {
        let tidv = delay_ticks(self.reg(TIDV));
        if !delayed_only || tidv.is_zero() {
            self.tx_delay = DelayedCause::default();
            return ICR_TXDW;
        }
        let tadv = delay_ticks(self.reg(TADV));
        self.tx_delay.restart(Instant::now(), tidv, tadv);
        self.schedule_timer();
        0
    }

    /// Arms the timer for the earliest of the ITR gate and the delayed causes.
    fn schedule_timer(&mut self) {
        let next = [self.itr_due, self.rx_delay.due_at(), self.tx_delay.due_at()]
            .into_iter()
            .flatten()
            .min();
        if let Some(at) = next {
            if self.timer_at.is_none_or(|t| at < t) {
                self.timer.arm(at.saturating_duration_since(Instant::now()));
                self.timer_at = Some(at);
            }
        }
    }

    fn on_timer(&mut self) {
        self.timer.take();
        self.timer_at = None;
        self.itr_due = None;
        let now = Instant::now();
        let mut causes = 0;
        if self.rx_delay.take_due(now) {
            causes |= ICR_RXT0;
        }
        if self.tx_delay.take_due(now) {
            causes |= ICR_TXDW;
        }
        // raise() re-checks the ITR gate (and re-arms for it when it still holds).
        self.raise(causes);
        self.schedule_timer();
    }

    /// RDTR/TIDV with FPD set: a held-back cause is raised now.
    fn flush_delay(&mut self, rx: bool) {
        let (delay, cause) = if rx {
            (&mut self.rx_delay, ICR_RXT0)
        } else {
            (&mut self.tx_delay, ICR_TXDW)
        };
        if delay.due_at().is_some() {
            *delay = DelayedCause::default();
            self.raise(cause);
        }
    }

    fn apply_line(&mut self) {
        let enabled = self.config.command() & PCI_COMMAND_INTX_DISABLE == 0;
        self.intx.set(self.line && enabled);
        self.config.set_interrupt_status(self.line);
    }

    // ---- link -------------------------------------------------------------------------------

    /// Re-derives STATUS.LU from CTRL.SLU, the PHY and the backend; LSC when it changes.
    fn update_link(&mut self) {
        let enabled = self.reg(CTRL) & CTRL_SLU != 0 || self.an_started;
        let up = enabled && self.phy.link_up(self.wire_up);
        if up != self.link_up {
            self.link_up = up;
            self.raise(ICR_LSC);
        }
    }

    fn status(&mut self) -> u32 {
        self.update_link();
        let mut s = STATUS_FD | STATUS_SPEED_1000 | STATUS_ASDV_1000;
        if self.link_up {
            s |= STATUS_LU;
        }
        s
    }

    fn mdic(&mut self, v: u32) {
        let phy_addr = (v >> 21) & 0x1f;
        let reg = ((v >> 16) & 0x1f) as usize;
        let op = v & (MDIC_OP_READ | MDIC_OP_WRITE);
        let mut out = v & !(MDIC_READY | MDIC_ERROR);
        if phy_addr != PHY_ADDR || (op != MDIC_OP_READ && op != MDIC_OP_WRITE) {
            out |= MDIC_ERROR;
        } else if op == MDIC_OP_READ {
            out = (out & !0xffff) | self.phy.read(reg, self.wire_up) as u32;
        } else {
            self.an_started |= self.phy.write(reg, v as u16);
        }
        self.set_reg(MDIC, out | MDIC_READY);
        if v & MDIC_INT_EN != 0 {
            self.raise(ICR_MDAC);
        }
        self.update_link();
    }

    // ---- statistics -------------------------------------------------------------------------

    /// Adds to a 32-bit counter, which sticks at its maximum as the hardware's do.
    fn count(&mut self, reg: usize, n: u64) {
        let v = (self.reg(reg) as u64 + n).min(u32::MAX as u64);
        self.set_reg(reg, v as u32);
    }

    /// Adds to a 64-bit counter kept as a low/high register pair.
    fn count64(&mut self, low: usize, n: u64) {
        let v = (self.reg(low) as u64 | (self.reg(low + 4) as u64) << 32).wrapping_add(n);
        self.set_reg(low, v as u32);
        self.set_reg(low + 4, (v >> 32) as u32);
    }

    /// The 64-byte .. 1522-byte bucket (PRC64.. or PTC64..) for `n` frames of `len` bytes
    /// including the FCS.
    fn count_size(&mut self, first: usize, len: usize, n: u64) {
        let bucket = match len {
            ..=64 => 0,
            65..=127 => 1,
            128..=255 => 2,
            256..=511 => 3,
            512..=1023 => 4,
            1024..=1522 => 5,
            _ => return,
        };
        self.count(first + 4 * bucket, n);
    }

    // ---- register file ----------------------------------------------------------------------

    fn read_reg(&mut self, off: usize) -> u32 {
        match off {
            STATUS => self.status(),
            EECD => self.eeprom.eecd(),
            ICR => {
                let v = self.reg(ICR);
                self.set_reg(ICR, 0);
                self.update_irq();
                v
            }
            ICS | IMC => 0,
            STATS_START..STATS_END => {
                let v = self.reg(off);
                let low_half = matches!(off, GORCL | GOTCL | TORL | TOTL);
                if !low_half {
                    self.set_reg(off, 0);
                    if matches!(off, GORCH | GOTCH | TORH | TOTH) {
                        self.set_reg(off - 4, 0);
                    }
                }
                v
            }
            _ => self.reg(off),
        }
    }

    fn write_reg(&mut self, port: &mut NetPort, off: usize, v: u32) {
        match off {
            CTRL => {
                if v & CTRL_RST != 0 {
                    self.reset(Some(port));
                    return;
                }
                let old = self.reg(CTRL);
                if v & CTRL_PHY_RST != 0 && old & CTRL_PHY_RST == 0 {
                    self.phy.hold_reset();
                } else if v & CTRL_PHY_RST == 0 && old & CTRL_PHY_RST != 0 {
                    self.phy.release_reset();
                }
                self.set_reg(CTRL, v);
                self.update_link();
            }
            STATUS | STATS_START..STATS_END => {} // read-only
            EECD => self.eeprom.write_eecd(v),
            EERD => self.set_reg(EERD, self.eeprom.eerd(v)),
            MDIC => self.mdic(v),
            ICR => {
                self.set_reg(ICR, self.reg(ICR) & !v);
                self.update_irq();
            }
            ICS => self.raise(v),
            IMS => {
                self.set_reg(IMS, (self.reg(IMS) | v) & ICR_VALID);
                self.update_irq();
            }
            IMC => {
                self.set_reg(IMS, self.reg(IMS) & !v);
                self.update_irq();
            }
            ITR => self.set_reg(ITR, v & 0xffff),
            RDTR | TIDV => {
                self.set_reg(off, v & 0xffff);
                if v & DELAY_FPD != 0 {
                    self.flush_delay(off == RDTR);
                }
            }
            VET => self.set_reg(VET, v & 0xffff),
            RCTL => {
                self.set_reg(RCTL, v);
                port.kick_rx();
            }
            RDBAL | TDBAL => self.set_reg(off, v & !0xf),
            RDLEN | TDLEN => self.set_reg(off, v & RING_LEN_MASK),
            RDH | TDH => self.set_reg(off, v & 0xffff),
            RDT => {
                self.set_reg(RDT, v & 0xffff);
                // Only a stalled receiver needs the I/O thread's attention.
                if port.rx_stalled() {
                    port.kick_rx();
                }
            }
            TDT => {
                self.set_reg(TDT, v & 0xffff);
                self.process_tx(port);
            }
            TCTL => {
                self.set_reg(TCTL, v);
                self.process_tx(port);
            }
            _ => self.set_reg(off, v),
        }
    }

    /// Reads `data.len()` bytes at `off` of the register space: whole registers, or bytes of
    /// one.
    fn mmio_read(&mut self, off: u64, data: &mut [u8]) {
        data.fill(0);
        if off >= MMIO_SIZE || data.len() > 4 {
            return;
        }
        let v = self.read_reg(off as usize & !3).to_le_bytes();
        let at = off as usize & 3;
        for (i, d) in data.iter_mut().enumerate() {
            *d = v.get(at + i).copied().unwrap_or(0);
        }
    }

    fn mmio_write(&mut self, port: &mut NetPort, off: u64, data: &[u8]) {
        if off >= MMIO_SIZE || data.len() > 4 {
            return;
        }
        let reg = off as usize & !3;
        let mut v = self.reg(reg).to_le_bytes();
        let at = off as usize & 3;
        for (i, &d) in data.iter().enumerate() {
            if let Some(b) = v.get_mut(at + i) {
                *b = d;
            }
        }
        self.write_reg(port, reg, u32::from_le_bytes(v));
    }

    fn io_target(&self) -> u64 {
        (self.io_addr & (MMIO_SIZE as u32 - 1)) as u64
    }
}

impl NicModel for E1000 {
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
    fn config_written(&mut self, _port: &mut NetPort, _offset: usize, _len: usize) {
        // PCI_COMMAND_INTX_DISABLE may have changed.
        self.apply_line();
    }

    fn bar_read(&mut self, _port: &mut NetPort, bar: usize, offset: u64, data: &mut [u8]) {
        match (bar, offset) {
            (MMIO_BAR, o) => self.mmio_read(o, data),
            (IO_BAR, IOADDR) => {
                let v = self.io_addr.to_le_bytes();
                let n = data.len().min(4);
                data[..n].copy_from_slice(&v[..n]);
            }
            (IO_BAR, IODATA) => self.mmio_read(self.io_target(), data),
            _ => data.fill(0xff),
        }
    }

    fn bar_write(&mut self, port: &mut NetPort, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset) {
            (MMIO_BAR, o) => self.mmio_write(port, o, data),
            (IO_BAR, IOADDR) => {
                let mut v = self.io_addr.to_le_bytes();
                let n = data.len().min(4);
                v[..n].copy_from_slice(&data[..n]);
                self.io_addr = u32::from_le_bytes(v);
            }
            (IO_BAR, IODATA) => self.mmio_write(port, self.io_target(), data),
            _ => {}
        }
    }

    fn transmit(&mut self, port: &mut NetPort) {
        self.process_tx(port);
    }

    fn rx_ready(&self) -> bool {
        !self.rx_error
    }

    fn rx_room(&self, _port: &NetPort, max: usize) -> usize {
        self.rx_room_for(max)
    }

    fn receive(&mut self, port: &mut NetPort, frame: &[u8]) -> Rx {
        self.receive_frame(port, frame)
    }

    fn rx_burst_done(&mut self, _port: &mut NetPort) {
        self.rx_delivered();
    }

    fn timer_fd(&self) -> Option<RawFd> {
        Some(self.timer.fd())
    }

    fn timer(&mut self, _port: &mut NetPort) {
        self.on_timer();
    }

    fn link_changed(&mut self, _port: &mut NetPort, up: bool) {
        self.wire_up = up;
        self.update_link();
    }

    fn interrupts(&self) -> u64 {
        self.interrupts
    }

    fn filter_register(&self, bar: usize, offset: u64) -> bool {
        let o = offset as usize;
        match bar {
            MMIO_BAR => o == RCTL || (MTA..VFTA + 0x200).contains(&o),
            // IODATA reaches any register.
            _ => offset == IODATA,
        }
    }

    fn rx_filter(&self) -> RxFilter {
        let rctl = self.reg(RCTL);
        let mut unicast_table = vec![];
        let mut multicast_table = vec![];
        let mut main_mac = self.mac.0;
        for i in 0..16 {
            let rah = self.reg(RAH0 + 8 * i);
            if rah & RAH_AV == 0 {
                continue;
            }
            let low = self.reg(RAL0 + 8 * i).to_le_bytes();
            let high = (rah as u16).to_le_bytes();
            let a = [low[0], low[1], low[2], low[3], high[0], high[1]];
            if i == 0 {
                main_mac = a;
            } else if a[0] & 1 != 0 {
                multicast_table.push(a);
            } else {
                unicast_table.push(a);
            }
        }
        let hashed = (0..128).any(|i| self.reg(MTA + 4 * i) != 0);
        let vfe = rctl & RCTL_VFE != 0;
        let vlan_table = if vfe {
            (0..4096u16)
                .filter(|&v| self.reg(VFTA + 4 * (v as usize >> 5)) & (1 << (v & 31)) != 0)
                .collect()
        } else {
            vec![]
        };
        RxFilter {
            main_mac,
            promiscuous: rctl & RCTL_UPE != 0,
            broadcast_allowed: rctl & RCTL_BAM != 0,
            unicast: if rctl & RCTL_UPE != 0 {
                RxState::All
            } else {
                RxState::Normal
            },
            multicast: if rctl & RCTL_MPE != 0 {
                RxState::All
            } else if hashed || !multicast_table.is_empty() {
                RxState::Normal
            } else {
                RxState::None
            },
            vlan: if vfe { RxState::Normal } else { RxState::All },
            unicast_overflow: false,
            // Addresses in the 4096-bit hash (MTA) cannot be listed.
            multicast_overflow: hashed,
            unicast_table,
            multicast_table,
            vlan_table,
        }
    }
}

/// A synthetic driver for tests, the fuzzer and the no-guest benchmark.
#[cfg(any(test, feature = "test-drivers"))]
pub mod driver;

#[cfg(test)]
mod tests;
