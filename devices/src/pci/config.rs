//! Type 0 configuration space with per-bit write masks, so BAR sizing, read-only fields and
//! write-1-to-clear status bits all fall out of one write rule.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Io,
    Mem32,
    Mem64,
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    kind: BarKind,
    size: u64,
}

pub struct PciConfig {
    regs: [u8; 256],
    wmask: [u8; 256],
    w1c: [u8; 256],
    bars: [Option<Bar>; 6],
    last_cap: Option<usize>,
    next_cap: usize,
}

impl PciConfig {
    /// `class` is (base class, subclass, programming interface).
    pub fn new(vendor: u16, device: u16, class: (u8, u8, u8), revision: u8) -> Self {
        let mut c = PciConfig {
            regs: [0; 256],
            wmask: [0; 256],
            w1c: [0; 256],
            bars: [None; 6],
            last_cap: None,
            next_cap: 0x40,
        };
        c.set16(PCI_VENDOR_ID, vendor);
        c.set16(PCI_VENDOR_ID + 2, device);
        c.regs[PCI_REVISION_ID] = revision;
        c.regs[0x09] = class.2;
        c.regs[0x0a] = class.1;
        c.regs[0x0b] = class.0;
        let cmd =
            PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
        c.wmask[PCI_COMMAND..PCI_COMMAND + 2].copy_from_slice(&cmd.to_le_bytes());
        c.wmask[PCI_INTERRUPT_LINE] = 0xff;
        // Cache line size and latency timer are plain storage; Linux's pci_set_mwi() (which
        // 8139cp calls) fails the probe unless the cache line size it writes reads back.
        c.wmask[PCI_CACHE_LINE_SIZE] = 0xff;
        c.wmask[PCI_CACHE_LINE_SIZE + 1] = 0xff;
        c
    }

    pub fn set_subsystem(&mut self, vendor: u16, device: u16) {
        self.set16(PCI_SUBSYSTEM_VENDOR_ID, vendor);
        self.set16(PCI_SUBSYSTEM_VENDOR_ID + 2, device);
    }

    /// Legacy interrupt pin (1 = INTA) and the line the platform routed it to.
    pub fn set_interrupt(&mut self, pin: u8, line: u8) {
        self.regs[PCI_INTERRUPT_PIN] = pin;
        self.regs[PCI_INTERRUPT_LINE] = line;
    }

    pub fn interrupt_pin(&self) -> u8 {
        self.regs[PCI_INTERRUPT_PIN]
    }

    /// Declares BAR `idx` (a 64-bit BAR also takes `idx + 1`). `size` is a power of two.
    pub fn add_bar(&mut self, idx: usize, kind: BarKind, size: u64) {
        assert!(size.is_power_of_two() && idx < 6 && !(kind == BarKind::Mem64 && idx == 5));
        let size = size.max(if kind == BarKind::Io { 4 } else { 16 });
        self.bars[idx] = Some(Bar { kind, size });
        let off = PCI_BAR0 + idx * 4;
        let mask = !(size - 1);
        let (flags, low_mask) = match kind {
            BarKind::Io => (0x1u32, (mask as u32) & !0x3),
            BarKind::Mem32 => (0x0, (mask as u32) & !0xf),
            BarKind::Mem64 => (0x4, (mask as u32) & !0xf),
        };
        self.set32(off, flags);
        self.wmask[off..off + 4].copy_from_slice(&low_mask.to_le_bytes());
        if kind == BarKind::Mem64 {
            self.wmask[off + 4..off + 8].copy_from_slice(&((mask >> 32) as u32).to_le_bytes());
        }
    }

    /// Places a BAR, as firmware would before the guest runs.
    pub fn set_bar_addr(&mut self, idx: usize, addr: u64) {
        let bar = self.bars[idx].expect("BAR declared");
        let off = PCI_BAR0 + idx * 4;
        let low = (self.get32(off) & 0xf) | (addr as u32 & !0xf);
        self.set32(off, low);
        if bar.kind == BarKind::Mem64 {
            self.set32(off + 4, (addr >> 32) as u32);
        }
    }

    pub fn bar_kind(&self, idx: usize) -> Option<BarKind> {
        self.bars.get(idx).copied().flatten().map(|b| b.kind)
    }

    pub fn bar_size(&self, idx: usize) -> Option<u64> {
        self.bars.get(idx).copied().flatten().map(|b| b.size)
    }

