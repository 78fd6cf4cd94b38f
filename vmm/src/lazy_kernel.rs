//! The kernel image and the initramfs loaded while the guest already runs.
//!
//! Copying a vmlinux into fresh guest RAM is most of what stands between nicvm's start and
//! the guest's first instruction (10 MiB of pages touched for the first time: 7-10 ms on our
//! hosts), and reading the initramfs the next biggest part (2 MiB: 1-5 ms). Instead, the
//! kernel's loader is run against a [`Recorder`] that notes where each piece of the file
//! belongs in guest RAM without reading it, and the initramfs is one piece at the top of low
//! RAM; those pages are registered with a userfaultfd, the vCPUs start, and a loader thread
//! fills them in (the kernel's entry point first, then in order, the initramfs after the
//! kernel, and any page a vCPU or nicvm itself touches first as soon as its image's turn
//! comes): a thread that touches a page not yet there waits for it in the kernel.
//!
//! Nothing can be left waiting for ever: the loader thread owns the userfaultfds, and closing
//! one (when the thread ends, however it ends) turns every page not yet filled into ordinary
//! memory and wakes whoever waits. A file that cannot be read to the end stops the VM with
//! an error naming it.
//!
//! Without userfaultfd (a kernel without it, or a user without the privilege to handle
//! faults the kernel takes on guest RAM, as KVM's are) the pieces are read at once.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, ReadVolatile,
    VolatileMemoryError, VolatileSlice,
};

/// One piece of the file and where it goes: host address in guest RAM, file offset, length.
/// Only a [`Recorder`] and [`Piece::whole_file`] make them; [`Lazy::new`] and [`load_now`]
/// check them against the guest memory they are given before they write anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    host: usize,
    offset: u64,
    len: usize,
}

impl Piece {
    /// A whole file of `len` bytes at guest address `at`, if that lies in one region of `mem`.
    pub fn whole_file(mem: &GuestMemoryMmap, at: GuestAddress, len: u64) -> Option<Piece> {
        let host = mem.get_host_address(at).ok()? as usize;
        let len = usize::try_from(len).ok()?;
        region_of(mem, host, len)?;
        Some(Piece {
            host,
            offset: 0,
            len,
        })
    }

    /// Where in the host the piece goes.
    pub fn host(&self) -> usize {
        self.host
    }
}

/// How much larger than the pieces together the range they span may be (the gaps between an
/// ELF's segments): more, and the kernel is read at once rather than its gaps filled in.
const MAX_GAPS: usize = 32 << 20;

/// The host address ranges of `mem`'s regions.
fn host_ranges(mem: &GuestMemoryMmap) -> Vec<Range<usize>> {
    mem.iter()
        .filter_map(|r| {
            let start = r.as_ptr() as usize;
            Some(start..start.checked_add(r.len() as usize)?)
        })
        .collect()
}

/// The one of `ranges` holding `at..at + len`, if one does.
fn holding(ranges: &[Range<usize>], at: usize, len: usize) -> Option<Range<usize>> {
    let end = at.checked_add(len)?;
    ranges
        .iter()
        .find(|r| r.start <= at && end <= r.end)
        .cloned()
}

/// The host address range of `mem`'s region holding `at..at + len`, if one does.
fn region_of(mem: &GuestMemoryMmap, at: usize, len: usize) -> Option<Range<usize>> {
    holding(&host_ranges(mem), at, len)
}

/// A reader for linux-loader over the kernel file: reads meant for guest RAM are recorded as
/// [`Piece`]s, not done; the loader's own reads of headers and notes are real.
pub struct Recorder {
    file: File,
    size: u64,
    pos: u64,
    guest: Vec<Range<usize>>,
    pub pieces: Vec<Piece>,
}

impl Recorder {
    /// A recorder of reads into `mem`'s regions.
    pub fn new(file: File, mem: &GuestMemoryMmap) -> io::Result<Recorder> {
        let guest = host_ranges(mem);
        let size = file.metadata()?.len();
        Ok(Recorder {
            file,
            size,
            pos: 0,
            guest,
            pieces: vec![],
        })
    }

