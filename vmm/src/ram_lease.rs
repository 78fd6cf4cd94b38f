//! A guest restored from a snapshot runs on the file's pages: its RAM is mapped from the file
//! copy-on-write, and a page it never wrote is still the file's. Rewriting that file in place
//! (`cp` over it, a tool that opens it for writing) would change the guest's RAM under it, and
//! truncating it would take the pages away (the kernel drops even the pages copied on write
//! beyond a file's new end), which kills nicvm with SIGBUS.
//!
//! So nicvm takes a read lease on the file. When another process opens it for writing or
//! truncates it, the kernel holds that process back and tells nicvm ([`lease_signal`]); nicvm
//! stops the guest, copies its RAM into memory of its own (mapped over the old at the same
//! address, so KVM's memory slots stay as they are), lets the guest go on and the lease go.
//! Then the other process goes on. Where no lease can be had (a file system without leases,
//! a file nicvm's user does not own, one open for writing already), nothing changes.
//!
//! [`lease_signal`]: crate::signals::lease_signal

use crate::snapshot::Saver;
use devices::lifecycle::{ExitReason, Lifecycle};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// fcntl's F_SETSIG (Linux; not in the libc crate): the signal a lease break sends.
const F_SETSIG: libc::c_int = 10;

/// A read lease on a snapshot file guest RAM is mapped from.
pub struct RamLease {
    file: File,
    path: PathBuf,
}

impl RamLease {
    /// Takes a read lease on `file` (open read-only), the kernel to tell it with
    /// [`crate::signals::lease_signal`]; None where it cannot be had.
    pub fn take(file: &File, path: PathBuf) -> Option<RamLease> {
        let file = file.try_clone().ok()?;
        let fd = file.as_raw_fd();
        // SAFETY: fcntl on a descriptor we own, with integer arguments.
        let r = unsafe {
            if libc::fcntl(fd, F_SETSIG, crate::signals::lease_signal()) != 0 {
                -1
            } else {
                libc::fcntl(fd, libc::F_SETLEASE, libc::F_RDLCK)
            }
        };
        if r != 0 {
            log::debug!(
                "-incoming: no lease on {}: {}; rewriting it in place would change the \
                 restored guest's RAM",
                path.display(),
                io::Error::last_os_error()
            );
            return None;
        }
        Some(RamLease { file, path })
    }

    /// Whether the lease is being broken: someone waits to write the file.
    fn breaking(&self) -> bool {
        // SAFETY: fcntl on a descriptor we own.
        let held = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_GETLEASE) };
        held == libc::F_UNLCK
    }
}

impl Drop for RamLease {
    fn drop(&mut self) {
        // SAFETY: fcntl on a descriptor we own; closing it would let the lease go as well.
        unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_SETLEASE, libc::F_UNLCK) };
    }
}

/// What the lease's thread needs: the lease, guest RAM, what stops and holds the guest once
/// it runs, and an eventfd that ends the thread.
pub struct Watch {
    pub lease: RamLease,
    pub mem: GuestMemoryMmap,
    pub lifecycle: Arc<Lifecycle>,
    pub pthreads: Arc<Mutex<Vec<libc::pthread_t>>>,
    /// Set (to the saver, which holds the devices and the vCPU count) before the first vCPU
    /// starts; until then nothing of the guest runs and RAM is moved as it is. Held while RAM
    /// moves, so the vCPUs cannot start meanwhile.
    pub running: Arc<Mutex<Option<Arc<Saver>>>>,
    pub stop: EventFd,
}

