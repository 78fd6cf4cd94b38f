//! Guest physical memory map (x86 PC conventions, no firmware).
//!
//! ```text
//! 0x0000_0500  GDT for the boot vCPU
//! 0x0000_6000  PVH start_info, memory map, module list
//! 0x0000_7000  Linux zero page (boot_params) for bzImage boots
//! 0x0000_9000  identity page tables for 64-bit entry (PML4, PDPT, PD)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  - 0x0010_0000 reserved (EBDA, VGA hole, BIOS area); MP table at 0xf_0000
//! 0x0010_0000  RAM: kernel, then initrd at the top of low RAM
//! 0xc000_0000  PCI MMIO window up to the IOAPIC at 0xfec0_0000
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

pub const GDT_START: u64 = 0x500;
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MEMMAP_START: u64 = 0x6040;
pub const PVH_MODLIST_START: u64 = 0x6800;
pub const ZERO_PAGE_START: u64 = 0x7000;
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
pub const CMDLINE_START: u64 = 0x20000;
/// x86 Linux's COMMAND_LINE_SIZE.
pub const CMDLINE_MAX: usize = 2048;
pub const EBDA_START: u64 = 0x9fc00;
pub const MPTABLE_START: u64 = 0xf0000;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
pub const PCI_MMIO_START: u64 = 0xc000_0000;
pub const PCI_MMIO_SIZE: u64 = 0xfec0_0000 - PCI_MMIO_START;
pub const PCI_IO_START: u64 = 0xc000;
pub const PCI_IO_SIZE: u64 = 0x1_0000 - PCI_IO_START;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;

pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

/// The guest RAM regions for `mem` bytes: below the PCI hole, then above 4 GiB.
pub fn ram_regions(mem: u64) -> Vec<(u64, u64)> {
    let low = mem.min(MMIO_HOLE_START);
    let mut r = vec![(0, low)];
    if mem > low {
        r.push((HIGH_RAM_START, mem - low));
    }
    r
}

/// The e820 map the guest is given: (address, size, type).
pub fn e820(mem: u64) -> Vec<(u64, u64, u32)> {
    let regions = ram_regions(mem);
    let low_end = regions[0].1;
    let mut m = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    if let Some(&(start, size)) = regions.get(1) {
        m.push((start, size, E820_RAM));
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_splits_around_the_pci_hole() {
        assert_eq!(ram_regions(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(
            ram_regions(4 << 30),
            vec![(0, 3 << 30), (HIGH_RAM_START, 1 << 30)]
        );
        let m = e820(4 << 30);
        assert_eq!(m.len(), 4);
        assert_eq!(m[2], (HIMEM_START, (3 << 30) - HIMEM_START, E820_RAM));
        assert_eq!(m[3], (HIGH_RAM_START, 1 << 30, E820_RAM));
        let total: u64 = m.iter().filter(|e| e.2 == E820_RAM).map(|e| e.1).sum();
        assert_eq!(total, (4 << 30) - (HIMEM_START - EBDA_START));
    }
}
