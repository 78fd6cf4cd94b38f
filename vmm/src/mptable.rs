//! The Intel MultiProcessor table (MP spec 1.4): CPUs, buses, the IOAPIC and every interrupt
//! source. Linux reads interrupt routing from it, which is far cheaper than ACPI on a host
//! that emulates guest kernel code.

use crate::layout::{IOAPIC_ADDR, LAPIC_ADDR};

const PCI_BUS: u8 = 0;
const ISA_BUS: u8 = 1;
const MP_IRQ_INT: u8 = 0;
const MP_IRQ_NMI: u8 = 1;
const MP_IRQ_EXTINT: u8 = 3;
/// Polarity active high (01), trigger level (11).
const MP_IRQ_LEVEL_HIGH: u16 = 0b1101;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

fn checksum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, &x| a.wrapping_sub(x))
}

/// Builds the floating pointer and configuration table to be placed at `addr`, for CPUs
/// with the APIC IDs `apic_ids` (the first the boot CPU; each below 255).
/// `pci_gsi(slot, pin)` gives the IOAPIC pin each PCI slot's INTx pin is wired to.
pub fn build(addr: u32, apic_ids: &[u8], pci_gsi: impl Fn(u8, u8) -> u32) -> Vec<u8> {
    // The IOAPIC's ID follows the CPUs' (distinct from every one of them).
    let ioapic_id = apic_ids.iter().max().map_or(0, |&m| m.saturating_add(1));
    let mut entries: Vec<u8> = vec![];
    let mut count = 0u16;
    let mut push = |e: &[u8]| {
        entries.extend_from_slice(e);
        count += 1;
    };
    for (i, &id) in apic_ids.iter().enumerate() {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = 1 | if i == 0 { 2 } else { 0 }; // enabled, BSP
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
        push(&e);
    }
    push(&[1, PCI_BUS, b'P', b'C', b'I', b' ', b' ', b' ']);
    push(&[1, ISA_BUS, b'I', b'S', b'A', b' ', b' ', b' ']);
    let mut io = [2, ioapic_id, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    io[4..8].copy_from_slice(&IOAPIC_ADDR.to_le_bytes());
    push(&io);
    let intsrc = |kind: u8, flags: u16, bus: u8, irq: u8, pin: u8| {
        let f = flags.to_le_bytes();
        [3, kind, f[0], f[1], bus, irq, ioapic_id, pin]
    };
    // ISA IRQs 0-15 on the same IOAPIC pins, edge/high as ISA conforms.
    for irq in 0..16 {
        push(&intsrc(MP_IRQ_INT, 0, ISA_BUS, irq, irq));
    }
    for slot in 0..32u8 {
        for pin in 0..4u8 {
            let gsi = pci_gsi(slot, pin) as u8;
            push(&intsrc(
                MP_IRQ_INT,
                MP_IRQ_LEVEL_HIGH,
                PCI_BUS,
                slot << 2 | pin,
                gsi,
            ));
        }
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, all local APICs.
    push(&[4, MP_IRQ_EXTINT, 0, 0, ISA_BUS, 0, 0xff, 0]);
    push(&[4, MP_IRQ_NMI, 0, 0, ISA_BUS, 0, 0xff, 1]);

    let table_addr = addr + 16;
    let mut table = vec![0u8; 44];
    table[0..4].copy_from_slice(b"PCMP");
    let len = (44 + entries.len()) as u16;
    table[4..6].copy_from_slice(&len.to_le_bytes());
    table[6] = 4; // spec revision 1.4
    table[8..16].copy_from_slice(b"NICVM   ");
    table[16..28].copy_from_slice(b"NICVM-PC    ");
    table[34..36].copy_from_slice(&count.to_le_bytes());
    table[36..40].copy_from_slice(&LAPIC_ADDR.to_le_bytes());
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = vec![0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = 4;
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    fp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(0xf0000, &[0, 1], |s, p| 16 + (s as u32 + p as u32) % 8);
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xf0010);
        let table = &t[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, &x| a.wrapping_add(x)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 2 + 2 + 1 + 16 + 128 + 2);
        // The PCI entry for slot 3 INTA goes to pin 19, level/high.
        let e = table[44 + 40..]
            .chunks(8)
            .find(|e| e[0] == 3 && e[4] == PCI_BUS && e[5] == 3 << 2)
            .unwrap();
        assert_eq!(
            (e[7], u16::from_le_bytes([e[2], e[3]])),
            (19, MP_IRQ_LEVEL_HIGH)
        );
    }

    /// Sparse APIC IDs (two sockets of three cores): each CPU entry has its own, the first is
    /// the boot CPU, and the IOAPIC takes the ID after the last.
    #[test]
    fn cpus_by_their_apic_ids() {
        let t = build(0xf0000, &[0, 1, 2, 4, 5, 6], |_, _| 16);
        let entries = &t[16 + 44..];
        let cpus: Vec<(u8, u8)> = entries[..6 * 20]
            .chunks(20)
            .map(|e| {
                assert_eq!(e[0], 0, "a processor entry");
                (e[1], e[3])
            })
            .collect();
        assert_eq!(cpus, [(0, 3), (1, 1), (2, 1), (4, 1), (5, 1), (6, 1)]);
        let ioapic = &entries[6 * 20 + 16..6 * 20 + 24];
        assert_eq!((ioapic[0], ioapic[1]), (2, 7));
    }
}
