//! Loading Linux: an ELF `vmlinux` through its PVH entry (32-bit protected mode, no paging,
//! `hvm_start_info` in EBX) or the 64-bit boot protocol (bzImage, or an ELF without the PVH
//! note), with the initrd at the top of low RAM and the command line below 1 MiB.

use crate::layout::*;
use crate::lazy_kernel::{self, Lazy, Recorder};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{elf::PvhBootCapability, BzImage, Elf, KernelLoader as _};
use std::path::Path;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off, EBX = start_info.
    Pvh,
    /// 64-bit boot protocol: long mode, identity-mapped, RSI = zero page.
    Linux64,
}

#[derive(Debug, Clone, Copy)]
pub struct Entry {
    pub mode: EntryMode,
    pub rip: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("-kernel: cannot open {0}: {1}")]
    OpenKernel(String, std::io::Error),
    #[error("-kernel: {0} is neither an x86-64 ELF vmlinux nor a bzImage ({1})")]
    BadKernel(String, String),
    #[error("-m: {ram} MiB is too little for -kernel {0}, which needs guest RAM up to {need} MiB", ram = .1 >> 20, need = .2.div_ceil(1 << 20))]
    TooLittleRam(String, u64, u64),
    #[error("-kernel: cannot read {0}: {1}")]
    ReadKernel(String, std::io::Error),
    #[error("-kernel: cannot start a thread to load the kernel and initramfs: {0}")]
    LoaderThread(std::io::Error),
    #[error("-initrd: cannot read {0}: {1}")]
    ReadInitrd(String, std::io::Error),
    #[error("-initrd: {0} ({1} MiB) does not fit in guest RAM above the kernel; raise -m")]
    InitrdTooBig(String, u64),
    #[error("-append: the command line is {0} bytes, Linux takes at most {max}", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(String),
}

fn mem_err(e: impl std::fmt::Display) -> BootError {
    BootError::Memory(e.to_string())
}

/// The thread that fills in the kernel's pages while the guest runs (see
/// [`crate::lazy_kernel`]); joined when dropped, if it ends within [`KernelLoader::WAIT`].
#[derive(Debug)]
pub struct KernelLoader {
    thread: Option<std::thread::JoinHandle<()>>,
    /// Set when dropped: the thread stops between chunks (the VM is going away).
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wait: std::time::Duration,
}

impl KernelLoader {
    /// How long a drop waits for the thread. Its work takes milliseconds; a read of the
    /// kernel file that never returns (a hung network file system) must not hold up nicvm's
    /// exit, so past this the thread is left to end with the process. Nothing of the VM's is
    /// in its hands: it copies from its own buffer, and a copy into guest RAM that is gone
    /// fails (the kernel checks the registered mapping), it does not land elsewhere.
    pub const WAIT: std::time::Duration = std::time::Duration::from_secs(5);

    fn new(
        thread: Option<std::thread::JoinHandle<()>>,
        cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) -> KernelLoader {
        KernelLoader {
            thread,
            cancel,
            wait: Self::WAIT,
        }
    }
}

impl Drop for KernelLoader {
    fn drop(&mut self) {
        let Some(t) = self.thread.take() else {
            return;
        };
        self.cancel
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let until = std::time::Instant::now() + self.wait;
        while !t.is_finished() {
            if std::time::Instant::now() >= until {
                log::warn!(
                    "the kernel loader is still reading -kernel or -initrd after {:?}; not waiting for it",
                    self.wait
                );
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let _ = t.join();
    }
}

/// How the kernel's pages are filled in after [`load`] returns: `failed` is told when the
/// file cannot be read to the end, `done` when every page is there.
pub struct Later {
    pub failed: Box<dyn FnOnce(String) + Send>,
    pub done: Box<dyn FnOnce() + Send>,
}

/// Loads kernel, initrd and command line; writes the boot structures for the entry it found.
/// The kernel's and the initramfs's pages may still be filled in after this returns (see
/// [`KernelLoader`]).
pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    later: Later,
) -> Result<(Entry, KernelLoader), BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let low_end = mem_bytes.min(MMIO_HOLE_START);
    let (entry, kernel_end, header, kernel_lazy) = load_kernel(mem, kernel)?;
    let mut lazies: Vec<Lazy> = kernel_lazy.into_iter().collect();
    let ramdisk = match initrd {
        Some(p) => {
            let (addr, size, lazy) = load_initrd(mem, p, low_end, kernel_end)?;
            lazies.extend(lazy);
            Some((addr, size))
        }
        None => None,
    };

    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE_START))
        .map_err(mem_err)?;

    let map = e820(mem_bytes);
    match entry.mode {
        EntryMode::Pvh => write_pvh_info(mem, &map, ramdisk)?,
        EntryMode::Linux64 => write_zero_page(mem, &map, ramdisk, header, cmd.len())?,
    }
    let cancel = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if lazies.is_empty() {
        (later.done)();
        return Ok((entry, KernelLoader::new(None, cancel)));
    }
    let stop = cancel.clone();
    let t = std::thread::Builder::new()
        .name("kernel-loader".into())
        .spawn(move || lazy_kernel::run_all(lazies, &stop, later.done, later.failed));
    match t {
        Ok(t) => Ok((entry, KernelLoader::new(Some(t), cancel))),
        // No thread (the userfaultfds went with the closure: their pages are plain memory
        // again): the VM does not start.
        Err(e) => Err(BootError::LoaderThread(e)),
    }
}

