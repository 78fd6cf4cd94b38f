//! Guest buffers handed to a backend as they lie in guest memory: a frame leaves the guest
//! through `writev` without first being gathered into a buffer of ours.

use std::io::IoSlice;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Appends the pieces of guest memory `[addr, addr + len)` to `out` (more than one where the
/// range crosses regions). False, with `out` as it was, when part of the range is not guest
/// memory.
pub fn push<'m>(
    mem: &'m GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    out: &mut Vec<IoSlice<'m>>,
) -> bool {
    let before = out.len();
    for s in GuestMemoryBackend::get_slices(mem, addr, len) {
        let Ok(s) = s else {
            out.truncate(before);
            return false;
        };
        let p = s.ptr_guard();
        // SAFETY: the slice lies in a mapping of guest RAM that lives as long as `mem` (it is
        // unmapped only when the last handle to the memory goes), so the pointer is valid for
        // `len` bytes for 'm. The guest may write these bytes while the backend reads them:
        // the kernel's writev or a backend's copy then takes whichever bytes were there (the
        // frame the guest asked for, garbled by its own hand); nothing here reads them with
        // expectations a change could break.
        out.push(IoSlice::new(unsafe {
            std::slice::from_raw_parts(p.as_ptr(), p.len())
        }));
    }
    true
}

/// Bytes in `iov`.
pub fn len(iov: &[IoSlice<'_>]) -> usize {
    iov.iter().map(|s| s.len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn pieces_cross_regions_and_refuse_holes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x4000), 0x1000),
        ])
        .unwrap();
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0xffe)).unwrap();
        let mut v = Vec::new();
        assert!(push(&mem, GuestAddress(0xffe), 4, &mut v));
        assert_eq!(v.len(), 2);
        assert_eq!((&*v[0], &*v[1]), (&[1u8, 2][..], &[3u8, 4][..]));
        assert_eq!(len(&v), 4);
        // Into the hole at 0x2000: nothing added.
        assert!(!push(&mem, GuestAddress(0x1ff0), 0x20, &mut v));
        assert!(!push(&mem, GuestAddress(u64::MAX - 1), 4, &mut v));
        assert_eq!(v.len(), 2);
    }
}
