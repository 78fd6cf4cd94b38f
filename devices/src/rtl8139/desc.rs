//! The structures the RTL8139C+ reads and writes in guest memory, laid out as its datasheet
//! gives them (little-endian; lib.rs checks the host is too).

use vm_memory::ByteValued;

/// A C+ mode descriptor of either ring (datasheet 9.2.1/9.2.2): command and status in
/// `opts1`, VLAN tag control in `opts2`, the buffer's 64-bit address.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CpDesc {
    pub opts1: u32,
    pub opts2: u32,
    pub buffer_addr: u64,
}

/// The 64-byte tally counter block DTCCR dumps (datasheet 6.2, "Tally Counter"), in its field
/// order. Collision counters stay zero: there are none on a virtual wire.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tally {
    pub tx_ok: u64,
    pub rx_ok: u64,
    pub tx_err: u64,
    pub rx_err: u32,
    pub miss_pkt: u16,
    pub fae: u16,
    pub tx_1col: u32,
    pub tx_mcol: u32,
    pub rx_ok_phy: u64,
    pub rx_ok_brd: u64,
    pub rx_ok_mul: u32,
    pub tx_abt: u16,
    pub tx_undrn: u16,
}

/// The header normal mode writes in front of each frame in the receive ring: the receive
/// status (RSR) and the length with the CRC.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RxHeader {
    pub status: u16,
    pub length: u16,
}

// SAFETY: plain integers in `repr(C)` structs without padding (sizes checked below); every bit
// pattern is a valid value.
unsafe impl ByteValued for CpDesc {}
// SAFETY: as above.
unsafe impl ByteValued for Tally {}
// SAFETY: as above.
unsafe impl ByteValued for RxHeader {}

const _: () = {
    assert!(std::mem::size_of::<CpDesc>() == 16);
    assert!(std::mem::size_of::<Tally>() == 64);
    assert!(std::mem::size_of::<RxHeader>() == 4);
};