/// Loads an ELF vmlinux (at its PVH entry when it has one) or a bzImage: the entry, where the
/// kernel ends in guest memory, a bzImage's setup header, and what is left to fill in the
/// kernel's pages, unless they were read at once.
fn load_kernel(
    mem: &GuestMemoryMmap,
    kernel: &Path,
) -> Result<(Entry, u64, Option<setup_header>, Option<Lazy>), BootError> {
    let kname = kernel.display().to_string();
    let f =
        crate::open::regular_file(kernel).map_err(|e| BootError::OpenKernel(kname.clone(), e))?;
    let mut f = Recorder::new(f, mem).map_err(|e| BootError::OpenKernel(kname.clone(), e))?;
    let (entry, kernel_end, header) = parse_kernel(mem, &mut f, kernel)?;
    let pieces = std::mem::take(&mut f.pieces);
    // What is read into RAM ends there at the earliest (an ELF segment may carry more file
    // than memory): the initramfs goes above both.
    let kernel_end = kernel_end.max(lazy_kernel::guest_end(mem, &pieces));
    let file = f.into_file();
    let first = mem
        .get_host_address(GuestAddress(entry.rip))
        .map_or(0, |p| p as usize);
    // Only the kernel goes at HIMEM_START and above (the boot data and the MP table are below
    // it, the initramfs above the kernel's end).
    let himem = GuestAddress(HIMEM_START);
    lazy_kernel::check_holds(&file, &pieces)
        .map_err(|e| BootError::ReadKernel(kname.clone(), e))?;
    let lazy = match Lazy::new("-kernel", file, kname.clone(), pieces, first, mem, himem) {
        Ok(lazy) => Some(lazy),
        Err((file, pieces, e)) => {
            log::debug!("kernel read at once ({e})");
            lazy_kernel::load_now(mem, &file, &pieces)
                .map_err(|e| BootError::ReadKernel(kname, e))?;
            None
        }
    };
    Ok((entry, kernel_end, header, lazy))
}