    /// The BAR's guest address, whatever the decode bits say.
    pub fn bar_addr(&self, idx: usize) -> Option<u64> {
        let bar = self.bars.get(idx).copied().flatten()?;
        let off = PCI_BAR0 + idx * 4;
        let low = self.get32(off) as u64;
        Some(match bar.kind {
            BarKind::Io => low & !0x3,
            BarKind::Mem32 => low & !0xf,
            BarKind::Mem64 => (low & !0xf) | ((self.get32(off + 4) as u64) << 32),
        })
    }

    /// BARs the guest currently decodes: (index, kind, address, size).
    pub fn decoded_bars(&self) -> Vec<(usize, BarKind, u64, u64)> {
        let cmd = self.get16(PCI_COMMAND);
        (0..6)
            .filter_map(|i| {
                let bar = self.bars[i]?;
                let on = match bar.kind {
                    BarKind::Io => cmd & PCI_COMMAND_IO != 0,
                    _ => cmd & PCI_COMMAND_MEMORY != 0,
                };
                let addr = self.bar_addr(i)?;
                (on && addr != 0).then_some((i, bar.kind, addr, bar.size))
            })
            .collect()
    }

    /// Appends a capability: `body` starts with the ID byte; its next-pointer byte is filled
    /// in here. `wmask` gives the guest-writable bits of `body` (same length). Returns its offset.
    pub fn add_capability(&mut self, body: &[u8], wmask: &[u8]) -> usize {
        assert_eq!(body.len(), wmask.len());
        let off = self.next_cap;
        assert!(off + body.len() <= 256, "config space full");
        self.regs[off..off + body.len()].copy_from_slice(body);
        self.wmask[off..off + body.len()].copy_from_slice(wmask);
        self.regs[off + 1] = 0;
        self.wmask[off + 1] = 0;
        match self.last_cap {
            None => self.regs[PCI_CAPABILITY_LIST] = off as u8,
            Some(prev) => self.regs[prev + 1] = off as u8,
        }
        self.last_cap = Some(off);
        self.next_cap = (off + body.len() + 3) & !3;
        let status = self.get16(PCI_STATUS) | PCI_STATUS_CAP_LIST;
        self.set16(PCI_STATUS, status);
        off
    }

    /// The 256 bytes of config space, for a snapshot (the masks and BAR sizes are the
    /// device's own and come from building it).
    pub fn save(&self) -> Vec<u8> {
        self.regs.to_vec()
    }

    /// Config space from a snapshot. Bytes the guest cannot write (IDs, class, BAR size
    /// bits, capability layout) must be the ones this device already has: a snapshot of
    /// another device kind, or one altered there, is refused and nothing changes.
    pub fn restore(&mut self, saved: &[u8]) -> Result<(), crate::snapshot::RestoreError> {
        let regs: [u8; 256] = crate::snapshot::array(saved, "PCI config space")?;
        for (i, (&have, &want)) in self.regs.iter().zip(regs.iter()).enumerate() {
            // Status is partly the device's own to change (its interrupt bit).
            let device_owned = (PCI_STATUS..PCI_STATUS + 2).contains(&i);
            if self.wmask[i] == 0 && self.w1c[i] == 0 && !device_owned && have != want {
                return Err(crate::snapshot::RestoreError(format!(
                    "PCI config space: read-only byte {i:#04x} is {want:#04x}, this device has \
                     {have:#04x} (saved from another device, or from this model with other \
                     properties: restore with the -device options it was saved with, vectors= \
                     and mq= included)"
                )));
            }
        }
        self.regs = regs;
        Ok(())
    }

    /// Reads as the guest does: out-of-range bytes read as all-ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.regs.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Writes as the guest does, through the write masks.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let o = offset + i;
            if o >= 256 {
                break;
            }
            let m = self.wmask[o];
            self.regs[o] = (self.regs[o] & !m) | (v & m);
            self.regs[o] &= !(v & self.w1c[o]);
        }
    }

    /// Device-side view, ignoring masks.
    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.regs[off], self.regs[off + 1]])
    }
    pub fn get32(&self, off: usize) -> u32 {
        u32::from_le_bytes(self.regs[off..off + 4].try_into().unwrap())
    }
    pub fn set16(&mut self, off: usize, v: u16) {
        self.regs[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    pub fn set32(&mut self, off: usize, v: u32) {
        self.regs[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub fn command(&self) -> u16 {
        self.get16(PCI_COMMAND)
    }

    /// Mirrors the device's INTx state into Status bit 3, as the spec asks.
    pub fn set_interrupt_status(&mut self, pending: bool) {
        let s = self.get16(PCI_STATUS) & !PCI_STATUS_INTERRUPT;
        self.set16(
            PCI_STATUS,
            s | if pending { PCI_STATUS_INTERRUPT } else { 0 },
        );
    }
}
