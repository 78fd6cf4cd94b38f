//! The 82540EM's 64-word Microwire EEPROM (a 93C46 behind EECD), readable by bit-banging
//! EECD or through EERD. Read-only here: erase/write opcodes are clocked in and ignored.

use super::regs::*;
use net_backends::MacAddr;

pub const WORDS: usize = 64;
/// Words 0..=0x3F sum to this (the checksum word makes it so).
pub const EEPROM_SUM: u16 = 0xbaba;
/// Microwire READ: start bit 1, opcode 10.
const OP_READ: u32 = 0b110;
const ADDR_BITS: u32 = 6;

pub const WORD_INIT_CONTROL1: usize = 0x0a;
pub const WORD_SUBSYSTEM_ID: usize = 0x0b;
pub const WORD_SUBSYSTEM_VENDOR: usize = 0x0c;
pub const WORD_DEVICE_ID: usize = 0x0d;
pub const WORD_VENDOR_ID: usize = 0x0e;
pub const WORD_INIT_CONTROL2: usize = 0x0f;
pub const WORD_CHECKSUM: usize = 0x3f;

/// [`Eeprom`] in a snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedEeprom {
    words: Vec<u16>,
    pins: u32,
    shift_in: u32,
    bits_in: u32,
    read_addr: Option<usize>,
    bits_out: usize,
}

pub struct Eeprom {
    words: [u16; WORDS],
    /// The EECD bits software drives (SK, CS, DI, FWE, REQ).
    pins: u32,
    /// Command bits clocked in since CS rose.
    shift_in: u32,
    bits_in: u32,
    /// While reading: the word address and how many data clocks have been given.
    read_addr: Option<usize>,
    bits_out: usize,
}

impl Eeprom {
    pub fn new(mac: MacAddr, device: u16, subsystem: (u16, u16)) -> Eeprom {
        let mut w = [0xffffu16; WORDS];
        for (i, pair) in mac.0.chunks_exact(2).enumerate() {
            w[i] = u16::from_le_bytes([pair[0], pair[1]]);
        }
        w[3] = 0; // compatibility: no special features
        w[4] = 0xffff; // LED configuration: driver defaults
        w[5] = 0x1000; // image version 1.0
        w[8] = 0x0000; // PBA number
        w[9] = 0x0000;
        // Signature 01b in bits 15:14; load subsystem and device IDs from here.
        w[WORD_INIT_CONTROL1] = 0x4000 | 0x3;
        w[WORD_SUBSYSTEM_ID] = subsystem.1;
        w[WORD_SUBSYSTEM_VENDOR] = subsystem.0;
        w[WORD_DEVICE_ID] = device;
        w[WORD_VENDOR_ID] = 0x8086;
        // Symmetric and asymmetric PAUSE advertised (what the driver derives flow control from).
        w[WORD_INIT_CONTROL2] = 0x3000;
        w[0x24] = 0; // init control 3, port A: no APM wake-up
        let sum = w[..WORD_CHECKSUM]
            .iter()
            .fold(0u16, |a, &x| a.wrapping_add(x));
        w[WORD_CHECKSUM] = EEPROM_SUM.wrapping_sub(sum);
        Eeprom {
            words: w,
            pins: 0,
            shift_in: 0,
            bits_in: 0,
            read_addr: None,
            bits_out: 0,
        }
    }

    pub fn save(&self) -> SavedEeprom {
        SavedEeprom {
            words: self.words.to_vec(),
            pins: self.pins,
            shift_in: self.shift_in,
            bits_in: self.bits_in,
            read_addr: self.read_addr,
            bits_out: self.bits_out,
        }
    }

    /// The EEPROM from a snapshot, refusing a Microwire state no EECD sequence reaches.
    pub fn restore(s: &SavedEeprom) -> Result<Eeprom, crate::snapshot::RestoreError> {
        let words = crate::snapshot::array(&s.words, "e1000 EEPROM words")?;
        let pins = EECD_SK | EECD_CS | EECD_DI | EECD_FWE | EECD_REQ;
        let ok = s.pins & !pins == 0
            && s.bits_in <= 3 + ADDR_BITS
            && s.shift_in < 1 << s.bits_in
            && s.read_addr.is_none_or(|a| a < WORDS)
            && s.bits_out <= 16 * WORDS;
        if !ok {
            return Err(crate::snapshot::RestoreError::new(
                "e1000 EEPROM: impossible EECD/Microwire state",
            ));
        }
        Ok(Eeprom {
            words,
            pins: s.pins,
            shift_in: s.shift_in,
            bits_in: s.bits_in,
            read_addr: s.read_addr,
            bits_out: s.bits_out,
        })
    }

    pub fn word(&self, i: usize) -> Option<u16> {
        self.words.get(i).copied()
    }

    /// EECD as software reads it: its own pins, PRES, GNT once requested, and DO.
    pub fn eecd(&self) -> u32 {
        let mut v = self.pins | EECD_PRES;
        if self.pins & EECD_REQ != 0 {
            v |= EECD_GNT;
        }
        if self.data_out() {
            v |= EECD_DO;
        }
        v
    }

    /// DO: a dummy 0 after the address, then the word(s) MSB first, sequentially.
    fn data_out(&self) -> bool {
        match self.read_addr {
            Some(a) if self.bits_out > 0 => {
                let bit = self.bits_out - 1;
                let word = self.words[(a + bit / 16) % WORDS];
                word >> (15 - bit % 16) & 1 != 0
            }
            _ => false,
        }
    }

    pub fn write_eecd(&mut self, v: u32) {
        let old = self.pins;
        self.pins = v & (EECD_SK | EECD_CS | EECD_DI | EECD_FWE | EECD_REQ);
        let cs = self.pins & EECD_CS != 0;
        if !cs || old & EECD_CS == 0 {
            // Deselected, or just selected: a new command starts.
            self.shift_in = 0;
            self.bits_in = 0;
            self.read_addr = None;
            self.bits_out = 0;
            return;
        }
        let rising = self.pins & EECD_SK != 0 && old & EECD_SK == 0;
        if !rising {
            return;
        }
        if self.read_addr.is_some() {
            // Each further clock shifts out one data bit (reads run on across words).
            self.bits_out = (self.bits_out + 1) % (16 * WORDS + 1);
            return;
        }
        if self.bits_in >= 3 + ADDR_BITS {
            return; // a command we do not implement: ignore the rest of it
        }
        self.shift_in = self.shift_in << 1 | (self.pins & EECD_DI != 0) as u32;
        self.bits_in += 1;
        if self.bits_in == 3 + ADDR_BITS && self.shift_in >> ADDR_BITS == OP_READ {
            self.read_addr = Some((self.shift_in & ((1 << ADDR_BITS) - 1)) as usize);
        }
    }

    /// EERD write: with START, completes at once with the word (or 0 beyond the array).
    pub fn eerd(&self, v: u32) -> u32 {
        if v & EERD_START == 0 {
            return v & !EERD_DONE;
        }
        let addr = (v >> 8) & 0xff;
        let data = self.word(addr as usize).unwrap_or(0) as u32;
        data << 16 | addr << 8 | EERD_DONE
    }
}