    pub fn into_file(self) -> File {
        self.file
    }
}

impl Read for Recorder {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Recorder {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let at = match to {
            SeekFrom::Start(a) => Some(a),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
        };
        self.pos = at.ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        Ok(self.pos)
    }
}

impl ReadVolatile for Recorder {
    fn read_volatile<B: BitmapSlice>(
        &mut self,
        buf: &mut VolatileSlice<B>,
    ) -> Result<usize, VolatileMemoryError> {
        let host = buf.ptr_guard_mut().as_ptr() as usize;
        let len = buf.len();
        if holding(&self.guest, host, len).is_none() {
            let mut own = vec![0u8; len];
            let n = self.read(&mut own).map_err(VolatileMemoryError::IOError)?;
            buf.copy_from(&own[..n]);
            return Ok(n);
        }
        // As a read would: only what the file holds.
        let n = self.size.saturating_sub(self.pos).min(len as u64) as usize;
        if n > 0 {
            self.pieces.push(Piece {
                host,
                offset: self.pos,
                len: n,
            });
        }
        self.pos += n as u64;
        Ok(n)
    }
}

/// Bytes the loader fills in at a time (and a waiting vCPU waits for at most).
const CHUNK: usize = 256 << 10;
const PAGE: usize = 4096;

/// Fills `out` with what belongs at host addresses `at..at + out.len()`: the pieces' bytes
/// from `file`, zeros between them.
pub fn compose(file: &File, pieces: &[Piece], at: usize, out: &mut [u8]) -> io::Result<()> {
    out.fill(0);
    let end = at + out.len();
    for p in pieces {
        let (s, e) = (p.host.max(at), (p.host + p.len).min(end));
        if s >= e {
            continue;
        }
        let off = p.offset + (s - p.host) as u64;
        file.read_exact_at(&mut out[s - at..e - at], off)?;
    }
    Ok(())
}

/// The guest address just past the last byte the pieces fill in (0 for none): an ELF may say
/// its segment takes less memory than the file gives it (`p_filesz > p_memsz`), and the
/// loader's own "kernel end" then falls short of what is read into guest RAM.
pub fn guest_end(mem: &GuestMemoryMmap, pieces: &[Piece]) -> u64 {
    pieces
        .iter()
        .filter_map(|p| {
            let end = p.host.checked_add(p.len)?;
            mem.iter().find_map(|r| {
                let start = r.as_ptr() as usize;
                let fits = start <= p.host && end <= start.checked_add(r.len() as usize)?;
                fits.then(|| r.start_addr().0 + (end - start) as u64)
            })
        })
        .max()
        .unwrap_or(0)
}

/// Reads the last byte the pieces need from `file`: a file shorter than its size says (a
/// sysfs or procfs file; one cut short since) is found before the guest runs, not while it
/// is being loaded.
pub fn check_holds(file: &File, pieces: &[Piece]) -> io::Result<()> {
    let Some(end) = pieces.iter().map(|p| p.offset + p.len as u64).max() else {
        return Ok(());
    };
    if end == 0 {
        return Ok(());
    }
    let mut b = [0u8; 1];
    match file.read_at(&mut b, end - 1)? {
        1 => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the file is shorter than its size says",
        )),
    }
}

/// The page-aligned host range the pieces cover.
fn cover(pieces: &[Piece]) -> Option<Range<usize>> {
    let start = pieces.iter().map(|p| p.host).min()? & !(PAGE - 1);
    let end = pieces.iter().map(|p| p.host + p.len).max()?;
    Some(start..end.next_multiple_of(PAGE))
}

// ---- userfaultfd (linux/userfaultfd.h) ---------------------------------------------------

