//! A synthetic RTL8139 driver: the register sequences of Linux's `8139cp` (C+ mode) and
//! `8139too` (normal mode), played against the model from the host. Device tests and the
//! no-guest benchmark use it.

use super::rx::*;
use super::tx::*;
use super::*;
use crate::interrupt::{IntxLine, RecordingIrqChip};
use crate::net::{BackendInterest, NetPort, Nic};
use crate::pci::{PciDevice, PCI_COMMAND, PCI_COMMAND_IO, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY};
use net_backends::NetBackend;
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Room for the TX buffers of all 64 C+ descriptors (64 KiB each from 1 MiB on).
pub const MEM_SIZE: usize = 8 << 20;
/// 8139cp's rings: 64 RX descriptors then 64 TX descriptors.
pub const CP_RING: u16 = 64;
pub const RX_RING: u64 = 0x1_0000;
pub const TX_RING: u64 = RX_RING + CP_RING as u64 * 16;
pub const RX_BUFS: u64 = 0x2_0000;
pub const RX_BUF_SZ: u32 = 1536;
/// TX buffers: 64 KiB per descriptor slot; a frame's fragments are packed from its first slot on.
pub const TX_BUFS: u64 = 0x10_0000;
/// 8139too's receive ring (32 KiB + 16 + 2 KiB of slack for WRAP) and its four TX buffers.
pub const RING_BUF: u64 = 0x8_0000;
pub const RING_LEN_32K: usize = 32768;
pub const TOO_TX_BUFS: u64 = 0x9_0000;
pub const TOO_TX_SLOT: u64 = 2048;

pub const CP_INTR_MASK: u16 = INT_ROK | INT_RER | INT_RXOVW_RDU | 1 << 6 // RxFIFOOvr
    | INT_SERR | INT_LINKCHG | INT_TOK | INT_TER | 1 << 7; // TxEmpty
pub const TOO_INTR_MASK: u16 = INT_SERR
    | INT_TIMEOUT
    | 1 << 6
    | INT_LINKCHG
    | INT_RXOVW_RDU
    | INT_TER
    | INT_TOK
    | INT_RER
    | INT_ROK;

pub struct Driver {
    pub dev: Nic<Rtl8139>,
    pub mem: GuestMemoryMmap,
    pub chip: Arc<RecordingIrqChip>,
    pub gsi: u32,
    tx_head: u16,
    tx_tail: u16,
    rx_tail: u16,
    cur_tx: usize,
    cur_rx: usize,
    ring_len: usize,
}

impl Driver {
    /// A device on `backend` with its BARs placed and decoding on, as after firmware.
    pub fn new(backend: Box<dyn NetBackend>, cplus: bool) -> Driver {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
        Driver::new_in(mem, backend, cplus)
    }

