//! A synthetic e1000 driver: the register sequences of Linux's e1000 (probe, open, xmit,
//! clean_rx/clean_tx) played against the model from the host, with a RecordingIrqChip for
//! INTx. Device tests and the no-guest benchmark use it.

use super::phy::{
    MII_CR_AUTONEG_EN, MII_CR_RESTART_AUTONEG, PHY_1000T_CTRL, PHY_AUTONEG_ADV, PHY_CTRL, PHY_ID1,
    PHY_ID2,
};
use super::*;
use crate::interrupt::{IntxLine, RecordingIrqChip};
use crate::net::{NetEvent, NetPort, Nic};
use crate::pci::PciDevice;
use crate::pci::{PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
use net_backends::{MacAddr, NetBackend};
use std::collections::VecDeque;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress};

pub const MEM_SIZE: usize = 4 << 20;
pub const GSI: u32 = 19;
pub const MMIO_BASE: u64 = 0xc000_0000;
pub const IO_BASE: u64 = 0xc000;
pub const RX_RING: u64 = 0x1_0000;
pub const TX_RING: u64 = 0x2_0000;
pub const RX_BUFS: u64 = 0x10_0000;
pub const TX_BUFS: u64 = 0x20_0000;
/// Descriptors per ring by default (Linux's default is 256 too).
pub const RING_SIZE: usize = 256;
pub const RX_BUF_SIZE: usize = 2048;
/// Linux's e1000 puts at most 4 KiB behind one TX descriptor.
pub const TX_BUF_SIZE: usize = 4096;
/// What e1000_irq_enable unmasks.
pub const IMS_ENABLE_MASK: u32 = ICR_RXT0 | ICR_TXDW | ICR_RXDMT0 | (1 << 3) | ICR_LSC;

/// One received frame as clean_rx hands it up.
#[derive(Debug, Clone)]
pub struct RxFrame {
    /// The frame without the FCS.
    pub data: Vec<u8>,
    pub fcs: Option<[u8; 4]>,
    /// Status and errors of the EOP descriptor, and its special field (VLAN tag).
    pub status: u8,
    pub errors: u8,
    pub special: u16,
    /// Descriptors the frame took.
    pub descs: usize,
}

pub struct Driver {
    pub dev: Nic<E1000>,
    pub mem: GuestMemoryMmap,
    pub chip: Arc<RecordingIrqChip>,
    pub rx_count: usize,
    pub tx_count: usize,
    rx_next: usize,
    tx_next: usize,
    /// EOP descriptors queued and not yet seen done.
    tx_eops: VecDeque<usize>,
    /// IDE on the last descriptor of each frame, as Linux sets it while TxIntDelay is not 0
    /// (its default is 8): TXDW then waits for TIDV/TADV.
    pub tx_ide: bool,
}