/// Runs the ELF or bzImage loader over `f`.
fn parse_kernel(
    mem: &GuestMemoryMmap,
    f: &mut Recorder,
    kernel: &Path,
) -> Result<(Entry, u64, Option<setup_header>), BootError> {
    let kname = kernel.display().to_string();
    let himem = Some(GuestAddress(HIMEM_START));
    let too_little = |kname: String, e: String| {
        let ram = mem.iter().map(|r| r.len()).sum::<u64>();
        match crate::open::regular_file(kernel)
            .ok()
            .and_then(|mut k| kernel_extent(&mut k))
        {
            Some(end) if end > mem.last_addr().raw_value().saturating_add(1) => {
                BootError::TooLittleRam(kname, ram, end)
            }
            _ => BootError::BadKernel(kname, e),
        }
    };
    Ok(match Elf::load(mem, None, f, himem) {
        Ok(r) => {
            // Its zero-filled tails (BSS) too: they lie past what the file fills in.
            if r.kernel_end > mem.last_addr().raw_value().saturating_add(1) {
                let ram = mem.iter().map(|r| r.len()).sum::<u64>();
                return Err(BootError::TooLittleRam(kname, ram, r.kernel_end));
            }
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => Entry {
                    mode: EntryMode::Pvh,
                    rip: a.raw_value(),
                },
                _ => Entry {
                    mode: EntryMode::Linux64,
                    rip: r.kernel_load.raw_value(),
                },
            };
            (entry, r.kernel_end, None)
        }
        Err(linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )) => {
            let r = BzImage::load(mem, None, f, himem)
                .map_err(|e| too_little(kname.clone(), e.to_string()))?;
            // The decompressor unpacks the kernel at its preferred address (or where it was
            // loaded, if higher) and needs init_size bytes there (boot protocol 2.10 on):
            // that RAM must exist, and the initramfs must stay above it, not be unpacked over.
            let mut kernel_end = r.kernel_end;
            if let Some(h) = r.setup_header.filter(|h| h.version >= 0x020a) {
                let at = r.kernel_load.raw_value().max(h.pref_address);
                let need = at.saturating_add(u64::from(h.init_size));
                if need > mem.last_addr().raw_value().saturating_add(1) {
                    let ram = mem.iter().map(|r| r.len()).sum::<u64>();
                    return Err(BootError::TooLittleRam(kname, ram, need));
                }
                kernel_end = kernel_end.max(need);
            }
            let entry = Entry {
                mode: EntryMode::Linux64,
                rip: r.kernel_load.raw_value() + 0x200,
            };
            (entry, kernel_end, r.setup_header)
        }
        Err(e) => return Err(too_little(kname, e.to_string())),
    })
}

/// Where in guest-physical memory an ELF kernel's loaded segments end (the highest
/// `p_paddr + p_memsz` of its PT_LOAD headers), for a kernel the loader refused: whether it
/// was RAM that was short. None for anything else (a bzImage's extent is its loader's).
fn kernel_extent(f: &mut (impl std::io::Read + std::io::Seek)) -> Option<u64> {
    use std::io::SeekFrom;
    let mut eh = [0u8; 64];
    f.read_exact(&mut eh).ok()?;
    // 64-bit little-endian ELF.
    if eh[..4] != *b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
        return None;
    }
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(&eh, 0x20), u16_at(&eh, 0x36), u16_at(&eh, 0x38));
    if phentsize < 56 {
        return None;
    }
    let mut end = None;
    let mut ph = [0u8; 56];
    for i in 0..u64::from(phnum.min(256)) {
        f.seek(SeekFrom::Start(
            phoff.checked_add(i * u64::from(phentsize))?,
        ))
        .ok()?;
        f.read_exact(&mut ph).ok()?;
        const PT_LOAD: u32 = 1;
        if u32::from_le_bytes(ph[..4].try_into().unwrap()) == PT_LOAD {
            let seg_end = u64_at(&ph, 0x18).checked_add(u64_at(&ph, 0x28))?;
            end = end.max(Some(seg_end));
        }
    }
    end
}

/// Places the initramfs at the top of low memory, above the kernel's end: where it goes, its
/// size, and what is left to fill in its pages, unless they were read at once.
fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    low_end: u64,
    kernel_end: u64,
) -> Result<(u64, u64, Option<Lazy>), BootError> {
    let name = path.display().to_string();
    let f = crate::open::regular_file(path).map_err(|e| BootError::ReadInitrd(name.clone(), e))?;
    // A regular file (checked when opened): its size is what it holds, up to check_holds.
    let size = f
        .metadata()
        .map_err(|e| BootError::ReadInitrd(name.clone(), e))?
        .len();
    let addr = low_end.checked_sub(size).map(|a| a & !0xfff);
    let addr = match addr {
        Some(a) if a >= kernel_end.max(HIMEM_START) => a,
        _ => return Err(BootError::InitrdTooBig(name, size.div_ceil(1 << 20))),
    };
    if size == 0 {
        return Ok((addr, 0, None));
    }
    let Some(piece) = lazy_kernel::Piece::whole_file(mem, GuestAddress(addr), size) else {
        return Err(BootError::InitrdTooBig(name, size.div_ceil(1 << 20)));
    };
    lazy_kernel::check_holds(&f, &[piece]).map_err(|e| BootError::ReadInitrd(name.clone(), e))?;
    let host = piece.host();
    let himem = GuestAddress(HIMEM_START);
    match Lazy::new("-initrd", f, name.clone(), vec![piece], host, mem, himem) {
        Ok(lazy) => Ok((addr, size, Some(lazy))),
        Err((f, pieces, e)) => {
            log::debug!("initramfs read at once ({e})");
            lazy_kernel::load_now(mem, &f, &pieces).map_err(|e| BootError::ReadInitrd(name, e))?;
            Ok((addr, size, None))
        }
    }
}

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

