//! A minimal kernel image for tests that need KVM but not the guest image: an ELF64 file
//! with the PVH entry note, as a Linux vmlinux has.

/// A minimal ELF64 kernel: one PT_LOAD of `payload` at `paddr`, `memsz` bytes in memory,
/// and a PT_NOTE with the PVH entry at `paddr`.
pub fn pvh_elf(paddr: u64, payload: &[u8], memsz: u64) -> Vec<u8> {
    let (ehsize, phsize) = (64u16, 56u16);
    let off = (ehsize + 2 * phsize) as u64;
    let mut f = vec![0u8; off as usize];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little-endian
    f[6] = 1; // version
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&(ehsize as u64).to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&ehsize.to_le_bytes());
    f[54..56].copy_from_slice(&phsize.to_le_bytes());
    f[56..58].copy_from_slice(&2u16.to_le_bytes()); // phnum
    let ph = &mut f[64..120];
    ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    ph[8..16].copy_from_slice(&off.to_le_bytes());
    ph[16..24].copy_from_slice(&paddr.to_le_bytes());
    ph[24..32].copy_from_slice(&paddr.to_le_bytes());
    ph[32..40].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&memsz.to_le_bytes());
    // XEN_ELFNOTE_PHYS32_ENTRY: namesz 4, descsz 4, type 18, "Xen\0", the entry.
    let mut note = vec![];
    for w in [4u32, 4, 18] {
        note.extend_from_slice(&w.to_le_bytes());
    }
    note.extend_from_slice(b"Xen\0");
    note.extend_from_slice(&(paddr as u32).to_le_bytes());
    let note_off = off + payload.len() as u64;
    let ph = &mut f[120..176];
    ph[..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
    ph[8..16].copy_from_slice(&note_off.to_le_bytes());
    ph[32..40].copy_from_slice(&(note.len() as u64).to_le_bytes());
    ph[40..48].copy_from_slice(&(note.len() as u64).to_le_bytes());
    f.extend_from_slice(payload);
    f.extend_from_slice(&note);
    f
}