/// The lease's thread, from the moment RAM is mapped: waits for the kernel's word that the
/// lease is breaking (or for `stop`), then moves guest RAM out of the file and lets the lease
/// go. The lease is returned if it is still held when the thread ends: the caller lets it go
/// only once nothing uses the file's pages (the vCPU and I/O threads joined). If RAM cannot
/// be moved, the VM ends with an error and the writer waits for that.
pub fn watch(w: Watch) -> Option<RamLease> {
    let signals = match lease_signalfd() {
        Ok(fd) => fd,
        Err(e) => {
            log::warn!(
                "-incoming: lease on {}: signalfd: {e}",
                w.lease.path.display()
            );
            return Some(w.lease);
        }
    };
    loop {
        // Looked at first: a break that came before this thread (or its signalfd) did.
        if w.lease.breaking() {
            break;
        }
        let mut fds = [
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: w.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: polling an array we own, with its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if n < 0 || fds[1].revents != 0 {
            return Some(w.lease);
        }
        // The signal could be left over from another of nicvm's files; the lease says.
        drain(&signals);
    }
    let t0 = std::time::Instant::now();
    match move_ram(&w) {
        Ok(Some(mib)) => {
            log::warn!(
                "-incoming: {} is being written to: guest RAM ({mib} MiB) copied out of it \
                 first ({:.0} ms, the guest stopped meanwhile)",
                w.lease.path.display(),
                t0.elapsed().as_secs_f64() * 1e3
            );
            None
        }
        Ok(None) => Some(w.lease), // the VM is ending
        Err(e) => {
            w.lifecycle.request_exit(ExitReason::Error(format!(
                "-incoming: {} is being written to, and guest RAM could not be copied out \
                 of it first: {e}",
                w.lease.path.display()
            )));
            // The lease goes after the exit's teardown: the writer waits until then.
            let mut fds = [libc::pollfd {
                fd: w.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            // SAFETY: polling an array we own, with its length, until the VM stops this
            // thread (it asked the VM to end).
            while unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) } < 0 {}
            Some(w.lease)
        }
    }
}

/// The lease's thread, started as soon as the lease is taken. Dropping it stops the thread
/// and lets the lease go: drop it once the vCPU and I/O threads are joined.
pub struct LeaseThread {
    stop: EventFd,
    running: Arc<Mutex<Option<Arc<Saver>>>>,
    thread: Option<std::thread::JoinHandle<Option<RamLease>>>,
}

impl LeaseThread {
    pub fn spawn(
        lease: RamLease,
        mem: GuestMemoryMmap,
        lifecycle: Arc<Lifecycle>,
        pthreads: Arc<Mutex<Vec<libc::pthread_t>>>,
    ) -> io::Result<LeaseThread> {
        let stop = EventFd::new(libc::EFD_CLOEXEC)?;
        let running = Arc::new(Mutex::new(None));
        let w = Watch {
            lease,
            mem,
            lifecycle,
            pthreads,
            running: running.clone(),
            stop: stop.try_clone()?,
        };
        let thread = std::thread::Builder::new()
            .name("ram-lease".into())
            .spawn(move || watch(w))?;
        Ok(LeaseThread {
            stop,
            running,
            thread: Some(thread),
        })
    }

    /// The vCPUs are about to start: from now on RAM moves with the guest stopped and the
    /// devices held (waits while RAM moves).
    pub fn guest_starts(&self, saver: Arc<Saver>) {
        *self.running.lock().unwrap() = Some(saver);
    }
}

impl Drop for LeaseThread {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            // The lease it gives back goes here.
            let _ = t.join();
        }
    }
}

/// Stops the guest (if it runs), holds every device and copies RAM over; resumes a guest
/// that ran. Before the guest runs, RAM is copied as it is (the set-up waits to start the
/// vCPUs). None if the VM ended meanwhile.
fn move_ram(w: &Watch) -> Result<Option<u64>, String> {
    let running = w.running.lock().unwrap();
    let Some(saver) = running.as_ref() else {
        return detach(&w.mem)
            .map(|bytes| Some(bytes >> 20))
            .map_err(|e| e.to_string());
    };
    // No save, `stop` or `cont` meanwhile.
    let _one_at_a_time = saver.saving.lock().unwrap();
    let was_running = !w.lifecycle.paused();
    // Also when paused: a guest that shut down (-no-shutdown) is paused before its other
    // vCPUs have parked.
    if !crate::vcpu::pause_all(&w.lifecycle, &w.pthreads, saver.shape.cpus.into())
        && w.lifecycle.exit_requested()
    {
        return Ok(None);
    }
    // A vCPU that did not park within the second is out of guest mode (kicked every
    // millisecond), in a device's emulation: it writes guest RAM only through a PCI device,
    // and those are held now.
    let moved = saver.root.with_devices_held(|| detach(&w.mem));
    if was_running {
        w.lifecycle.resume();
    }
    moved
        .map(|bytes| Some(bytes >> 20))
        .map_err(|e| e.to_string())
}

