//! Guest buffers handed to a backend as they lie in guest memory: a frame leaves the guest
//! through `writev` without first being gathered into a buffer of ours.

use std::io::IoSlice;
use vm_memory::bitmap::BS;
use vm_memory::guest_memory::{GuestMemoryBackendSliceIterator, GuestMemorySliceIterator};
use vm_memory::{
    Address, ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion, GuestRegionMmap, MemoryRegionAddress, Permissions, VolatileSlice,
};

/// The region `addr` is in: the first region, where guest RAM below the PCI hole is (and
/// with it nearly every ring and buffer), looked at before vm-memory's binary search of
/// them all.
#[inline]
fn region_at(mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<&GuestRegionMmap> {
    if let Some(r) = mem.iter().next() {
        if addr.0.wrapping_sub(r.start_addr().0) < r.len() {
            return Some(r);
        }
    }
    mem.find_region(addr)
}

/// `[addr, addr + len)` as one slice of the region it lies in, or `None` when it does not
/// lie in one (across regions, partly or wholly outside guest memory).
#[inline]
fn one_region_slice(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
) -> Option<VolatileSlice<'_, BS<'_, ()>>> {
    let r = region_at(mem, addr)?;
    r.get_slice(MemoryRegionAddress(addr.0 - r.start_addr().0), len)
        .ok()
}

/// Appends the pieces of guest memory `[addr, addr + len)` to `out` (more than one where the
/// range crosses regions). False, with `out` as it was, when part of the range is not guest
/// memory.
pub fn push<'m>(
    mem: &'m GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    out: &mut Vec<IoSlice<'m>>,
) -> bool {
    // One region lookup for a range inside one region, as a frame's buffer is.
    if let Some(r) = region_at(mem, addr) {
        let off = addr.0 - r.start_addr().0;
        if (len as u64) <= r.len() - off {
            if let Ok(p) = r.get_host_address(MemoryRegionAddress(off)) {
                // SAFETY: as below: `len` bytes from `p` lie in the region's mapping.
                out.push(IoSlice::new(unsafe { std::slice::from_raw_parts(p, len) }));
                return true;
            }
        }
    }
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

/// Whether `[addr, addr + len)` is guest memory: one region lookup when the range lies in
/// one region (as a frame's buffer does), the general check otherwise.
pub fn is_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: usize) -> bool {
    if let Some(r) = region_at(mem, addr) {
        let off = addr.0 - r.start_addr().0;
        if (len as u64) <= r.len() - off {
            return true;
        }
    }
    GuestMemoryBackend::check_range(mem, addr, len)
}

/// A piece of a frame in guest memory: where it is and how long.
pub type Piece = (GuestAddress, usize);

/// Appends the bytes of `pieces` after the first `skip` to `out` (see [`push`]).
pub fn push_pieces<'m>(
    mem: &'m GuestMemoryMmap,
    pieces: &[Piece],
    mut skip: usize,
    out: &mut Vec<IoSlice<'m>>,
) -> bool {
    let before = out.len();
    for &(addr, len) in pieces {
        let s = skip.min(len);
        skip -= s;
        if s == len {
            continue;
        }
        let at = addr.checked_add(s as u64);
        if !at.is_some_and(|a| push(mem, a, len - s, out)) {
            out.truncate(before);
            return false;
        }
    }
    true
}

/// Copies the bytes of `pieces` from the `skip`th on into `out`, as many as it holds; false
/// when a piece is not guest memory or the pieces end first.
pub fn read_pieces(
    mem: &GuestMemoryMmap,
    pieces: &[Piece],
    mut skip: usize,
    out: &mut [u8],
) -> bool {
    let mut done = 0;
    for &(addr, len) in pieces {
        if done == out.len() {
            break;
        }
        let s = skip.min(len);
        skip -= s;
        let n = (len - s).min(out.len() - done);
        if n == 0 {
            continue;
        }
        let at = addr.checked_add(s as u64);
        if !at.is_some_and(|a| read(mem, a, &mut out[done..done + n])) {
            return false;
        }
        done += n;
    }
    done == out.len()
}

