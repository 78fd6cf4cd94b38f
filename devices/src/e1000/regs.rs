//! Register offsets and bit names of the 8254x family as the Software Developer's Manual
//! names them (only what the 82540EM model uses).

// General registers.
pub const CTRL: usize = 0x0000;
pub const STATUS: usize = 0x0008;
pub const EECD: usize = 0x0010;
pub const EERD: usize = 0x0014;
pub const MDIC: usize = 0x0020;
pub const VET: usize = 0x0038;
pub const ICR: usize = 0x00c0;
pub const ITR: usize = 0x00c4;
pub const ICS: usize = 0x00c8;
pub const IMS: usize = 0x00d0;
pub const IMC: usize = 0x00d8;
pub const RCTL: usize = 0x0100;
pub const TCTL: usize = 0x0400;
pub const TIPG: usize = 0x0410;
pub const LEDCTL: usize = 0x0e00;
pub const PBA: usize = 0x1000;
pub const RDBAL: usize = 0x2800;
pub const RDBAH: usize = 0x2804;
pub const RDLEN: usize = 0x2808;
pub const RDH: usize = 0x2810;
pub const RDT: usize = 0x2818;
pub const RDTR: usize = 0x2820;
pub const RADV: usize = 0x282c;
pub const TDBAL: usize = 0x3800;
pub const TDBAH: usize = 0x3804;
pub const TDLEN: usize = 0x3808;
pub const TDH: usize = 0x3810;
pub const TDT: usize = 0x3818;
pub const TIDV: usize = 0x3820;
pub const TADV: usize = 0x382c;
/// RDTR/TIDV bit 31, Flush Partial Descriptor block: raise a delayed cause now.
pub const DELAY_FPD: u32 = 1 << 31;
pub const RXCSUM: usize = 0x5000;
pub const MTA: usize = 0x5200;
pub const RAL0: usize = 0x5400;
pub const RAH0: usize = 0x5404;
pub const VFTA: usize = 0x5600;
/// Size of BAR 0.
pub const MMIO_SIZE: u64 = 0x2_0000;
/// Size of BAR 1: IOADDR at 0, IODATA at 4, the rest reserved.
pub const IO_SIZE: u64 = 0x40;
pub const IOADDR: u64 = 0;
pub const IODATA: u64 = 4;

// Statistics (all read-to-clear; the 64-bit ones as low/high pairs).
pub const STATS_START: usize = 0x4000;
pub const STATS_END: usize = 0x4100;
pub const CRCERRS: usize = 0x4000;
pub const MPC: usize = 0x4010;
pub const RLEC: usize = 0x4040;
pub const PRC64: usize = 0x405c;
pub const GPRC: usize = 0x4074;
pub const BPRC: usize = 0x4078;
pub const MPRC: usize = 0x407c;
pub const GPTC: usize = 0x4080;
pub const GORCL: usize = 0x4088;
pub const GORCH: usize = 0x408c;
pub const GOTCL: usize = 0x4090;
pub const GOTCH: usize = 0x4094;
pub const RNBC: usize = 0x40a0;
pub const RUC: usize = 0x40a4;
pub const ROC: usize = 0x40ac;
pub const TORL: usize = 0x40c0;
pub const TORH: usize = 0x40c4;
pub const TOTL: usize = 0x40c8;
pub const TOTH: usize = 0x40cc;
pub const TPR: usize = 0x40d0;
pub const TPT: usize = 0x40d4;
pub const PTC64: usize = 0x40d8;
pub const MPTC: usize = 0x40f0;
pub const BPTC: usize = 0x40f4;
pub const TSCTC: usize = 0x40f8;
pub const TSCTFC: usize = 0x40fc;

// CTRL.
pub const CTRL_FD: u32 = 1 << 0;
pub const CTRL_ASDE: u32 = 1 << 5;
pub const CTRL_SLU: u32 = 1 << 6;
pub const CTRL_SPD_1000: u32 = 2 << 8;
pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_VME: u32 = 1 << 30;
pub const CTRL_PHY_RST: u32 = 1 << 31;

// STATUS.
pub const STATUS_FD: u32 = 1 << 0;
pub const STATUS_LU: u32 = 1 << 1;
pub const STATUS_SPEED_1000: u32 = 2 << 6;
pub const STATUS_ASDV_1000: u32 = 2 << 8;