fn write_pvh_info(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    ramdisk: Option<(u64, u64)>,
) -> Result<(), BootError> {
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr,
            size,
            type_,
            reserved: 0,
        };
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(e, GuestAddress(at)).map_err(mem_err)?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some((paddr, size)) = ramdisk {
        let m = hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        };
        mem.write_obj(m, GuestAddress(PVH_MODLIST_START))
            .map_err(mem_err)?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(mem_err)
}

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;

fn write_zero_page(
    mem: &GuestMemoryMmap,
    map: &[(u64, u64, u32)],
    ramdisk: Option<(u64, u64)>,
    header: Option<setup_header>,
    cmdline_size: usize,
) -> Result<(), BootError> {
    let mut p = boot_params::default();
    if let Some(h) = header {
        p.hdr = h;
    } else {
        p.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        p.hdr.header = KERNEL_HDR_MAGIC;
        p.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    p.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    p.hdr.cmd_line_ptr = CMDLINE_START as u32;
    p.hdr.cmdline_size = cmdline_size as u32;
    if let Some((addr, size)) = ramdisk {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = size as u32;
    }
    for (i, &(addr, size, type_)) in map.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr,
            size,
            r#type: type_,
        };
    }
    p.e820_entries = map.len() as u8;
    mem.write_obj(p, GuestAddress(ZERO_PAGE_START))
        .map_err(mem_err)?;

    // Identity-map the first GiB with 2 MiB pages for the 64-bit entry.
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))
        .map_err(mem_err)?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))
        .map_err(mem_err)?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PDE_START + i * 8))
            .map_err(mem_err)?;
    }
    Ok(())
}

#[cfg(test)]
#[path = "../../tests/support/elf.rs"]
mod elf;

#[cfg(test)]
mod tests {
    use super::elf::pvh_elf as elf;
    use super::*;
    use std::io::Write;

    /// A file in the temporary directory, removed when dropped (a failing test too).
    struct Temp(std::path::PathBuf);

    impl std::ops::Deref for Temp {
        type Target = std::path::PathBuf;
        fn deref(&self) -> &std::path::PathBuf {
            &self.0
        }
    }