/// Fills `out` from guest `addr`: one region lookup when the bytes lie in one region (as a
/// frame's buffer does), vm-memory's general copy otherwise; false when part of them is
/// not guest memory. (The general copy walks an iterator of regions, which the compiler
/// inlines or not from one build to the next: from the hot paths, that cost a third of
/// the models' own work in the builds where it did not.)
#[inline]
pub fn read(mem: &GuestMemoryMmap, addr: GuestAddress, out: &mut [u8]) -> bool {
    match one_region_slice(mem, addr, out.len()) {
        Some(src) => src.read_slice(out, 0).is_ok(),
        None => mem.read_slice(out, addr).is_ok(),
    }
}

/// A descriptor ring in guest memory as one walk sees it. Reads and writes go where `mem`'s
/// would, with the same outcome; those inside the ring, when it lies in one region (as it
/// does in practice), through that region's mapping without a region lookup each.
pub struct Ring {
    base: u64,
    len: usize,
    /// The host address of `base`, when all `len` bytes lie in one region.
    host: Option<*mut u8>,
}

impl Ring {
    /// The ring of `len` bytes at `base`.
    ///
    /// # Safety
    ///
    /// The ring must not outlive the mapping of `mem` it may point into, and is used with
    /// `mem` only: a device makes one per walk from its own memory handle and drops it
    /// before the walk returns.
    pub unsafe fn new(mem: &GuestMemoryMmap, base: GuestAddress, len: usize) -> Ring {
        let host = region_at(mem, base).and_then(|r| {
            let off = base.0 - r.start_addr().0;
            if (len as u64) > r.len() - off {
                return None;
            }
            r.get_host_address(MemoryRegionAddress(off)).ok()
        });
        Ring {
            base: base.0,
            len,
            host,
        }
    }

    /// The `T` at `addr` through the mapping, when all of it is in the ring.
    fn slice<T: ByteValued>(&self, addr: GuestAddress) -> Option<VolatileSlice<'_>> {
        let p = self.host?;
        let off = addr.0.checked_sub(self.base)? as usize;
        let size = std::mem::size_of::<T>();
        if off.checked_add(size)? > self.len {
            return None;
        }
        // SAFETY: `host` maps `len` bytes of guest RAM from `base` (checked in `new`), and
        // the mapping outlives this ring (`new`'s contract); `[off, off + size)` lies within
        // those bytes (checked above). The guest may change the bytes at any time: a
        // VolatileSlice reads and writes them with volatile accesses only.
        Some(unsafe { VolatileSlice::new(p.add(off), size) })
    }

    /// `mem.read_obj(addr)`.
    pub fn read<T: ByteValued>(&self, mem: &GuestMemoryMmap, addr: GuestAddress) -> Option<T> {
        match self.slice::<T>(addr) {
            Some(s) => s.read_obj(0).ok(),
            None => mem.read_obj(addr).ok(),
        }
    }

    /// `mem.write_obj(v, addr)`: false when it is not guest memory.
    pub fn write<T: ByteValued>(&self, mem: &GuestMemoryMmap, addr: GuestAddress, v: T) -> bool {
        match self.slice::<T>(addr) {
            Some(s) => s.write_obj(v, 0).is_ok(),
            None => mem.write_obj(v, addr).is_ok(),
        }
    }
}

/// Guest memory for the virtqueues: what `GuestMemoryMmap` is, with accesses that look up
/// their region once when they lie in one (as every ring entry, descriptor and buffer does
/// in practice) instead of through vm-memory's iterator of regions. That iterator is
/// inlined or not from one build to the next, and where it was not it took a third of
/// virtio-net's own work per frame. Ranges across regions, or outside guest memory, take
/// the general path, with its outcome.
#[derive(Clone)]
pub struct GuestRam(pub GuestMemoryMmap);

impl std::ops::Deref for GuestRam {
    type Target = GuestMemoryMmap;
    fn deref(&self) -> &GuestMemoryMmap {
        &self.0
    }
}

/// The slices [`GuestRam`] hands vm-memory for an access: one, or the general iterator's.
pub enum RamSlices<'a> {
    One(Option<VolatileSlice<'a, BS<'a, ()>>>),
    Many(GuestMemoryBackendSliceIterator<'a, GuestMemoryMmap>),
}