// EECD / EERD.
pub const EECD_SK: u32 = 1 << 0;
pub const EECD_CS: u32 = 1 << 1;
pub const EECD_DI: u32 = 1 << 2;
pub const EECD_DO: u32 = 1 << 3;
pub const EECD_FWE: u32 = 3 << 4;
pub const EECD_REQ: u32 = 1 << 6;
pub const EECD_GNT: u32 = 1 << 7;
pub const EECD_PRES: u32 = 1 << 8;
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;

// MDIC.
pub const MDIC_OP_WRITE: u32 = 1 << 26;
pub const MDIC_OP_READ: u32 = 2 << 26;
pub const MDIC_READY: u32 = 1 << 28;
pub const MDIC_INT_EN: u32 = 1 << 29;
pub const MDIC_ERROR: u32 = 1 << 30;

// Interrupt causes (ICR, ICS, IMS, IMC).
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_TXQE: u32 = 1 << 1;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXDMT0: u32 = 1 << 4;
pub const ICR_RXO: u32 = 1 << 6;
pub const ICR_RXT0: u32 = 1 << 7;
pub const ICR_MDAC: u32 = 1 << 9;
/// Causes the 82540EM implements (bits 0-16).
pub const ICR_VALID: u32 = 0x1_ffff;

// RCTL.
pub const RCTL_EN: u32 = 1 << 1;
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
pub const RCTL_LPE: u32 = 1 << 5;
pub const RCTL_RDMTS_SHIFT: u32 = 8;
pub const RCTL_MO_SHIFT: u32 = 12;
pub const RCTL_BAM: u32 = 1 << 15;
pub const RCTL_BSIZE_SHIFT: u32 = 16;
pub const RCTL_VFE: u32 = 1 << 18;
pub const RCTL_BSEX: u32 = 1 << 25;
pub const RCTL_SECRC: u32 = 1 << 26;

// TCTL.
pub const TCTL_EN: u32 = 1 << 1;
pub const TCTL_PSP: u32 = 1 << 3;

// RXCSUM.
pub const RXCSUM_IPOFL: u32 = 1 << 8;
pub const RXCSUM_TUOFL: u32 = 1 << 9;

// RAH.
pub const RAH_AV: u32 = 1 << 31;
pub const RAH_ASEL: u32 = 3 << 16;

// Receive descriptor status and errors.
pub const RXD_STAT_DD: u8 = 1 << 0;
pub const RXD_STAT_EOP: u8 = 1 << 1;
pub const RXD_STAT_IXSM: u8 = 1 << 2;
pub const RXD_STAT_VP: u8 = 1 << 3;
pub const RXD_STAT_TCPCS: u8 = 1 << 5;
pub const RXD_STAT_IPCS: u8 = 1 << 6;
pub const RXD_ERR_TCPE: u8 = 1 << 5;
pub const RXD_ERR_IPE: u8 = 1 << 6;

// Transmit descriptors: the command byte (legacy CMD, data DCMD, context TUCMD share bits).
pub const TXD_CMD_EOP: u8 = 1 << 0;
pub const TXD_CMD_IFCS: u8 = 1 << 1;
pub const TXD_CMD_IC: u8 = 1 << 2;
/// In DCMD: this is a TCP segmentation frame; in TUCMD: the context is one.
pub const TXD_CMD_TSE: u8 = 1 << 2;
pub const TXD_CMD_RS: u8 = 1 << 3;
pub const TXD_CMD_DEXT: u8 = 1 << 5;
pub const TXD_CMD_VLE: u8 = 1 << 6;
/// Interrupt delay enable: TXDW for this descriptor waits for TIDV/TADV.
pub const TXD_CMD_IDE: u8 = 1 << 7;
/// TUCMD: the L4 protocol is TCP (else UDP); the L3 protocol is IPv4 (else IPv6).
pub const TXD_TUCMD_TCP: u8 = 1 << 0;
pub const TXD_TUCMD_IP: u8 = 1 << 1;
pub const TXD_DTYP_CONTEXT: u8 = 0;
pub const TXD_DTYP_DATA: u8 = 1;
pub const TXD_STAT_DD: u8 = 1 << 0;
pub const TXD_POPTS_IXSM: u8 = 1 << 0;
pub const TXD_POPTS_TXSM: u8 = 1 << 1;

/// Bytes per descriptor, both rings; ring lengths are multiples of 128 bytes (8 descriptors).
pub const DESC_LEN: u64 = 16;
pub const RING_LEN_MASK: u32 = 0x000f_ff80;
