//! The 93C46 serial EEPROM behind the RTL8139's 9346CR register: 64 words of 16 bits, read
//! over a Microwire-style 3-wire bus the driver bit-bangs (chip select, clock, data in) while
//! it samples data out. Only READ matters to drivers; write/erase commands are accepted and
//! ignored (the contents are the NIC's identity, which a guest may not change).
//!
//! A command is a start bit, a 2-bit opcode and a 6-bit address, clocked in MSB first on
//! rising clock edges. After the last address bit the chip drives a dummy 0, then one data
//! bit per rising edge, MSB first, moving on to the next word when a word ends (sequential
//! read). A driver that assumes 8 address bits therefore reads a shifted value; that is how
//! Linux tells a 93C46 from a 93C56 and it must stay so.

pub const EE_CS: u8 = 0x08;
pub const EE_SK: u8 = 0x04;
pub const EE_DI: u8 = 0x02;
pub const EE_DO: u8 = 0x01;

use crate::snapshot::RestoreError;

const ADDR_BITS: u32 = 6;
const OP_READ: u16 = 0b10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
enum State {
    /// Waiting for the start bit (a 1 on DI).
    Idle,
    /// Shifting in opcode and address: `got` bits so far.
    Command { bits: u16, got: u32 },
    /// Shifting out `word` from bit `bit` (16 = the dummy zero).
    Reading { addr: u8, bit: u32 },
    /// A command we ignore; stays here until chip select drops.
    Ignoring,
}

/// [`Eeprom93c46`] in a snapshot.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedEeprom {
    words: Vec<u16>,
    state: State,
    cs: bool,
    sk: bool,
    dout: bool,
}

pub struct Eeprom93c46 {
    pub words: [u16; 64],
    state: State,
    cs: bool,
    sk: bool,
    dout: bool,
}

impl Eeprom93c46 {
    pub fn new(words: [u16; 64]) -> Self {
        Eeprom93c46 {
            words,
            state: State::Idle,
            cs: false,
            sk: false,
            dout: true,
        }
    }

    /// The pins the driver drives, from a write to 9346CR in programming mode.
    pub fn set_pins(&mut self, pins: u8) {
        let cs = pins & EE_CS != 0;
        let sk = pins & EE_SK != 0;
        let di = pins & EE_DI != 0;
        if !cs {
            self.state = State::Idle;
            self.dout = true;
        } else if sk && !self.sk {
            self.rising_edge(di);
        }
        self.cs = cs;
        self.sk = sk;
    }

    /// The chip as a snapshot holds it: its words and where a command stands on the bus.
    pub fn save(&self) -> SavedEeprom {
        SavedEeprom {
            words: self.words.to_vec(),
            state: self.state,
            cs: self.cs,
            sk: self.sk,
            dout: self.dout,
        }
    }

    /// The chip from a snapshot, refusing a bus state no sequence of pin changes reaches.
    pub fn restore(s: &SavedEeprom) -> Result<Self, RestoreError> {
        let words = crate::snapshot::array(&s.words, "rtl8139 EEPROM words")?;
        let ok = match s.state {
            State::Idle | State::Ignoring => true,
            State::Command { bits, got } => got < 2 + ADDR_BITS && (bits as u32) < 1 << got,
            State::Reading { addr, bit } => addr < 64 && bit <= 16,
        };
        if !ok {
            return Err(RestoreError::new(format!(
                "rtl8139 EEPROM: impossible bus state {:?}",
                s.state
            )));
        }
        Ok(Eeprom93c46 {
            words,
            state: s.state,
            cs: s.cs,
            sk: s.sk,
            dout: s.dout,
        })
    }

    /// The data-out pin as the driver samples it.
    pub fn data_out(&self) -> bool {
        self.cs && self.dout
    }

    fn rising_edge(&mut self, di: bool) {
        self.state = match self.state {
            State::Idle if di => State::Command { bits: 0, got: 0 },
            State::Idle => State::Idle,
            State::Command { bits, got } => {
                let bits = bits << 1 | di as u16;
                let got = got + 1;
                if got < 2 + ADDR_BITS {
                    State::Command { bits, got }
                } else if bits >> ADDR_BITS == OP_READ {
                    self.dout = false; // the dummy bit
                    State::Reading {
                        addr: (bits & 0x3f) as u8,
                        bit: 16,
                    }
                } else {
                    State::Ignoring
                }
            }
            State::Reading { addr, bit } => {
                let (addr, bit) = if bit == 0 {
                    ((addr + 1) & 0x3f, 15)
                } else {
                    (addr, bit - 1)
                };
                self.dout = self.words[addr as usize] >> bit & 1 != 0;
                State::Reading { addr, bit }
            }
            State::Ignoring => State::Ignoring,
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Linux's read_eeprom() (8139too/8139cp), pin for pin.
    pub fn linux_read(e: &mut Eeprom93c46, location: u16, addr_len: u32) -> u16 {
        const EE_ENB: u8 = 0x80 | EE_CS;
        let cmd = (location | (6 << addr_len)) as u32;
        e.set_pins(EE_ENB & !EE_CS);
        e.set_pins(EE_ENB);
        for i in (0..3 + addr_len).rev() {
            let d = if cmd >> i & 1 != 0 { EE_DI } else { 0 };
            e.set_pins(EE_ENB | d);
            e.set_pins(EE_ENB | d | EE_SK);
        }
        e.set_pins(EE_ENB);
        let mut v = 0u16;
        for _ in 0..16 {
            e.set_pins(EE_ENB | EE_SK);
            v = v << 1 | e.data_out() as u16;
            e.set_pins(EE_ENB);
        }
        e.set_pins(0);
        v
    }

    #[test]
    fn reads_like_a_93c46() {
        let mut words = [0u16; 64];
        for (i, w) in words.iter_mut().enumerate() {
            *w = 0x1000 + i as u16 * 0x0101;
        }
        words[0] = 0x8129;
        let mut e = Eeprom93c46::new(words);
        for loc in [0u16, 7, 8, 9, 63] {
            assert_eq!(
                linux_read(&mut e, loc, 6),
                words[loc as usize],
                "word {loc}"
            );
        }
        // With 8 address bits the chip starts answering two clocks early: Linux must not see
        // its 93C56 signature.
        assert_ne!(linux_read(&mut e, 0, 8), 0x8129);
        assert!(!e.data_out(), "chip select low releases data out");
    }
}
