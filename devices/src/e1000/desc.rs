//! The descriptors of the 8254x rings as the Software Developer's Manual lays them out
//! (section 3.2.3 for receive, 3.3 for transmit), read from and written to guest memory whole.
//! Fields are little-endian in memory; nicvm runs on little-endian hosts only (lib.rs checks).

use vm_memory::ByteValued;

/// Receive descriptor (SDM 3.2.3, Table 3-1).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct RxDesc {
    pub buffer_addr: u64,
    pub length: u16,
    /// Packet checksum (left 0 by the model).
    pub csum: u16,
    pub status: u8,
    pub errors: u8,
    pub special: u16,
}

/// Legacy transmit descriptor (SDM 3.3.3, Table 3-8).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct LegacyTxDesc {
    pub buffer_addr: u64,
    pub length: u16,
    pub cso: u8,
    pub cmd: u8,
    pub status: u8,
    pub css: u8,
    pub special: u16,
}

/// TCP/IP context transmit descriptor (SDM 3.3.6, Table 3-10).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct ContextDesc {
    pub ipcss: u8,
    pub ipcso: u8,
    pub ipcse: u16,
    pub tucss: u8,
    pub tucso: u8,
    pub tucse: u16,
    /// PAYLEN (bits 19:0), DTYP (23:20), TUCMD (31:24).
    pub paylen_dtyp_tucmd: u32,
    pub sta: u8,
    pub hdrlen: u8,
    pub mss: u16,
}

/// TCP/IP data transmit descriptor (SDM 3.3.7, Table 3-13).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct DataDesc {
    pub buffer_addr: u64,
    /// DTALEN (bits 19:0), DTYP (23:20), DCMD (31:24).
    pub dtalen_dtyp_dcmd: u32,
    pub sta: u8,
    pub popts: u8,
    pub special: u16,
}

// SAFETY: plain integers in `repr(C)` structs without padding (16 bytes each, checked below);
// every bit pattern is a valid value.
unsafe impl ByteValued for RxDesc {}
// SAFETY: as above.
unsafe impl ByteValued for LegacyTxDesc {}
// SAFETY: as above.
unsafe impl ByteValued for ContextDesc {}
// SAFETY: as above.
unsafe impl ByteValued for DataDesc {}

const _: () = {
    assert!(std::mem::size_of::<RxDesc>() == 16);
    assert!(std::mem::size_of::<LegacyTxDesc>() == 16);
    assert!(std::mem::size_of::<ContextDesc>() == 16);
    assert!(std::mem::size_of::<DataDesc>() == 16);
};

/// Where the status byte (DD) sits in every transmit descriptor type.
pub const TX_STATUS_OFFSET: u64 = std::mem::offset_of!(LegacyTxDesc, status) as u64;
/// Where the write-back half of a receive descriptor starts.
pub const RX_WRITEBACK_OFFSET: usize = std::mem::offset_of!(RxDesc, length);

impl DataDesc {
    /// The command byte: CMD, DCMD or TUCMD, in the same place in all three types.
    pub fn cmd(&self) -> u8 {
        (self.dtalen_dtyp_dcmd >> 24) as u8
    }
    /// DTYP of an extended descriptor (context or data).
    pub fn dtyp(&self) -> u8 {
        ((self.dtalen_dtyp_dcmd >> 20) & 0xf) as u8
    }
    pub fn dtalen(&self) -> usize {
        (self.dtalen_dtyp_dcmd & 0xf_ffff) as usize
    }
}

impl ContextDesc {
    pub fn tucmd(&self) -> u8 {
        (self.paylen_dtyp_tucmd >> 24) as u8
    }
}

/// The same 16 bytes seen as another descriptor type.
pub fn view<A: ByteValued, B: ByteValued + Default>(a: &A) -> B {
    let mut b = B::default();
    b.as_mut_slice().copy_from_slice(a.as_slice());
    b
}