const UFFD_API: u64 = 0xaa;
const UFFDIO_API: libc::c_ulong = 0xc018_aa3f;
const UFFDIO_REGISTER: libc::c_ulong = 0xc020_aa00;
const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRegister {
    start: u64,
    len: u64,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg`: the event, and for a page fault its address at byte 16.
#[repr(C)]
struct UffdMsg {
    event: u8,
    _reserved: [u8; 7],
    _flags: u64,
    address: u64,
    _rest: u64,
}

fn ioctl<T>(fd: &OwnedFd, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
    // SAFETY: every request used here takes a pointer to the struct given for it, which
    // lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A userfaultfd with `range` registered for missing pages, and every page of it missing, or
/// why there is none.
fn register(range: &Range<usize>) -> io::Result<OwnedFd> {
    // SAFETY: userfaultfd takes flags only; the result is checked before use.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    ioctl(&fd, UFFDIO_API, &mut api)?;
    let mut reg = UffdioRegister {
        start: range.start as u64,
        len: (range.end - range.start) as u64,
        mode: UFFDIO_REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(&fd, UFFDIO_REGISTER, &mut reg)?;
    // A page already there would be neither filled in nor waited for: whoever touched it
    // first would read what it held. One can be there without anything written to the range:
    // a transparent huge page made for a write next to it (the MP table below 1 MiB, with a
    // bzImage loaded at 1 MiB) takes in the range's first pages, zeros. They go, now that
    // the range is registered and nothing can bring them back but the loader.
    // SAFETY: the range is guest RAM that holds nothing yet (the kernel or the initramfs is
    // loaded there); the mapping stays, only its pages are dropped.
    let r = unsafe {
        libc::madvise(
            range.start as *mut libc::c_void,
            range.end - range.start,
            libc::MADV_DONTNEED,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// An image's pieces, to be loaded by [`Lazy::run`] or [`run_all`] while the guest runs.
pub struct Lazy {
    /// The option that named the file (`-kernel`, `-initrd`), for errors.
    option: &'static str,
    file: File,
    name: String,
    pieces: Vec<Piece>,
    range: Range<usize>,
    uffd: OwnedFd,
    /// The host address of the entry point: its chunk goes first.
    first: usize,
}

/// Fills in every page of `loads`, one image after the other, then says so (`done`), or says
/// what left pages unfilled (`failed`) before they become zeros: an image's userfaultfd is
/// closed only after either (the images not reached yet: after `failed` too).
///
/// `cancel` (the VM is going away) stops it between chunks, and then neither is called.
pub fn run_all(
    loads: Vec<Lazy>,
    cancel: &AtomicBool,
    done: impl FnOnce(),
    failed: impl FnOnce(String),
) {
    for l in &loads {
        let filled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| l.fill(cancel)));
        let e = match filled {
            Ok(Ok(true)) => continue,
            Ok(Ok(false)) => return,
            Ok(Err(e)) => e,
            Err(_) => format!("{}: loading {} failed (a bug)", l.option, l.name),
        };
        failed(e);
        return;
    }
    done();
}

impl Lazy {
    /// Registers the pieces' pages for loading later; `Err` (and nothing registered) when
    /// userfaultfd cannot be had, for the caller to read them at once. The whole page-rounded
    /// range the pieces span is registered, emptied and filled in (zeros between pieces), so
    /// it must lie in one region of `mem`, at `lowest` or above (where nothing but the kernel
    /// goes), and be little more than the pieces; else `Err` too, and the pieces are read
    /// where they go, nothing else touched.
    pub fn new(
        option: &'static str,
        file: File,
        name: String,
        pieces: Vec<Piece>,
        first: usize,
        mem: &GuestMemoryMmap,
        lowest: GuestAddress,
    ) -> Result<Lazy, (File, Vec<Piece>, io::Error)> {
        let Some(range) = cover(&pieces) else {
            return Err((file, pieces, io::Error::other("nothing to load")));
        };
        let total: usize = pieces.iter().map(|p| p.len).sum();
        let floor = mem.get_host_address(lowest).ok().map(|p| p as usize);
        let fits = region_of(mem, range.start, range.end - range.start)
            .zip(floor)
            .is_some_and(|(r, f)| r.contains(&f) && f <= range.start)
            && range.end - range.start <= total.saturating_add(MAX_GAPS);
        if !fits {
            return Err((
                file,
                pieces,
                io::Error::other("the pieces are not one stretch of high RAM"),
            ));
        }
        match register(&range) {
            Ok(uffd) => Ok(Lazy {
                option,
                file,
                name,
                pieces,
                range,
                uffd,
                first,
            }),
            Err(e) => Err((file, pieces, e)),
        }
    }

    /// Fills in every page, then says so (`done`), or says what left pages unfilled
    /// (`failed`) before they become zeros: the userfaultfd is closed only after either.
    pub fn run(self, done: impl FnOnce(), failed: impl FnOnce(String)) {
        run_all(vec![self], &AtomicBool::new(false), done, failed)
    }

    /// The chunks threads wait for and the entry point's first (the latest fault ahead), the
    /// rest in order.
    /// Fills in every page (true), or stops early when `cancel` is set (false).
    fn fill(&self, cancel: &AtomicBool) -> Result<bool, String> {
        let chunks = (self.range.end - self.range.start).div_ceil(CHUNK);
        let mut done = vec![false; chunks];
        let mut bounce = vec![0u8; CHUNK];
        let chunk_of = |addr: usize| {
            (addr.checked_sub(self.range.start)? / CHUNK < chunks)
                .then(|| (addr - self.range.start) / CHUNK)
        };
        let mut wanted: Vec<usize> = chunk_of(self.first).into_iter().collect();
        let mut next = 0;
        loop {
            if cancel.load(Ordering::Relaxed) {
                return Ok(false);
            }
            self.read_faults(&chunk_of, &mut wanted);
            let c = match wanted.pop() {
                Some(c) => c,
                None => {
                    while next < chunks && done[next] {
                        next += 1;
                    }
                    if next == chunks {
                        return Ok(true);
                    }
                    next
                }
            };
            if done[c] {
                continue;
            }
            let at = self.range.start + c * CHUNK;
            let len = CHUNK.min(self.range.end - at);
            compose(&self.file, &self.pieces, at, &mut bounce[..len])
                .map_err(|e| format!("{}: cannot read {}: {e}", self.option, self.name))?;
            self.copy(at, &bounce[..len]).map_err(|e| {
                format!(
                    "{}: cannot fill guest RAM from {}: {e}",
                    self.option, self.name
                )
            })?;
            done[c] = true;
        }
    }

    /// Faults waiting on the userfaultfd: their chunks go next.
    fn read_faults(&self, chunk_of: &dyn Fn(usize) -> Option<usize>, wanted: &mut Vec<usize>) {
        let mut msg = std::mem::MaybeUninit::<UffdMsg>::uninit();
        let size = std::mem::size_of::<UffdMsg>();
        // Bounded: at most a message per waiting thread, and a few rounds of them.
        for _ in 0..64 {
            // SAFETY: reading one message into a buffer of its size.
            let n = unsafe { libc::read(self.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), size) };
            if n != size as isize {
                return;
            }
            // SAFETY: the kernel wrote a whole message.
            let m = unsafe { msg.assume_init_ref() };
            if m.event == UFFD_EVENT_PAGEFAULT {
                if let Some(c) = chunk_of(m.address as usize) {
                    wanted.push(c);
                }
            }
        }
    }

    /// Places `data` at host address `at` in the registered range, waking whoever waits on
    /// those pages.
    fn copy(&self, at: usize, data: &[u8]) -> io::Result<()> {
        let mut done = 0;
        // EAGAIN without progress is the address space changing under the copy, which
        // passes; a bound keeps it from spinning for ever if it did not.
        let mut stalls = 0;
        while done < data.len() {
            let mut c = UffdioCopy {
                dst: (at + done) as u64,
                src: data[done..].as_ptr() as u64,
                len: (data.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            match ioctl(&self.uffd, UFFDIO_COPY, &mut c) {
                Ok(()) => done = data.len(),
                // Part done (`copy` says how much), or the address space changing: go on.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    if c.copy > 0 {
                        done += c.copy as usize;
                    } else {
                        stalls += 1;
                        if stalls == 1000 {
                            return Err(e);
                        }
                    }
                }
                // A page already there: nothing but this copy brings one in (`register`
                // dropped those before) and a chunk is filled once, so something else wrote
                // into the kernel, and a vCPU may have read it: the VM stops.
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Reads the pieces into guest RAM at once (no userfaultfd); a piece outside `mem` is an
/// error and nothing of it is read.
pub fn load_now(mem: &GuestMemoryMmap, file: &File, pieces: &[Piece]) -> io::Result<()> {
    for p in pieces {
        if region_of(mem, p.host, p.len).is_none() {
            return Err(io::Error::other("a segment outside guest RAM"));
        }
        let mut done = 0;
        while done < p.len {
            // SAFETY: `host..host + len` lies in a region of `mem` (checked above), mapped
            // while `mem` lives; the kernel writes it, no reference to it is made.
            let n = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    (p.host + done) as *mut libc::c_void,
                    p.len - done,
                    (p.offset + done as u64) as libc::off_t,
                )
            };
            match n {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                n => done += n as usize,
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::mpsc;
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    /// An unnamed file holding `bytes`.
    fn file_with(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "nicvm-lazy-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f.write_all(bytes).unwrap();
        f
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 131 % 251) as u8).collect()
    }

    fn host_of(m: &GuestMemoryMmap, at: u64) -> usize {
        m.get_host_address(GuestAddress(at)).unwrap() as usize
    }

    #[test]
    fn compose_puts_pieces_in_place_and_zeros_between() {
        let f = file_with(b"0123456789abcdef");
        let pieces = [
            Piece {
                host: 1000,
                offset: 2,
                len: 4,
            },
            Piece {
                host: 1010,
                offset: 10,
                len: 6,
            },
        ];
        let mut out = [0xffu8; 12];
        compose(&f, &pieces, 1002, &mut out).unwrap();
        assert_eq!(&out, b"45\0\0\0\0\0\0abcd");
        assert_eq!(cover(&pieces), Some(0..4096));
        let short = [Piece {
            host: 0,
            offset: 14,
            len: 4,
        }];
        assert!(
            compose(&f, &short, 0, &mut [0u8; 8]).is_err(),
            "past the file's end"
        );
    }

    #[test]
    fn the_recorder_notes_reads_into_guest_ram_and_does_the_others() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let base = host_of(&m, 0);
        let data = pattern(3 * 4096);
        let mut r = Recorder::new(file_with(&data), &m).unwrap();
        let mut head = [0u8; 16];
        r.read_exact(&mut head).unwrap();
        assert_eq!(head[..], data[..16], "a header: read");
        m.read_exact_volatile_from(GuestAddress(0x2000), &mut r, 4096)
            .unwrap();
        assert_eq!(
            r.pieces,
            vec![Piece {
                host: base + 0x2000,
                offset: 16,
                len: 4096
            }]
        );
        let mut got = [1u8; 16];
        m.read_slice(&mut got, GuestAddress(0x2000)).unwrap();
        assert_eq!(got, [0u8; 16], "guest RAM untouched");
        // Into a buffer of its own (not guest RAM): read.
        let mut own = vec![0u8; 8];
        r.seek(SeekFrom::Start(100)).unwrap();
        let mut vs = VolatileSlice::from(own.as_mut_slice());
        assert_eq!(r.read_volatile(&mut vs).unwrap(), 8);
        assert_eq!(own[..], data[100..108]);
        // Past the end, as a read: what there is, then an error for the rest.
        r.seek(SeekFrom::End(-10)).unwrap();
        assert!(m
            .read_exact_volatile_from(GuestAddress(0x4000), &mut r, 4096)
            .is_err());
        assert_eq!(r.pieces.last().unwrap().len, 10);
    }

    #[test]
    fn load_now_reads_every_piece_in_place() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let data = pattern(10_000);
        let f = file_with(&data);
        let pieces = [
            Piece {
                host: host_of(&m, 0x1003),
                offset: 5,
                len: 6000,
            },
            Piece {
                host: host_of(&m, 0x9000),
                offset: 9000,
                len: 1000,
            },
        ];
        load_now(&m, &f, &pieces).unwrap();
        let mut got = vec![0u8; 6000];
        m.read_slice(&mut got, GuestAddress(0x1003)).unwrap();
        assert_eq!(got[..], data[5..6005]);
        let mut got = vec![0u8; 1000];
        m.read_slice(&mut got, GuestAddress(0x9000)).unwrap();
        assert_eq!(got[..], data[9000..]);
        let past = [Piece {
            host: host_of(&m, 0),
            offset: 9500,
            len: 1000,
        }];
        assert!(load_now(&m, &f, &past).is_err(), "the file ends first");
        let outside = [Piece {
            host: host_of(&m, 0) + (1 << 20) - 100,
            offset: 0,
            len: 1000,
        }];
        let e = load_now(&m, &f, &outside).unwrap_err();
        assert!(e.to_string().contains("outside guest RAM"), "{e}");
    }

    /// Lazy loading needs the privilege to handle KVM's faults with a userfaultfd (root, in
    /// CI); elsewhere the test says so and passes.
    fn lazy_or_skip(
        f: File,
        pieces: Vec<Piece>,
        first: usize,
        m: &GuestMemoryMmap,
    ) -> Option<Lazy> {
        match Lazy::new(
            "-kernel",
            f,
            "vmlinux".into(),
            pieces,
            first,
            m,
            GuestAddress(0x10_0000),
        ) {
            Ok(l) => Some(l),
            Err((_, _, e)) if std::env::var_os("CI").is_none() => {
                eprintln!("SKIPPED: no userfaultfd here ({e}); run as root to test lazy loading");
                None
            }
            Err((_, _, e)) => panic!("userfaultfd: {e}"),
        }
    }

    /// Runs `f` on a thread; fails the test if it takes more than 10 s (a waiter never woken).
    fn within(f: impl FnOnce() + Send + 'static) {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            f();
            tx.send(()).unwrap();
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("finished (nobody left waiting on a page)");
    }

    #[test]
    fn pages_are_filled_in_while_readers_wait_for_them() {
        within(|| {
            let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 8 << 20)]).unwrap();
            let data = pattern(3 << 20);
            // Two pieces with a gap between them, not page-aligned.
            let pieces = vec![
                Piece {
                    host: host_of(&m, 0x10_0100),
                    offset: 0,
                    len: 1 << 20,
                },
                Piece {
                    host: host_of(&m, 0x22_0000),
                    offset: 1 << 20,
                    len: (2 << 20) - 7,
                },
            ];
            let Some(lazy) = lazy_or_skip(file_with(&data), pieces, host_of(&m, 0x30_0000), &m)
            else {
                return;
            };
            let (tx, done) = mpsc::channel();
            let t = std::thread::spawn(move || {
                lazy.run(move || tx.send(()).unwrap(), |e| panic!("{e}"))
            });
            // Read the far end first: that fault is served ahead of the order.
            let mut end = vec![0u8; 64];
            m.read_slice(&mut end, GuestAddress(0x22_0000 + (2 << 20) - 7 - 64))
                .unwrap();
            assert_eq!(end[..], data[(3 << 20) - 7 - 64..(3 << 20) - 7]);
            let mut all = vec![0u8; 0x42_0000];
            m.read_slice(&mut all, GuestAddress(0)).unwrap();
            assert!(all[..0x10_0100].iter().all(|&b| b == 0));
            assert!(all[0x10_0100..0x20_0100] == data[..1 << 20]);
            assert!(all[0x20_0100..0x22_0000].iter().all(|&b| b == 0), "the gap");
            assert!(all[0x22_0000..0x42_0000 - 7] == data[1 << 20..(3 << 20) - 7]);
            t.join().unwrap();
            done.try_recv().unwrap();
        });
    }

    /// What made a bzImage crash on hardware KVM: a page of the range already in memory
    /// (there, a transparent huge page made for the MP table below 1 MiB reached into the
    /// kernel's first MiB) was skipped, and the guest ran on its zeros.
    #[test]
    fn pages_already_in_memory_are_filled_in_too() {
        within(|| {
            let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let data = pattern(1 << 20);
            // In memory before the loader: a page at the start of the range, one in the middle.
            for at in [0x10_0000u64, 0x15_0000] {
                m.write_slice(&[0xee; 4096], GuestAddress(at)).unwrap();
            }
            let pieces = vec![Piece {
                host: host_of(&m, 0x10_0000),
                offset: 0,
                len: 1 << 20,
            }];
            let Some(lazy) = lazy_or_skip(file_with(&data), pieces, host_of(&m, 0x10_0000), &m)
            else {
                return;
            };
            lazy.run(|| {}, |e| panic!("{e}"));
            let mut got = vec![0u8; 1 << 20];
            m.read_slice(&mut got, GuestAddress(0x10_0000)).unwrap();
            assert!(
                got == data,
                "the file's bytes, where pages were there before too"
            );
        });
    }

    /// The range registered, emptied and filled in is what the pieces span: pieces reaching
    /// below the kernel's place (where the MP table and boot data live), spread over two
    /// regions, or far apart are read where they go instead, and nothing around them changes.
    #[test]
    fn pieces_that_are_not_one_stretch_of_high_ram_are_read_at_once() {
        let m = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 64 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        let data = pattern(8192);
        let piece = |at: u64, offset: u64| Piece {
            host: host_of(&m, at),
            offset,
            len: 4096,
        };
        for (what, pieces) in [
            (
                "below 1 MiB",
                vec![piece(0xf_0000, 0), piece(0x10_0000, 4096)],
            ),
            (
                "two regions",
                vec![piece(0x10_0000, 0), piece(1 << 32, 4096)],
            ),
            (
                "far apart",
                vec![piece(0x10_0000, 0), piece(0x300_0000, 4096)],
            ),
        ] {
            m.write_slice(&[0xee; 16], GuestAddress(0x20_0000)).unwrap();
            let first = pieces[0].host;
            match Lazy::new(
                "-kernel",
                file_with(&data),
                "vmlinux".into(),
                pieces,
                first,
                &m,
                GuestAddress(0x10_0000),
            ) {
                Ok(_) => panic!("{what}: registered"),
                Err((f, pieces, e)) => {
                    assert!(e.to_string().contains("one stretch"), "{what}: {e}");
                    load_now(&m, &f, &pieces).unwrap();
                }
            }
            let mut got = [0u8; 16];
            m.read_slice(&mut got, GuestAddress(0x20_0000)).unwrap();
            assert_eq!(
                got, [0xee; 16],
                "{what}: memory between the pieces untouched"
            );
        }
    }

    #[test]
    fn a_file_cut_short_is_reported_and_leaves_nobody_waiting() {
        within(|| {
            let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
            let data = pattern(2 << 20);
            let f = file_with(&data);
            let pieces = vec![Piece {
                host: host_of(&m, 0x10_0000),
                offset: 0,
                len: 2 << 20,
            }];
            let cut = f.try_clone().unwrap();
            let Some(lazy) = lazy_or_skip(f, pieces, host_of(&m, 0x10_0000), &m) else {
                return;
            };
            // Rebuilt under us: the second half is gone before it was read.
            cut.set_len(1 << 20).unwrap();
            let (tx, failed) = mpsc::channel();
            let t = std::thread::spawn(move || {
                lazy.run(|| panic!("done"), move |e| tx.send(e).unwrap())
            });
            let mut tail = [1u8; 16];
            m.read_slice(&mut tail, GuestAddress(0x30_0000 - 16))
                .unwrap();
            assert_eq!(
                tail, [0u8; 16],
                "a page never filled in is zeros, not a hang"
            );
            t.join().unwrap();
            let e = failed.try_recv().unwrap();
            assert!(e.starts_with("-kernel: cannot read vmlinux"), "{e}");
        });
    }
}
