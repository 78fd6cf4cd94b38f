//! The Marvell 88E1011 gigabit PHY inside the 82540EM, reached through MDIC at PHY address 1.
//! Auto-negotiation completes the moment it is started (no real link partner to wait for):
//! 1000BASE-T full duplex against a partner that advertises everything.

pub const PHY_ADDR: u32 = 1;

// IEEE registers.
pub const PHY_CTRL: usize = 0x00;
pub const PHY_STATUS: usize = 0x01;
pub const PHY_ID1: usize = 0x02;
pub const PHY_ID2: usize = 0x03;
pub const PHY_AUTONEG_ADV: usize = 0x04;
pub const PHY_LP_ABILITY: usize = 0x05;
pub const PHY_AUTONEG_EXP: usize = 0x06;
pub const PHY_1000T_CTRL: usize = 0x09;
pub const PHY_1000T_STATUS: usize = 0x0a;
pub const PHY_EXT_STATUS: usize = 0x0f;
// Marvell-specific registers.
pub const M88_PHY_SPEC_CTRL: usize = 0x10;
pub const M88_PHY_SPEC_STATUS: usize = 0x11;
pub const M88_INT_ENABLE: usize = 0x12;
pub const M88_INT_STATUS: usize = 0x13;
pub const M88_EXT_PHY_SPEC_CTRL: usize = 0x14;
pub const M88_RX_ERR_CNTR: usize = 0x15;

/// M88E1011_I_PHY_ID split over ID1/ID2.
pub const M88E1011_ID1: u16 = 0x0141;
pub const M88E1011_ID2: u16 = 0x0c20;

pub const MII_CR_RESET: u16 = 1 << 15;
pub const MII_CR_AUTONEG_EN: u16 = 1 << 12;
pub const MII_CR_POWER_DOWN: u16 = 1 << 11;
pub const MII_CR_RESTART_AUTONEG: u16 = 1 << 9;
pub const MII_SR_LINK_STATUS: u16 = 1 << 2;
pub const MII_SR_AUTONEG_COMPLETE: u16 = 1 << 5;

/// Capabilities the status register always shows: 10/100 half and full, extended status,
/// preamble suppression, auto-negotiation ability, extended registers.
const STATUS_CAPS: u16 = 0x7949;
/// Link partner: 10/100 half and full, PAUSE, acknowledge.
const LP_ABILITY: u16 = 0x45e1;
/// 1000BASE-T status: local and remote receiver OK, partner 1000 half and full.
const GBIT_STATUS: u16 = 0x3c00;
/// Marvell specific status: 1000 Mb/s, full duplex, speed and duplex resolved, link.
const M88_STATUS_LINK: u16 = 0x8000 | 0x2000 | 0x0800 | 0x0400;

/// Registers the driver may write; the rest are read-only.
const WRITABLE: [usize; 8] = [
    PHY_CTRL,
    PHY_AUTONEG_ADV,
    PHY_1000T_CTRL,
    M88_PHY_SPEC_CTRL,
    M88_INT_ENABLE,
    M88_EXT_PHY_SPEC_CTRL,
    0x1d, // Marvell page select (errata sequences)
    0x1e, // Marvell page data
];

/// The PHY's registers and link. A snapshot holds it as it is: any register value is one a
/// driver could read back.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phy {
    regs: [u16; 32],
    /// Auto-negotiation (or forced setup) finished and the PHY is powered up.
    link: bool,
}

impl Default for Phy {
    fn default() -> Self {
        let mut p = Phy {
            regs: [0; 32],
            link: false,
        };
        p.reset();
        p
    }
}

impl Phy {
    /// Power-on / MII reset values. Negotiation runs from power-on, so the PHY has link.
    pub fn reset(&mut self) {
        self.regs = [0; 32];
        self.regs[PHY_CTRL] = 0x1140; // auto-negotiation, full duplex, 1000 Mb/s
        self.regs[PHY_ID1] = M88E1011_ID1;
        self.regs[PHY_ID2] = M88E1011_ID2;
        self.regs[PHY_AUTONEG_ADV] = 0x01e1;
        self.regs[PHY_AUTONEG_EXP] = 0x0001; // partner can negotiate
        self.regs[PHY_1000T_CTRL] = 0x0300;
        self.regs[PHY_EXT_STATUS] = 0x3000; // 1000BASE-T half and full
        self.regs[M88_PHY_SPEC_CTRL] = 0x0068;
        self.regs[M88_EXT_PHY_SPEC_CTRL] = 0x0d60;
        self.link = true;
    }

    /// Held in reset (CTRL.PHY_RST): no link until released.
    pub fn hold_reset(&mut self) {
        self.reset();
        self.link = false;
    }

    pub fn release_reset(&mut self) {
        self.link = self.regs[PHY_CTRL] & MII_CR_POWER_DOWN == 0;
    }

    /// Whether the PHY reports link; `wire` is whether the backend has a peer.
    pub fn link_up(&self, wire: bool) -> bool {
        self.link && wire
    }

    pub fn read(&self, reg: usize, wire: bool) -> u16 {
        let up = self.link_up(wire);
        match reg {
            PHY_STATUS => {
                let mut v = STATUS_CAPS;
                if up {
                    v |= MII_SR_LINK_STATUS;
                }
                if self.link {
                    v |= MII_SR_AUTONEG_COMPLETE;
                }
                v
            }
            PHY_LP_ABILITY if up => LP_ABILITY,
            PHY_1000T_STATUS if up => GBIT_STATUS,
            M88_PHY_SPEC_STATUS if up => M88_STATUS_LINK,
            _ => self.regs.get(reg).copied().unwrap_or(0),
        }
    }

    /// Writes a register; true when this started (or restarted) negotiation.
    pub fn write(&mut self, reg: usize, v: u16) -> bool {
        if !WRITABLE.contains(&reg) {
            return false;
        }
        if reg != PHY_CTRL {
            self.regs[reg] = v;
            return false;
        }
        if v & MII_CR_RESET != 0 {
            // A software reset keeps the written speed/duplex/autoneg settings and renegotiates.
            self.reset();
            self.regs[PHY_CTRL] = v & !(MII_CR_RESET | MII_CR_RESTART_AUTONEG);
            self.link = v & MII_CR_POWER_DOWN == 0;
            return self.link;
        }
        self.regs[PHY_CTRL] = v & !MII_CR_RESTART_AUTONEG; // self-clearing
                                                           // Negotiation (started, restarted or replaced by forced settings) completes at once;
                                                           // power-down drops the link.
        self.link = v & MII_CR_POWER_DOWN == 0;
        self.link && v & MII_CR_RESTART_AUTONEG != 0
    }
}