    /// [`Driver::new`] with `mem` (MEM_SIZE bytes from 0) as guest RAM.
    pub fn new_in(mem: GuestMemoryMmap, backend: Box<dyn NetBackend>, cplus: bool) -> Driver {
        let chip = Arc::new(RecordingIrqChip::default());
        let gsi = 19;
        let mac: net_backends::MacAddr = "52:54:00:12:34:56".parse().unwrap();
        let model =
            Rtl8139::new(mac, mem.clone(), IntxLine::new(chip.clone(), gsi, 0), cplus).unwrap();
        let port = NetPort::new(format!("rtl8139 {mac}"), backend).unwrap();
        let mut dev = Nic::new(model, port);
        dev.config_mut().set_bar_addr(BAR_IO, 0xc000);
        dev.config_mut().set_bar_addr(BAR_MEM, 0xc000_0000);
        let cmd = PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        dev.config_mut().write(PCI_COMMAND, &cmd.to_le_bytes());
        dev.config_written(PCI_COMMAND, 2);
        Driver {
            dev,
            mem,
            chip,
            gsi,
            tx_head: 0,
            tx_tail: 0,
            rx_tail: 0,
            cur_tx: 0,
            cur_rx: 0,
            ring_len: RING_LEN_32K,
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
        let mut new = Driver::new(backend, self.dev.cplus);
        let mut ram = vec![0u8; MEM_SIZE];
        self.mem.read_slice(&mut ram, GuestAddress(0)).unwrap();
        new.mem.write_slice(&ram, GuestAddress(0)).unwrap();
        new.dev.restore(state)?;
        self.dev = new.dev;
        self.mem = new.mem;
        self.chip = new.chip;
        Ok(())
    }

    /// A register write, and then what the I/O thread does at once when the write left
    /// frames for it to hand to the backend.
    pub fn w(&mut self, off: usize, v: u32, len: usize) {
        self.w_only(off, v, len);
        self.dev.run_flush_kicks();
    }

    /// A register write alone: frames it queued wait for [`Nic::run_flush_kicks`].
    pub fn w_only(&mut self, off: usize, v: u32, len: usize) {
        self.dev
            .bar_write(BAR_MEM, off as u64, &v.to_le_bytes()[..len]);
    }
    pub fn r(&mut self, off: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.dev.bar_read(BAR_MEM, off as u64, &mut b[..len]);
        u32::from_le_bytes(b)
    }
    pub fn w8(&mut self, off: usize, v: u8) {
        self.w(off, v as u32, 1)
    }
    pub fn w16(&mut self, off: usize, v: u16) {
        self.w(off, v as u32, 2)
    }
    pub fn w32(&mut self, off: usize, v: u32) {
        self.w(off, v, 4)
    }
    pub fn r8(&mut self, off: usize) -> u8 {
        self.r(off, 1) as u8
    }
    pub fn r16(&mut self, off: usize) -> u16 {
        self.r(off, 2) as u16
    }
    pub fn r32(&mut self, off: usize) -> u32 {
        self.r(off, 4)
    }

    /// The interrupt line as the IOAPIC sees it.
    pub fn irq(&self) -> bool {
        self.chip.level(self.gsi)
    }

    /// read_eeprom() of both drivers: bit-banging 9346CR.
    pub fn read_eeprom(&mut self, location: u16, addr_len: u32) -> u16 {
        const EE_ENB: u8 = 0x80 | eeprom::EE_CS;
        let cmd = (location | (6 << addr_len)) as u32;
        self.w8(CR9346, EE_ENB & !eeprom::EE_CS);
        self.w8(CR9346, EE_ENB);
        for i in (0..3 + addr_len).rev() {
            let d = if cmd >> i & 1 != 0 { eeprom::EE_DI } else { 0 };
            self.w8(CR9346, EE_ENB | d);
            self.w8(CR9346, EE_ENB | d | eeprom::EE_SK);
        }
        self.w8(CR9346, EE_ENB);
        let mut v = 0u16;
        for _ in 0..16 {
            self.w8(CR9346, EE_ENB | eeprom::EE_SK);
            v = v << 1 | (self.r8(CR9346) & eeprom::EE_DO) as u16;
            self.w8(CR9346, EE_ENB);
        }
        self.w8(CR9346, 0);
        v
    }

    /// The probe both drivers do: stop the chip, size the EEPROM, read the MAC from it.
    pub fn probe(&mut self) -> [u8; 6] {
        self.w16(CPCR, 0);
        self.w8(CR, 0);
        let addr_len = if self.read_eeprom(0, 8) == 0x8129 {
            8
        } else {
            6
        };
        let mut mac = [0u8; 6];
        for i in 0..3 {
            let w = self.read_eeprom(7 + i as u16, addr_len).to_le_bytes();
            mac[2 * i..2 * i + 2].copy_from_slice(&w);
        }
        mac
    }

    fn chip_reset(&mut self) {
        self.w8(CR, CR_RST);
        assert_eq!(self.r8(CR) & CR_RST, 0, "reset completes at once");
    }

    /// 8139cp's cp_open(): rings, reset, C+ on, ring addresses, RX/TX on, filters, IMR.
    pub fn open_cp(&mut self, cpcr_extra: u16) {
        for i in 0..CP_RING {
            self.set_rx_desc(i);
            self.write_desc(
                TX_RING,
                i,
                if i == CP_RING - 1 { DESC_EOR } else { 0 },
                0,
                0,
            );
        }
        self.chip_reset();
        self.w8(CR9346, 0xc0);
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56, 0, 0];
        self.w32(IDR0, u32::from_le_bytes(mac[0..4].try_into().unwrap()));
        self.w32(IDR0 + 4, u32::from_le_bytes(mac[4..8].try_into().unwrap()));
        self.w16(
            CPCR,
            CPCR_RXCHKSUM | CPCR_RXON | CPCR_TXON | 1 << 3 | cpcr_extra,
        );
        self.w32(THPDS, 0);
        self.w32(THPDS + 4, 0);
        self.w32(RDSAR, RX_RING as u32);
        self.w32(RDSAR + 4, 0);
        self.w32(TNPDS, TX_RING as u32);
        self.w32(TNPDS + 4, 0);
        self.w8(CR, CR_RE | CR_TE);
        self.w32(RCR, RCR_AB | RCR_APM | 7 << 13 | 7 << 8);
        self.w32(MAR0, 0);
        self.w32(MAR0 + 4, 0);
        self.w32(TCR, 3 << 24 | 6 << 8);
        self.w8(CR9346, 0);
        self.w16(IMR, CP_INTR_MASK);
        self.tx_head = 0;
        self.tx_tail = 0;
        self.rx_tail = 0;
    }