    impl Drop for Temp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file(name: &str, bytes: &[u8]) -> Temp {
        let p = std::env::temp_dir().join(format!("nicvm-boot-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        Temp(p)
    }

    /// Kernel and initramfs each land where they belong (filled in by the loader thread as
    /// root), and an initramfs that would reach into the kernel is refused.
    #[test]
    fn kernel_and_initramfs_load_together() {
        let payload: Vec<u8> = (0..64 * 1024).map(|i| (i * 7) as u8).collect();
        let k = file("vmlinux", &elf(HIMEM_START, &payload, 16 << 20));
        let rd: Vec<u8> = (0..(10 << 20)).map(|i| (i / 4096) as u8 ^ 0x5a).collect();
        let r = file("initrd", &rd);
        let mem = |mib: usize| {
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
        };
        let m = mem(64);
        let (done_tx, done) = std::sync::mpsc::channel();
        let later = Later {
            failed: Box::new(|e| panic!("{e}")),
            done: Box::new(move || done_tx.send(()).unwrap()),
        };
        let (e, loader) =
            load(&m, 64 << 20, &k, Some(r.as_path()), "console=ttyS0", later).unwrap();
        assert_eq!((e.mode, e.rip), (EntryMode::Pvh, HIMEM_START));
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            assert!(
                loader.thread.is_some(),
                "as root the kernel is filled in by a thread"
            );
        }
        let mut got = vec![0u8; payload.len()];
        m.read_slice(&mut got, GuestAddress(HIMEM_START)).unwrap();
        assert_eq!(got, payload);
        let mut got = vec![0u8; rd.len()];
        m.read_slice(&mut got, GuestAddress((64 << 20) - rd.len() as u64))
            .unwrap();
        assert!(got == rd, "the initramfs at the top of low memory");
        drop(loader);
        done.try_recv().expect("the kernel's pages all filled in");
        // 24 MiB: the initramfs would start at 14 MiB, inside the kernel's 1-17 MiB.
        let m = mem(24);
        let later = Later {
            failed: Box::new(|e| panic!("{e}")),
            done: Box::new(|| {}),
        };
        let err = load(&m, 24 << 20, &k, Some(r.as_path()), "", later).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooBig(_, 10)), "{err}");
    }

    /// The initramfs too is filled in after `load` returns, by the loader thread: one cut
    /// short meanwhile (a rebuild that truncates it) stops the VM with an error naming it,
    /// and leaves nobody waiting on its pages.
    #[test]
    fn an_initramfs_cut_short_while_loading_is_reported() {
        // SAFETY: geteuid has no arguments and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            assert!(std::env::var_os("CI").is_none(), "CI runs as root");
            eprintln!("SKIPPED: lazy loading needs root (userfaultfd for KVM's faults)");
            return;
        }
        let k = file("vmlinux-cut", &elf(HIMEM_START, &[0x90; 4096], 1 << 20));
        // 1 GiB (sparse: made at once): the loader thread reads it in 256 KiB chunks after
        // the kernel, a second's work or more; the file is cut right after `load` returns
        // (a test thread that does not run for that long, on a busy host, fails the test).
        let r = file("initrd-cut", b"");
        std::fs::OpenOptions::new()
            .write(true)
            .open(r.as_path())
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1280 << 20)]).unwrap();
        let (tx, outcome) = std::sync::mpsc::channel();
        let done = tx.clone();
        let later = Later {
            failed: Box::new(move |e| tx.send(Err(e)).unwrap()),
            done: Box::new(move || done.send(Ok(())).unwrap()),
        };
        let (_, loader) = load(&m, 1280 << 20, &k, Some(r.as_path()), "", later).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(r.as_path())
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        // Its last page: zeros (filled in, or left once the loader gave up); never a hang.
        let mut tail = [1u8; 16];
        m.read_slice(&mut tail, GuestAddress((1280 << 20) - 16))
            .unwrap();
        assert_eq!(tail, [0; 16]);
        drop(loader);
        match outcome.try_recv().expect("an outcome") {
            Err(e) => {
                assert!(e.starts_with("-initrd: cannot read "), "{e}");
                assert!(e.contains("initrd-cut"), "{e}");
            }
            Ok(()) => panic!("all 1 GiB read before the cut: not loaded lazily"),
        }
    }

    /// An ELF segment with more file than memory (`p_filesz > p_memsz`): what is read into
    /// RAM, not what the loader calls the kernel's end, is what the initramfs must stay
    /// above. It was placed inside the kernel's pages, and reading it there waited for ever
    /// on pages only the loader thread (not started yet) fills in.
    #[test]
    fn an_initramfs_stays_above_all_the_kernel_file_fills_in() {
        let k = file(
            "vmlinux-long",
            &elf(HIMEM_START, &vec![0x90; 8 << 20], 4096),
        );
        let r = file("initrd-long", &vec![0x5a; 10 << 20]);
        let (k2, r2) = (k.clone(), r.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let m = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
            let later = Later {
                failed: Box::new(|_| {}),
                done: Box::new(|| {}),
            };
            // 16 MiB: the initramfs would go at 6 MiB, inside the 1-9 MiB the file fills.
            let r = load(&m, 16 << 20, &k2, Some(&r2), "", later).map(|_| ());
            tx.send(r.map_err(|e| e.to_string())).unwrap();
        });
        let r_ = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("load returned");
        let e = r_.unwrap_err();
        assert!(
            e.contains("does not fit in guest RAM above the kernel"),
            "{e}"
        );
    }

    /// A loader stuck in a read (a hung network file system) does not hold up the exit;
    /// one that ends in time is joined.
    #[test]
    fn a_stuck_kernel_loader_is_waited_for_only_so_long() {
        let (tx, stuck) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let _ = stuck.recv_timeout(std::time::Duration::from_secs(60));
        });
        let wait = std::time::Duration::from_millis(200);
        let start = std::time::Instant::now();
        drop(KernelLoader {
            thread: Some(t),
            cancel: Default::default(),
            wait,
        });
        let took = start.elapsed();
        assert!(took >= wait && took < wait * 10, "{took:?}");
        drop(tx);
        let (done_tx, done) = std::sync::mpsc::channel();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(50));
            done_tx.send(()).unwrap();
        });
        drop(KernelLoader::new(Some(t), Default::default()));
        done.try_recv().expect("joined: the thread had finished");
    }
}