/// Puts every region of `mem` in anonymous memory of its own, at the same address, with the
/// same contents (pages of zeros are left to be made when touched); returns the bytes.
/// Nothing may write `mem` meanwhile.
pub fn detach(mem: &GuestMemoryMmap) -> io::Result<u64> {
    const PAGE: usize = 4096;
    let mut total = 0;
    for region in mem.iter() {
        let len = region.len() as usize;
        let old = region.as_ptr();
        // SAFETY: a new private anonymous mapping, no address asked for.
        let new = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if new == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let new = new.cast::<u8>();
        for off in (0..len).step_by(PAGE) {
            let n = PAGE.min(len - off);
            // SAFETY: [off, off + n) lies inside the region's live mapping, which nothing
            // writes now (the caller's promise).
            let src = unsafe { std::slice::from_raw_parts(old.add(off), n) };
            if src.iter().any(|&b| b != 0) {
                // SAFETY: the same range of the new mapping, `len` bytes long and ours alone.
                unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), new.add(off), n) };
            }
        }
        // SAFETY: moves the new mapping over the region's, the same length, at the region's
        // address: the region's pointer (and KVM's slot) stay valid, now on the new pages.
        let moved = unsafe {
            libc::mremap(
                new.cast(),
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                old.cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            // SAFETY: unmapping the new mapping, still where mmap put it.
            unsafe { libc::munmap(new.cast(), len) };
            return Err(e);
        }
        total += len as u64;
    }
    Ok(total)
}

/// SIGBUS kills nicvm when a page of guest RAM its snapshot file no longer has is touched
/// (the file cut short while nicvm could not answer its lease, stopped say, or where it has
/// none): said in one line, exit status 3, instead of the shell's "Bus error".
pub fn report_sigbus() {
    extern "C" fn on_sigbus(_: libc::c_int) {
        const MSG: &[u8] = b"\r\nnicvm: error: SIGBUS: guest RAM's snapshot file (-incoming) was \
            cut short under it, by a writer nicvm could not hold back (stopped, or no lease)\r\n";
        // SAFETY: write and _exit are async-signal-safe; MSG is a static buffer.
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(3);
        }
    }
    // SAFETY: a zeroed sigaction with a plain handler and an empty mask is valid; the handler
    // is async-signal-safe.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}

/// A signalfd for [`crate::signals::lease_signal`] (blocked in every thread since start).
fn lease_signalfd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data initialised by sigemptyset/sigaddset.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, crate::signals::lease_signal());
        // What the kernel sends instead when the realtime signal cannot be queued.
        libc::sigaddset(&mut set, libc::SIGIO);
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads every signal waiting on the signalfd (a bounded number: it is non-blocking).
fn drain(signals: &OwnedFd) {
    let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
    for _ in 0..64 {
        // SAFETY: reading into a buffer we own, of its length.
        let r = unsafe { libc::read(signals.as_raw_fd(), info.as_mut_ptr().cast(), info.len()) };
        if r <= 0 {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    /// RAM mapped from a file, then detached: the same bytes, and the file can be truncated
    /// and rewritten without RAM changing (or vanishing: that was SIGBUS).
    #[test]
    fn detached_ram_keeps_its_bytes_when_the_file_goes() {
        let path = std::env::temp_dir().join(format!("nicvm-detach-{}", std::process::id()));
        let mut f = File::create(&path).unwrap();
        let mut data = vec![0u8; 3 << 16];
        for (i, b) in data.iter_mut().enumerate().skip(4096) {
            *b = (i % 251) as u8;
        }
        f.write_all(&data).unwrap();
        drop(f);
        let file = File::open(&path).unwrap();
        let region = vm_memory::mmap::MmapRegionBuilder::new(data.len())
            .with_file_offset(vm_memory::FileOffset::new(file, 0))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![vm_memory::GuestRegionMmap::new(
            region,
            GuestAddress(0x10_0000),
        )
        .unwrap()])
        .unwrap();
        mem.write_slice(&[7; 10], GuestAddress(0x10_0000 + 0x2_0000))
            .unwrap();
        data[0x2_0000..0x2_0000 + 10].fill(7);
        assert_eq!(detach(&mem).unwrap(), data.len() as u64);
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(0).unwrap();
        f.set_len(data.len() as u64).unwrap();
        let mut back = vec![0u8; data.len()];
        mem.read_slice(&mut back, GuestAddress(0x10_0000)).unwrap();
        assert!(back == data, "RAM changed with its file");
        let _ = std::fs::remove_file(&path);
    }
}