    pub fn write_desc(&self, ring: u64, i: u16, opts1: u32, opts2: u32, addr: u64) {
        let mut d = [0u8; 16];
        d[0..4].copy_from_slice(&opts1.to_le_bytes());
        d[4..8].copy_from_slice(&opts2.to_le_bytes());
        d[8..16].copy_from_slice(&addr.to_le_bytes());
        self.mem
            .write_slice(&d, GuestAddress(ring + i as u64 * 16))
            .unwrap();
    }

    pub fn read_desc(&self, ring: u64, i: u16) -> (u32, u32, u64) {
        let mut d = [0u8; 16];
        self.mem
            .read_slice(&mut d, GuestAddress(ring + i as u64 * 16))
            .unwrap();
        (
            u32::from_le_bytes(d[0..4].try_into().unwrap()),
            u32::from_le_bytes(d[4..8].try_into().unwrap()),
            u64::from_le_bytes(d[8..16].try_into().unwrap()),
        )
    }

    fn set_rx_desc(&self, i: u16) {
        let eor = if i == CP_RING - 1 { DESC_EOR } else { 0 };
        let buf = RX_BUFS + i as u64 * 2048;
        self.write_desc(RX_RING, i, DESC_OWN | eor | RX_BUF_SZ, 0, buf);
    }

    /// cp_start_xmit(): one descriptor per fragment, the first handed over last, then TPPoll.
    pub fn cp_xmit(&mut self, frags: &[&[u8]], opts1: u32, opts2: u32) {
        self.cp_queue(frags, opts1, opts2);
        self.w8(TPPOLL, TPPOLL_NPQ);
    }

    /// [`Self::cp_xmit`] without the TPPoll write: the frame waits for the next poll.
    pub fn cp_queue(&mut self, frags: &[&[u8]], opts1: u32, opts2: u32) {
        let first = self.tx_head;
        let n = frags.len();
        let mut entry = first;
        let mut entries = vec![];
        for _ in 0..n {
            entries.push(entry);
            entry = (entry + 1) % CP_RING;
        }
        // The fragments lie back to back from the first slot's buffer on, as a driver's page
        // fragments often do; a frame stays within its own slots (each fragment is shorter
        // than a 64 KiB slot, so n fragments reach at most n slots on).
        let mut at = TX_BUFS + first as u64 * 0x1_0000;
        let bufs: Vec<u64> = frags
            .iter()
            .map(|f| {
                let b = at;
                at += f.len() as u64;
                b
            })
            .collect();
        for (k, ((frag, &e), &buf)) in frags.iter().zip(&entries).zip(&bufs).enumerate().rev() {
            self.mem.write_slice(frag, GuestAddress(buf)).unwrap();
            let eor = if e == CP_RING - 1 { DESC_EOR } else { 0 };
            let mut ctrl = DESC_OWN | opts1 | eor | frag.len() as u32;
            if k == 0 {
                ctrl |= DESC_FS;
            }
            if k == n - 1 {
                ctrl |= DESC_LS;
            }
            self.write_desc(TX_RING, e, ctrl, opts2, buf);
        }
        self.tx_head = entry;
    }

    /// cp_tx(): descriptors the device gave back since the last call, with their status.
    pub fn cp_tx_done(&mut self) -> Vec<u32> {
        let mut done = vec![];
        while self.tx_tail != self.tx_head {
            let (opts1, _, _) = self.read_desc(TX_RING, self.tx_tail);
            if opts1 & DESC_OWN != 0 {
                break;
            }
            done.push(opts1);
            self.tx_tail = (self.tx_tail + 1) % CP_RING;
        }
        done
    }