impl Driver {
    /// A device on `backend`, BARs placed and decoding on, as firmware leaves it.
    pub fn new(backend: Box<dyn NetBackend>) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Driver::new_in(mem, backend)
    }

    /// [`Driver::new`] with `mem` (MEM_SIZE bytes from 0) as guest RAM.
    pub fn new_in(mem: GuestMemoryMmap, backend: Box<dyn NetBackend>) -> Driver {
        let chip = Arc::new(RecordingIrqChip::default());
        let mac: MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let model = E1000::new(mac, mem.clone(), IntxLine::new(chip.clone(), GSI, 0)).unwrap();
        let port = NetPort::new(format!("e1000 {mac}"), backend).unwrap();
        let mut dev = Nic::new(model, port);
        dev.config_mut().set_bar_addr(MMIO_BAR, MMIO_BASE);
        dev.config_mut().set_bar_addr(IO_BAR, IO_BASE);
        let cmd = PCI_COMMAND_MEMORY | PCI_COMMAND_IO | PCI_COMMAND_MASTER;
        dev.config_mut().write(PCI_COMMAND, &cmd.to_le_bytes());
        dev.config_written(PCI_COMMAND, 2);
        Driver {
            dev,
            mem,
            chip,
            rx_count: RING_SIZE,
            tx_count: RING_SIZE,
            rx_next: 0,
            tx_next: 0,
            tx_eops: VecDeque::new(),
            tx_ide: true,
        }
    }

    /// `migrate` to a file and `-incoming` from it, as far as this device goes: its state
    /// through JSON text, then [`Self::restore_into_new`].
    pub fn migrate(
        &mut self,
        backend: Box<dyn NetBackend>,
    ) -> Result<(), crate::snapshot::RestoreError> {
        let text = serde_json::to_string(&self.dev.save()).expect("state as JSON");
        let state = serde_json::from_str(&text).expect("JSON back");
        self.restore_into_new(backend, &state)
    }

    /// A new device, as a restoring nicvm builds it from its command line, on `backend` and
    /// a new guest memory holding a copy of this one's, with `state` restored into it; the
    /// driver carries on with it (its own ring positions unchanged). On an error the old
    /// device stays.
    pub fn restore_into_new(
        &mut self,
        backend: Box<dyn NetBackend>,
        state: &crate::snapshot::State,
    ) -> Result<(), crate::snapshot::RestoreError> {
        let mut new = Driver::new(backend);
        let mut ram = vec![0u8; MEM_SIZE];
        self.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
        new.mem.write_slice(&ram, GuestAddress(0)).unwrap();
        new.dev.restore(state)?;
        self.dev = new.dev;
        self.mem = new.mem;
        self.chip = new.chip;
        Ok(())
    }

    pub fn r(&mut self, off: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(MMIO_BAR, off as u64, &mut b);
        u32::from_le_bytes(b)
    }

    /// A register write, and then what the I/O thread does at once when the write left
    /// frames for it to hand to the backend.
    pub fn w(&mut self, off: usize, v: u32) {
        self.w_only(off, v);
        self.dev.run_flush_kicks();
    }

    /// A register write alone: frames it queued wait for [`Nic::run_flush_kicks`] (the guest
    /// rang more doorbells before the I/O thread woke).
    pub fn w_only(&mut self, off: usize, v: u32) {
        self.dev.bar_write(MMIO_BAR, off as u64, &v.to_le_bytes());
    }

    /// E1000_WRITE_REG_IO: through IOADDR/IODATA.
    pub fn io_w(&mut self, off: usize, v: u32) {
        self.dev
            .bar_write(IO_BAR, IOADDR, &(off as u32).to_le_bytes());
        self.dev.bar_write(IO_BAR, IODATA, &v.to_le_bytes());
        self.dev.run_flush_kicks();
    }

    pub fn io_r(&mut self, off: usize) -> u32 {
        self.dev
            .bar_write(IO_BAR, IOADDR, &(off as u32).to_le_bytes());
        let mut b = [0u8; 4];
        self.dev.bar_read(IO_BAR, IODATA, &mut b);
        u32::from_le_bytes(b)
    }

    /// What the I/O thread does for the device's timer: waits (up to a second) for it to
    /// fire, then lets the device handle it. False when it never fired.
    pub fn run_timer(&mut self) -> bool {
        let fd = self.dev.timer.fd();
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let fired = unsafe { libc::poll(&mut p, 1, 1000) } == 1;
        if fired {
            self.dev.handle(NetEvent::Timer);
        }
        fired
    }

    /// INTx as the interrupt controller sees it.
    pub fn irq(&self) -> bool {
        self.chip.level(GSI)
    }

    /// e1000_reset_hw: mask, stop both units, reset through the I/O BAR, mask, clear ICR.
    pub fn reset_hw(&mut self) {
        self.w(IMC, !0);
        self.w(RCTL, 0);
        self.w(TCTL, TCTL_PSP);
        let _ = self.r(STATUS);
        let ctrl = self.r(CTRL);
        self.io_w(CTRL, ctrl | CTRL_RST);
        self.w(IMC, !0);
        let _ = self.r(ICR);
        self.rx_next = 0;
        self.tx_next = 0;
        self.tx_eops.clear();
    }

    fn ee_clock(&mut self, eecd: u32) -> u32 {
        self.w(EECD, eecd | EECD_SK);
        let v = self.r(EECD);
        self.w(EECD, eecd & !EECD_SK);
        v
    }

    /// e1000_read_eeprom for a Microwire part: acquire (REQ/GNT, CS), then per word the READ
    /// opcode and address out, 16 bits in and a standby, then release. `None` when the grant
    /// never comes.
    pub fn ee_read_words(&mut self, first: u16, n: u16) -> Option<Vec<u16>> {
        let mut eecd = self.r(EECD) | EECD_REQ;
        self.w(EECD, eecd);
        if (0..1000).all(|_| self.r(EECD) & EECD_GNT == 0) {
            self.w(EECD, eecd & !EECD_REQ);
            return None;
        }
        eecd &= !(EECD_DI | EECD_SK);
        self.w(EECD, eecd);
        eecd |= EECD_CS;
        self.w(EECD, eecd);
        let mut words = vec![];
        for word in first..first + n {
            for (bits, count) in [(0b110u32, 3u32), (word as u32, 6)] {
                for i in (0..count).rev() {
                    eecd = if bits >> i & 1 != 0 {
                        eecd | EECD_DI
                    } else {
                        eecd & !EECD_DI
                    };
                    self.w(EECD, eecd);
                    self.ee_clock(eecd);
                }
            }
            eecd &= !EECD_DI;
            let mut data = 0u16;
            for _ in 0..16 {
                let v = self.ee_clock(eecd);
                data = data << 1 | (v & EECD_DO != 0) as u16;
            }
            words.push(data);
            // e1000_standby_eeprom: deselect, clock high, select, clock low.
            eecd &= !(EECD_CS | EECD_SK);
            self.w(EECD, eecd);
            eecd |= EECD_SK;
            self.w(EECD, eecd);
            eecd |= EECD_CS;
            self.w(EECD, eecd);
            eecd &= !EECD_SK;
            self.w(EECD, eecd);
        }
        // e1000_release_eeprom: deselect, one clock, drop the request.
        eecd &= !(EECD_CS | EECD_DI);
        self.w(EECD, eecd);
        self.ee_clock(eecd);
        self.w(EECD, eecd & !EECD_REQ);
        Some(words)
    }

    pub fn ee_read_bitbang(&mut self, word: u16) -> Option<u16> {
        self.ee_read_words(word, 1).map(|w| w[0])
    }

    pub fn ee_read_eerd(&mut self, word: u16) -> Option<u16> {
        self.w(EERD, EERD_START | (word as u32) << 8);
        let v = self.r(EERD);
        (v & EERD_DONE != 0).then_some((v >> 16) as u16)
    }

    /// e1000_validate_eeprom_checksum.
    pub fn eeprom_checksum_ok(&mut self) -> bool {
        let mut sum = 0u16;
        for i in 0..64 {
            match self.ee_read_bitbang(i) {
                Some(w) => sum = sum.wrapping_add(w),
                None => return false,
            }
        }
        sum == EEPROM_SUM
    }

    pub fn read_mac(&mut self) -> MacAddr {
        let words = self.ee_read_words(0, 3).unwrap_or(vec![0xffff; 3]);
        let mut m = [0u8; 6];
        for (i, w) in words.iter().enumerate() {
            m[2 * i..2 * i + 2].copy_from_slice(&w.to_le_bytes());
        }
        MacAddr(m)
    }

    /// e1000_read_phy_reg at `addr`; `None` on an MDI error or no completion.
    pub fn phy_read_at(&mut self, addr: u32, reg: u32) -> Option<u16> {
        self.w(MDIC, reg << 16 | addr << 21 | MDIC_OP_READ);
        let v = (0..64)
            .map(|_| self.r(MDIC))
            .find(|v| v & MDIC_READY != 0)?;
        (v & MDIC_ERROR == 0).then_some(v as u16)
    }

    pub fn phy_read(&mut self, reg: u32) -> Option<u16> {
        self.phy_read_at(PHY_ADDR, reg)
    }

    pub fn phy_write(&mut self, reg: u32, v: u16) -> bool {
        self.w(MDIC, reg << 16 | PHY_ADDR << 21 | MDIC_OP_WRITE | v as u32);
        (0..64)
            .map(|_| self.r(MDIC))
            .find(|v| v & MDIC_READY != 0)
            .is_some_and(|v| v & MDIC_ERROR == 0)
    }

    pub fn phy_id(&mut self) -> Option<u32> {
        let hi = self.phy_read(PHY_ID1 as u32)? as u32;
        Some(hi << 16 | self.phy_read(PHY_ID2 as u32)? as u32)
    }

    /// e1000_init_hw's share: receive addresses, multicast table, copper link setup
    /// (SLU, autoneg advertisement, restart).
    pub fn init_hw(&mut self, mac: MacAddr) {
        let m = mac.0;
        self.w(RAL0, u32::from_le_bytes([m[0], m[1], m[2], m[3]]));
        self.w(RAH0, u16::from_le_bytes([m[4], m[5]]) as u32 | RAH_AV);
        for i in 1..16 {
            self.w(RAL0 + 8 * i, 0);
            self.w(RAH0 + 8 * i, 0);
        }
        for i in 0..128 {
            self.w(MTA + 4 * i, 0);
        }
        let ctrl = self.r(CTRL);
        self.w(CTRL, (ctrl | CTRL_SLU) & !(0x3 << 11));
        self.phy_write(PHY_AUTONEG_ADV as u32, 0x01e1);
        self.phy_write(PHY_1000T_CTRL as u32, 0x0300);
        self.phy_write(PHY_CTRL as u32, MII_CR_AUTONEG_EN | MII_CR_RESTART_AUTONEG);
    }

    /// Probe: reset, EEPROM checksum, MAC, PHY ID, init_hw. Returns the MAC.
    pub fn probe(&mut self) -> MacAddr {
        self.reset_hw();
        assert!(self.eeprom_checksum_ok(), "EEPROM checksum");
        let mac = self.read_mac();
        assert_eq!(
            self.phy_id().map(|id| id & !0xf),
            Some(0x0141_0c20),
            "M88E1011 PHY"
        );
        self.init_hw(mac);
        mac
    }

    /// e1000_configure_tx/rx, buffers posted, interrupts on, the LSC kick of e1000_open.
    pub fn open(&mut self) {
        self.configure_tx(self.tx_count);
        self.configure_rx(self.rx_count, RCTL_EN | RCTL_BAM);
        self.post_rx_all();
        self.w(IMS, IMS_ENABLE_MASK);
        self.w(ICS, ICR_LSC);
    }

    pub fn configure_tx(&mut self, count: usize) {
        self.tx_count = count;
        self.tx_next = 0;
        self.tx_eops.clear();
        self.w(TDBAL, TX_RING as u32);
        self.w(TDBAH, (TX_RING >> 32) as u32);
        self.w(TDLEN, (count * 16) as u32);
        self.w(TDH, 0);
        self.w(TDT, 0);
        self.w(TIPG, 0x0060_2008);
        self.w(TIDV, 8);
        self.w(TADV, 32);
        self.w(TCTL, TCTL_EN | TCTL_PSP | 0x0f << 4 | 0x40 << 12);
    }

    /// Ring setup with the receiver off, then RCTL = `rctl`. Buffers are 2048 bytes.
    pub fn configure_rx(&mut self, count: usize, rctl: u32) {
        self.rx_count = count;
        self.rx_next = 0;
        self.w(RCTL, 0);
        self.w(RDTR, 0);
        self.w(RADV, 8);
        self.w(RDBAL, RX_RING as u32);
        self.w(RDBAH, (RX_RING >> 32) as u32);
        self.w(RDLEN, (count * 16) as u32);
        self.w(RDH, 0);
        self.w(RDT, 0);
        let csum = self.r(RXCSUM);
        self.w(RXCSUM, csum | RXCSUM_TUOFL | RXCSUM_IPOFL);
        self.w(RCTL, rctl);
    }

    fn rx_desc(&self, i: usize) -> u64 {
        RX_RING + 16 * i as u64
    }

    fn post_rx(&mut self, i: usize) {
        let buf = RX_BUFS + (i * RX_BUF_SIZE) as u64;
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&buf.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(self.rx_desc(i)))
            .unwrap();
    }

    /// e1000_alloc_rx_buffers on an empty ring: all but one descriptor.
    pub fn post_rx_all(&mut self) {
        for i in 0..self.rx_count {
            self.post_rx(i);
        }
        self.w(RDT, (self.rx_count - 1) as u32);
    }

    /// e1000_clean_rx_irq: takes every completed frame (joining descriptors up to EOP),
    /// re-posts the buffers and moves RDT behind them.
    pub fn rx_poll(&mut self) -> Vec<RxFrame> {
        let strip_fcs = self.r(RCTL) & RCTL_SECRC == 0;
        let mut frames = vec![];
        let mut data = vec![];
        let mut descs = 0;
        let mut cleaned = None;
        for _ in 0..self.rx_count {
            let i = self.rx_next;
            let mut d = [0u8; 16];
            self.mem
                .read_slice(&mut d, GuestAddress(self.rx_desc(i)))
                .unwrap();
            if d[12] & RXD_STAT_DD == 0 {
                break;
            }
            let len = u16::from_le_bytes([d[8], d[9]]) as usize;
            let buf = RX_BUFS + (i * RX_BUF_SIZE) as u64;
            let at = data.len();
            data.resize(at + len, 0);
            self.mem
                .read_slice(&mut data[at..], GuestAddress(buf))
                .unwrap();
            descs += 1;
            if d[12] & RXD_STAT_EOP != 0 {
                let mut fcs = None;
                if strip_fcs && data.len() >= 4 {
                    let n = data.len() - 4;
                    fcs = Some(data[n..].try_into().unwrap());
                    data.truncate(n);
                }
                frames.push(RxFrame {
                    data: std::mem::take(&mut data),
                    fcs,
                    status: d[12],
                    errors: d[13],
                    special: u16::from_le_bytes([d[14], d[15]]),
                    descs,
                });
                descs = 0;
            }
            self.post_rx(i);
            cleaned = Some(i);
            self.rx_next = (i + 1) % self.rx_count;
        }
        if let Some(i) = cleaned {
            self.w(RDT, i as u32);
        }
        frames
    }

    fn tx_desc(&self, i: usize) -> u64 {
        TX_RING + 16 * i as u64
    }

    /// Writes raw descriptor `d` at the next slot (no TDT write).
    pub fn put_tx_desc(&mut self, d: [u8; 16]) -> usize {
        let i = self.tx_next;
        self.mem
            .write_slice(&d, GuestAddress(self.tx_desc(i)))
            .unwrap();
        self.tx_next = (i + 1) % self.tx_count;
        i
    }

    /// Copies `frame` into the TX buffers of the next descriptors, 4 KiB each; `desc(addr,
    /// len, last)` builds each descriptor.
    fn put_data(&mut self, frame: &[u8], desc: impl Fn(u64, usize, bool) -> [u8; 16]) {
        let chunks: Vec<&[u8]> = frame.chunks(TX_BUF_SIZE).collect();
        for (k, c) in chunks.iter().enumerate() {
            let buf = TX_BUFS + (self.tx_next * TX_BUF_SIZE) as u64;
            self.mem.write_slice(c, GuestAddress(buf)).unwrap();
            let last = k + 1 == chunks.len();
            let i = self.put_tx_desc(desc(buf, c.len(), last));
            if last {
                self.tx_eops.push_back(i);
            }
        }
    }

    pub fn kick_tx(&mut self) {
        self.w(TDT, self.tx_next as u32);
    }

    /// A legacy-descriptor frame; `csum` = (CSS, CSO) asks for checksum insertion, `vlan`
    /// for tag insertion.
    pub fn xmit_legacy(&mut self, frame: &[u8], csum: Option<(u8, u8)>, vlan: Option<u16>) {
        self.queue_legacy(frame, csum, vlan);
        self.kick_tx();
    }

    /// [`Self::xmit_legacy`] without the TDT write (xmit_more): the frame waits for a kick.
    pub fn queue_legacy(&mut self, frame: &[u8], csum: Option<(u8, u8)>, vlan: Option<u16>) {
        let ide = self.ide();
        self.put_data(frame, |addr, len, last| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..10].copy_from_slice(&(len as u16).to_le_bytes());
            if last {
                let mut cmd = TXD_CMD_EOP | TXD_CMD_IFCS | TXD_CMD_RS | ide;
                if let Some((css, cso)) = csum {
                    cmd |= TXD_CMD_IC;
                    d[10] = cso;
                    d[13] = css;
                }
                if let Some(tci) = vlan {
                    cmd |= TXD_CMD_VLE;
                    d[14..16].copy_from_slice(&tci.to_le_bytes());
                }
                d[11] = cmd;
            }
            d
        });
    }

    /// A context descriptor (all fields as in the manual; `paylen` 20 bits).
    #[allow(clippy::too_many_arguments)]
    pub fn context_desc(
        ipcss: u8,
        ipcso: u8,
        ipcse: u16,
        tucss: u8,
        tucso: u8,
        tucse: u16,
        tucmd: u8,
        paylen: u32,
        hdrlen: u8,
        mss: u16,
    ) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[0] = ipcss;
        d[1] = ipcso;
        d[2..4].copy_from_slice(&ipcse.to_le_bytes());
        d[4] = tucss;
        d[5] = tucso;
        d[6..8].copy_from_slice(&tucse.to_le_bytes());
        d[8..11].copy_from_slice(&paylen.to_le_bytes()[..3]);
        d[10] = (d[10] & 0xf) | TXD_DTYP_CONTEXT << 4;
        d[11] = tucmd | TXD_CMD_DEXT;
        d[13] = hdrlen;
        d[14..16].copy_from_slice(&mss.to_le_bytes());
        d
    }

    fn ide(&self) -> u8 {
        if self.tx_ide {
            TXD_CMD_IDE
        } else {
            0
        }
    }

    fn data_descs(&mut self, frame: &[u8], dcmd: u8, popts: u8, vlan: Option<u16>) {
        let ide = self.ide();
        self.put_data(frame, |addr, len, last| {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..11].copy_from_slice(&(len as u32).to_le_bytes()[..3]);
            d[10] = (d[10] & 0xf) | TXD_DTYP_DATA << 4;
            let mut cmd = dcmd | TXD_CMD_DEXT | TXD_CMD_IFCS;
            if last {
                cmd |= TXD_CMD_EOP | TXD_CMD_RS | ide;
                if let Some(tci) = vlan {
                    cmd |= TXD_CMD_VLE;
                    d[14..16].copy_from_slice(&tci.to_le_bytes());
                }
            }
            d[11] = cmd;
            d[13] = popts;
            d
        });
    }

    /// e1000_tx_csum + e1000_tx_queue: a context with the L4 checksum start and field, then
    /// data descriptors asking for TXSM. The driver seeded the field with the pseudo-header.
    pub fn xmit_csum(&mut self, frame: &[u8], css: u8, cso: u8, tcp: bool) {
        self.queue_csum(frame, css, cso, tcp);
        self.kick_tx();
    }

    /// [`Self::xmit_csum`] without the TDT write.
    pub fn queue_csum(&mut self, frame: &[u8], css: u8, cso: u8, tcp: bool) {
        let tucmd = if tcp { TXD_TUCMD_TCP } else { 0 };
        self.put_tx_desc(Self::context_desc(0, 0, 0, css, cso, 0, tucmd, 0, 0, 0));
        self.data_descs(frame, 0, TXD_POPTS_TXSM, None);
    }

    /// e1000_tso + e1000_tx_queue for an IPv4/TCP frame with the IP header at `l3` and TCP at
    /// `l4`, `hdrlen` bytes of headers.
    pub fn xmit_tso(
        &mut self,
        frame: &[u8],
        l3: u8,
        l4: u8,
        hdrlen: u8,
        mss: u16,
        vlan: Option<u16>,
    ) {
        self.queue_tso(frame, l3, l4, hdrlen, mss, vlan);
        self.kick_tx();
    }

    /// [`Self::xmit_tso`] without the TDT write.
    pub fn queue_tso(
        &mut self,
        frame: &[u8],
        l3: u8,
        l4: u8,
        hdrlen: u8,
        mss: u16,
        vlan: Option<u16>,
    ) {
        let paylen = frame.len().saturating_sub(hdrlen as usize) as u32;
        let tucmd = TXD_CMD_TSE | TXD_TUCMD_IP | TXD_TUCMD_TCP;
        self.put_tx_desc(Self::context_desc(
            l3,
            l3 + 10,
            l4 as u16 - 1,
            l4,
            l4 + 16,
            0,
            tucmd,
            paylen,
            hdrlen,
            mss,
        ));
        self.data_descs(frame, TXD_CMD_TSE, TXD_POPTS_IXSM | TXD_POPTS_TXSM, vlan);
    }

    /// e1000_clean_tx_irq: frames whose EOP descriptor is done.
    pub fn tx_done(&mut self) -> usize {
        let mut n = 0;
        while let Some(&i) = self.tx_eops.front() {
            let st: u8 = self
                .mem
                .read_obj(GuestAddress(self.tx_desc(i) + 12))
                .unwrap();
            if st & TXD_STAT_DD == 0 {
                break;
            }
            self.tx_eops.pop_front();
            n += 1;
        }
        n
    }

    pub fn tx_next(&self) -> usize {
        self.tx_next
    }
}