impl<'a> Iterator for RamSlices<'a> {
    type Item = vm_memory::GuestMemoryResult<VolatileSlice<'a, BS<'a, ()>>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            RamSlices::One(s) => s.take().map(Ok),
            RamSlices::Many(it) => it.next(),
        }
    }
}

impl std::iter::FusedIterator for RamSlices<'_> {}

impl<'a> GuestMemorySliceIterator<'a, BS<'a, ()>> for RamSlices<'a> {
    /// As the trait's, without its `Peekable` and `filter_map` for the one slice (they were
    /// not always inlined).
    #[inline]
    fn stop_on_error(
        self,
    ) -> vm_memory::GuestMemoryResult<impl Iterator<Item = VolatileSlice<'a, BS<'a, ()>>>> {
        Ok(match self {
            RamSlices::One(s) => OkSlices::One(s),
            RamSlices::Many(it) => OkSlices::Many(it.stop_on_error()?),
        })
    }
}

/// [`RamSlices`] with errors after the first slice ending the walk (`stop_on_error`).
pub enum OkSlices<'a, I> {
    One(Option<VolatileSlice<'a, BS<'a, ()>>>),
    Many(I),
}

impl<'a, I: Iterator<Item = VolatileSlice<'a, BS<'a, ()>>>> Iterator for OkSlices<'a, I> {
    type Item = VolatileSlice<'a, BS<'a, ()>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        match self {
            OkSlices::One(s) => s.take(),
            OkSlices::Many(it) => it.next(),
        }
    }
}

impl GuestMemory for GuestRam {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        GuestMemoryBackend::check_range(&self.0, addr, count)
    }

    #[inline]
    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> vm_memory::GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, ()>>> {
        // An empty access takes the general path, which hands over no slice at all.
        if count > 0 {
            if let Some(s) = one_region_slice(&self.0, addr, count) {
                return Ok(RamSlices::One(Some(s)));
            }
        }
        Ok(RamSlices::Many(GuestMemoryBackend::get_slices(
            &self.0, addr, count,
        )))
    }

    fn physical_memory(&self) -> Option<&GuestMemoryMmap> {
        Some(&self.0)
    }
}

/// Hands back an emptied list of pieces with its allocation, free of the borrow its pieces
/// had, so a device can keep one list from frame to frame.
pub fn recycle<'b>(mut v: Vec<IoSlice<'_>>) -> Vec<IoSlice<'b>> {
    v.clear();
    // Empty: the closure never runs, and collecting in place keeps the allocation.
    v.into_iter().map(|_| unreachable!()).collect()
}

/// Writes `bytes` at guest `addr` with one region lookup when they lie in one region (as a
/// receive buffer does); false when part of them is not guest memory.
#[inline]
pub fn write(mem: &GuestMemoryMmap, addr: GuestAddress, bytes: &[u8]) -> bool {
    write_parts(mem, &[bytes], 0, bytes.len(), addr)
}