    /// cp_rx_poll(): ack RX causes, take every filled descriptor (status, opts2, data
    /// without CRC), give it back, unmask.
    pub fn cp_rx(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        self.w16(ISR, INT_ROK | INT_RER | INT_RXOVW_RDU | 1 << 6);
        let mut got = vec![];
        for _ in 0..CP_RING {
            let (opts1, opts2, addr) = self.read_desc(RX_RING, self.rx_tail);
            if opts1 & DESC_OWN != 0 {
                break;
            }
            let len = (opts1 & RX_LEN_MASK) as usize;
            let mut data = vec![0u8; len.saturating_sub(4)];
            self.mem.read_slice(&mut data, GuestAddress(addr)).unwrap();
            got.push((opts1, opts2, data));
            self.set_rx_desc(self.rx_tail);
            self.rx_tail = (self.rx_tail + 1) % CP_RING;
        }
        self.w16(IMR, CP_INTR_MASK);
        got
    }

    /// 8139too's rtl8139_hw_start() with the 32 KiB no-wrap ring it uses by default.
    pub fn open_too(&mut self, rcr_extra: u32) {
        self.chip_reset();
        self.w8(CR9346, 0xc0);
        self.w32(IDR0, u32::from_le_bytes([0x52, 0x54, 0, 0x12]));
        self.w32(IDR0 + 4, u32::from_le_bytes([0x34, 0x56, 0, 0]));
        self.cur_rx = 0;
        self.cur_tx = 0;
        self.w32(RBSTART, RING_BUF as u32);
        self.w8(CR, CR_RE | CR_TE);
        let rcr = 2 << RCR_RBLEN_SHIFT | RCR_WRAP | 7 << 13 | 7 << 8 | RCR_AB | RCR_APM;
        let rcr = if rcr_extra & 0x8000_0000 != 0 {
            // Test hook: an 8 KiB ring that wraps instead.
            self.ring_len = 8192;
            (rcr & !(3 << RCR_RBLEN_SHIFT) & !RCR_WRAP) | (rcr_extra & 0x7fff_ffff)
        } else {
            self.ring_len = RING_LEN_32K;
            rcr | rcr_extra
        };
        self.w32(RCR, rcr);
        self.w32(TCR, 3 << 24 | 6 << 8);
        self.w8(CR9346, 0);
        for i in 0..4 {
            self.w32(TSAD0 + 4 * i, (TOO_TX_BUFS + i as u64 * TOO_TX_SLOT) as u32);
        }
        self.w32(MPC, 0);
        self.w16(MULINT, 0);
        self.w16(IMR, TOO_INTR_MASK);
    }

    /// rtl8139_start_xmit(): copy into the slot's buffer, pad to 60, write TSD.
    pub fn too_xmit(&mut self, frame: &[u8]) -> usize {
        let slot = self.cur_tx % 4;
        let mut data = frame.to_vec();
        data.resize(frame.len().max(60), 0);
        let buf = TOO_TX_BUFS + slot as u64 * TOO_TX_SLOT;
        self.mem.write_slice(&data, GuestAddress(buf)).unwrap();
        self.w32(TSD0 + 4 * slot, data.len() as u32);
        self.cur_tx += 1;
        slot
    }

    /// rtl8139_rx(): frames (status, data without CRC) until BUFE, advancing CAPR.
    pub fn too_rx(&mut self) -> Vec<(u16, Vec<u8>)> {
        let mut got = vec![];
        while self.r8(CR) & CR_BUFE == 0 && got.len() < 1000 {
            let off = self.cur_rx % self.ring_len;
            let hdr: u32 = self
                .mem
                .read_obj(GuestAddress(RING_BUF + off as u64))
                .unwrap();
            let size = (hdr >> 16) as usize;
            let mut data = vec![0u8; size.saturating_sub(4)];
            let start = off + 4;
            let linear = self.ring_len - start.min(self.ring_len);
            if self.ring_len == RING_LEN_32K || data.len() <= linear {
                self.mem
                    .read_slice(&mut data, GuestAddress(RING_BUF + start as u64))
                    .unwrap();
            } else {
                let (a, b) = data.split_at_mut(linear);
                self.mem
                    .read_slice(a, GuestAddress(RING_BUF + start as u64))
                    .unwrap();
                self.mem.read_slice(b, GuestAddress(RING_BUF)).unwrap();
            }
            got.push((hdr as u16, data));
            self.cur_rx = (self.cur_rx + size + 4 + 3) & !3;
            self.w16(CAPR, (self.cur_rx as u16).wrapping_sub(16));
            self.w16(ISR, INT_ROK | INT_RXOVW_RDU | 1 << 6);
        }
        got
    }

    /// The I/O thread's share: pump the backend into the device.
    pub fn pump(&mut self) -> BackendInterest {
        self.dev.pump()
    }

    /// What the I/O thread does when a kick fired.
    pub fn kicked(&mut self) -> BackendInterest {
        self.dev.run_kicks()
    }
}