/// Writes bytes `from..from + len` of the concatenation of `parts` at guest `addr` (a
/// received frame's pieces: the frame, padding, FCS, each written where it goes, not first
/// gathered). False when part of it is not guest memory.
#[inline]
pub fn write_parts(
    mem: &GuestMemoryMmap,
    parts: &[&[u8]],
    mut from: usize,
    len: usize,
    addr: GuestAddress,
) -> bool {
    // One region lookup for a buffer inside one region (as a receive buffer is); a lookup
    // per part otherwise.
    let inside = one_region_slice(mem, addr, len);
    let mut at = 0;
    for p in parts {
        if at == len {
            break;
        }
        if from >= p.len() {
            from -= p.len();
            continue;
        }
        let n = (p.len() - from).min(len - at);
        let bytes = &p[from..from + n];
        let written = match &inside {
            Some(dst) => dst.write_slice(bytes, at).is_ok(),
            None => mem
                .write_slice(bytes, GuestAddress(addr.0.wrapping_add(at as u64)))
                .is_ok(),
        };
        if !written {
            return false;
        }
        at += n;
        from = 0;
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
        assert!(
            is_memory(&mem, GuestAddress(0xffe), 4),
            "across adjacent regions"
        );
        assert!(is_memory(&mem, GuestAddress(0x4000), 0x1000));
        assert!(!is_memory(&mem, GuestAddress(0x4001), 0x1000));
        assert!(!is_memory(&mem, GuestAddress(0x1ff0), 0x20));
        assert!(!is_memory(&mem, GuestAddress(u64::MAX - 1), 4));
    }

    /// Parts written from `from` on, `len` bytes: inside one region, across two adjacent
    /// ones, and refused where the range runs into a hole.
    #[test]
    fn parts_are_written_in_one_region_across_regions_and_not_into_holes() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        let parts: [&[u8]; 3] = [&[1, 2, 3], &[], &[4, 5, 6, 7]];
        let read = |at: u64, n: usize| {
            let mut v = vec![0; n];
            mem.read_slice(&mut v, GuestAddress(at)).unwrap();
            v
        };
        assert!(write_parts(&mem, &parts, 1, 5, GuestAddress(0x100)));
        assert_eq!(read(0x100, 6), [2, 3, 4, 5, 6, 0]);
        assert!(write_parts(&mem, &parts, 0, 7, GuestAddress(0xffd)));
        assert_eq!(read(0xffd, 7), [1, 2, 3, 4, 5, 6, 7]);
        // More asked for than the parts hold: what they hold.
        assert!(write_parts(&mem, &parts, 5, 10, GuestAddress(0x200)));
        assert_eq!(read(0x200, 3), [6, 7, 0]);
        assert!(!write_parts(&mem, &parts, 0, 7, GuestAddress(0x1ffd)));
        assert!(!write_parts(&mem, &parts, 0, 7, GuestAddress(u64::MAX - 2)));
    }

    #[test]
    fn guest_ram_reads_and_writes_as_memory_does() {
        use std::sync::atomic::Ordering::SeqCst;
        // Two regions back to back, then a hole, then a third.
        let ranges = [
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
            (GuestAddress(0x3000), 0x1000),
        ];
        let plain = GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        let ram = GuestRam(GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap());
        let data: Vec<u8> = (0..64u8).collect();
        // Inside one region, across two, into the hole, past the end, wrapping round.
        // Scalars too: misaligned (an atomic access fails there, in both), and across the
        // boundary of two regions.
        for at in [
            0x10,
            0x11,
            0xfe0,
            0xffe,
            0xfff,
            0x1ff0,
            0x1fff,
            0x2ff0,
            0x3fe0,
            0x3ff8,
            u64::MAX - 8,
        ] {
            for n in [0, 1, 4, 8, 64] {
                let (a, b) = (
                    plain.write_slice(&data[..n], GuestAddress(at)),
                    ram.write_slice(&data[..n], GuestAddress(at)),
                );
                assert_eq!(a.is_ok(), b.is_ok(), "write {n} at {at:#x}");
                let (mut x, mut y) = (vec![0u8; n], vec![0u8; n]);
                let (a, b) = (
                    plain.read_slice(&mut x, GuestAddress(at)),
                    ram.read_slice(&mut y, GuestAddress(at)),
                );
                assert_eq!(a.is_ok(), b.is_ok(), "read {n} at {at:#x}");
                assert_eq!(x, y, "read {n} at {at:#x}");
                assert_eq!(
                    GuestMemory::check_range(&plain, GuestAddress(at), n, Permissions::Read),
                    GuestMemory::check_range(&ram, GuestAddress(at), n, Permissions::Read),
                );
            }
            let (a, b) = (
                plain.store(0x1234u16, GuestAddress(at), SeqCst),
                ram.store(0x1234u16, GuestAddress(at), SeqCst),
            );
            assert_eq!(a.is_ok(), b.is_ok(), "store at {at:#x}");
            let (a, b) = (
                plain.load::<u16>(GuestAddress(at), SeqCst).ok(),
                ram.load::<u16>(GuestAddress(at), SeqCst).ok(),
            );
            assert_eq!(a, b, "load at {at:#x}");
            assert_eq!(
                plain.read_obj::<u32>(GuestAddress(at)).ok(),
                ram.read_obj::<u32>(GuestAddress(at)).ok(),
                "read_obj at {at:#x}"
            );
        }
        // What goes through it lands in memory, across the two regions and in one.
        ram.write_slice(&data[..8], GuestAddress(0xffc)).unwrap();
        ram.store(0x1234u16, GuestAddress(0x800), SeqCst).unwrap();
        let mut v = [0u8; 8];
        ram.0.read_slice(&mut v, GuestAddress(0xffc)).unwrap();
        assert_eq!(v, data[..8]);
        assert_eq!(ram.0.read_obj::<u16>(GuestAddress(0x800)).unwrap(), 0x1234);
    }

    #[test]
    fn a_ring_reads_and_writes_as_memory_does() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .unwrap();
        mem.write_obj(0x1122_3344u32, GuestAddress(0x800)).unwrap();
        mem.write_obj(0x5566_7788u32, GuestAddress(0x7f0)).unwrap();
        // SAFETY: `mem` outlives both rings (locals of this test, used with `mem` only).
        let (inside, across) = unsafe {
            (
                Ring::new(&mem, GuestAddress(0x800), 0x100),
                Ring::new(&mem, GuestAddress(0xf80), 0x100),
            )
        };
        assert!(inside.host.is_some() && across.host.is_none());
        assert_eq!(
            inside.read::<u32>(&mem, GuestAddress(0x800)),
            Some(0x1122_3344)
        );
        assert!(inside.write(&mem, GuestAddress(0x8fc), 7u32));
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x8fc)).unwrap(), 7);
        // Before the ring, straddling its end, beyond memory: as `mem` would.
        assert_eq!(
            inside.read::<u32>(&mem, GuestAddress(0x7f0)),
            Some(0x5566_7788)
        );
        assert!(inside.write(&mem, GuestAddress(0x8fe), 0xabcd_ef01u32));
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x8fe)).unwrap(),
            0xabcd_ef01
        );
        assert_eq!(inside.read::<u32>(&mem, GuestAddress(0x1ffe)), None);
        assert!(!inside.write(&mem, GuestAddress(u64::MAX - 1), 1u32));
        // A ring across two regions: every access through `mem`.
        assert!(across.write(&mem, GuestAddress(0xffe), 0x0102_0304u32));
        assert_eq!(
            across.read::<u32>(&mem, GuestAddress(0xffe)),
            Some(0x0102_0304)
        );
        assert_eq!(across.read::<u32>(&mem, GuestAddress(0x2000)), None);
    }

    #[test]
    fn pieces_skip_and_read_across_pieces() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x2000)]).unwrap();
        mem.write_slice(b"abcdef", GuestAddress(0x100)).unwrap();
        mem.write_slice(b"ghij", GuestAddress(0x800)).unwrap();
        let pieces = [(GuestAddress(0x100), 6), (GuestAddress(0x800), 4)];
        let mut out = [0u8; 5];
        assert!(read_pieces(&mem, &pieces, 3, &mut out));
        assert_eq!(&out, b"defgh");
        let mut long = [0u8; 8];
        assert!(
            !read_pieces(&mem, &pieces, 3, &mut long),
            "pieces end first"
        );
        let mut v = Vec::new();
        assert!(push_pieces(&mem, &pieces, 7, &mut v));
        assert_eq!(v.len(), 1);
        assert_eq!(&*v[0], b"hij");
        let bad = [(GuestAddress(0x100), 2), (GuestAddress(0x1ffe), 4)];
        assert!(!push_pieces(&mem, &bad, 0, &mut v));
        assert!(
            read_pieces(&mem, &bad, 1, &mut [0u8; 3]),
            "only what is read must be memory"
        );
        assert!(!read_pieces(&mem, &bad, 1, &mut [0u8; 4]));
        assert_eq!(v.len(), 1, "a failed push leaves the list as it was");
        let cap = v.capacity();
        let v: Vec<IoSlice<'static>> = recycle(v);
        assert!(v.is_empty() && v.capacity() == cap);
    }
}
