//! Many frames to or from one fd in one system call: the writes or reads of a batch go to the
//! kernel through an io_uring, [`BATCH`] per `io_uring_enter`, where `write`/`read` would take
//! one call each. Every request carries RWF_NOWAIT, so the kernel does it at once or answers
//! EAGAIN at once: a full (or empty) fd never parks a request in the ring, and the call
//! returns with every frame answered. The writes are not linked (a link costs each write a
//! trip through the kernel's task work: measured, it took the batch's gain away): they run in
//! the order submitted, but one refused does not stop the ones after it.

use crate::vnet::VNET_HDR_LEN;
use io_uring::{opcode, types, IoUring};
use std::io::{self, IoSlice};
use std::os::fd::RawFd;

/// Requests one `io_uring_enter` carries at most.
pub(crate) const BATCH: usize = 64;

/// An io_uring with one fd registered, for frame writes to it and reads from it.
pub(crate) struct FrameRing {
    ring: IoUring,
    /// The pieces of the frames in flight: every write's `iovec`s, frame after frame.
    iovecs: Vec<libc::iovec>,
    /// Each request's result, by its place in the batch.
    results: [i32; BATCH],
    /// Where reads put a header that is not the caller's (one per read).
    headers: [[u8; VNET_HDR_LEN]; BATCH],
    /// A call failed part way: entries may be left in the submission queue, pointing at
    /// memory of that call. The ring is not used again (every call fails); dropping it
    /// discards them unsubmitted.
    broken: bool,
}

impl Drop for FrameRing {
    /// The fd goes back before the ring does: the kernel tears a ring down in the
    /// background, and a file still registered with it would keep the tap attached for a
    /// while after nicvm let go of it (another VM on the same `ifname=` would find it busy).
    fn drop(&mut self) {
        let _ = self.ring.submitter().unregister_files();
    }
}

// SAFETY: the raw pointers in `iovecs` are scratch for one `write` call, which sets them and
// has the kernel done with them before it returns; between calls nothing reads them, so the
// ring may move to another thread with them.
unsafe impl Send for FrameRing {}

impl FrameRing {
    /// A ring for writes to and reads from `fd` (which must stay open while the ring lives).
    /// Fails where the kernel has no io_uring or refuses it (a sysctl, a seccomp filter):
    /// frames then go one by one.
    pub(crate) fn new(fd: RawFd) -> io::Result<FrameRing> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(BATCH as u32)?;
        ring.submitter().register_files(&[fd])?;
        Ok(FrameRing {
            ring,
            iovecs: Vec::with_capacity(4 * BATCH),
            results: [0; BATCH],
            headers: [[0; VNET_HDR_LEN]; BATCH],
            broken: false,
        })
    }

    /// Writes the frames `ends` marks in `iov` ([`crate::NetBackend::send_batch`]'s form, the
    /// first one beginning at `start`), each with `hdr` in front when there is one, at most
    /// [`BATCH`] of them. Pieces that lie back to back in memory go as one. Each write's
    /// result goes to `out` as the kernel gave it (bytes written, or a negative errno), and
    /// how many there are is returned; an error means the ring failed (for good) and nothing
    /// in `out` is to be trusted.
    pub(crate) fn write(
        &mut self,
        hdr: Option<&[u8]>,
        iov: &[IoSlice<'_>],
        mut start: usize,
        ends: &[usize],
        out: &mut [i32; BATCH],
    ) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::other("io_uring failed before"));
        }
        let n = ends.len().min(BATCH);
        // Reserved first: the ring's entries point into this vector, which must not move.
        self.iovecs.clear();
        self.iovecs
            .reserve(iov.len() + n * (1 + hdr.is_some() as usize));
        let mut spans = [(0usize, 0usize); BATCH];
        for (span, &end) in spans.iter_mut().zip(&ends[..n]) {
            let frame = iov.get(start..end).unwrap_or(&[]);
            start = end.max(start);
            let first = self.iovecs.len();
            for s in hdr.iter().copied().chain(frame.iter().map(|s| &**s)) {
                if s.is_empty() {
                    continue;
                }
                if let Some(last) = self.iovecs[first..].last_mut() {
                    if (last.iov_base as usize).checked_add(last.iov_len)
                        == Some(s.as_ptr() as usize)
                    {
                        last.iov_len += s.len();
                        continue;
                    }
                }
                self.iovecs.push(libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                });
            }
            *span = (first, self.iovecs.len() - first);
        }
        {
            let mut sq = self.ring.submission();
            for (i, &(first, len)) in spans[..n].iter().enumerate() {
                let entry = if len == 1 {
                    let v = self.iovecs[first];
                    opcode::Write::new(types::Fixed(0), v.iov_base as *const u8, v.iov_len as u32)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build()
                } else {
                    // An empty frame is a zero-piece writev: the kernel refuses it, as it
                    // would the same writev made directly.
                    opcode::Writev::new(types::Fixed(0), self.iovecs[first..].as_ptr(), len as u32)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build()
                };
                let entry = entry.user_data(i as u64);
                // Until the batch is answered.
                self.broken = true;
                // SAFETY: the entry points at `iovecs` (not moved or changed until every write has
                // completed: `submit_and_wait` below waits for all of them) and, through it, at the
                // bytes of `hdr` and `iov`, which the caller's borrow keeps alive for this call.
                // The queue holds BATCH entries and was empty.
                unsafe { sq.push(&entry) }.map_err(|_| io::Error::other("io_uring full"))?;
            }
        }
        self.complete(n)?;
        self.broken = false;
        out[..n].copy_from_slice(&self.results[..n]);
        Ok(n)
    }

    /// Reads up to `n` frames (at most [`BATCH`]) into the slots of `slab` (`slot` bytes
    /// each, the first at 0), with `hide_hdr` a header read aside in front of each. Each
    /// read's result goes to `out` as the kernel gave it (bytes read, header included, or a
    /// negative errno), and how many there are is returned; an error means the ring failed
    /// and nothing in `out` is to be trusted.
    pub(crate) fn read(
        &mut self,
        hide_hdr: bool,
        slab: &mut [u8],
        slot: usize,
        n: usize,
        out: &mut [i32; BATCH],
    ) -> io::Result<usize> {
        if self.broken {
            return Err(io::Error::other("io_uring failed before"));
        }
        let n = n.min(BATCH).min(slab.len().checked_div(slot).unwrap_or(0));
        let base = slab.as_mut_ptr();
        // Every I/O vector is in place before the first request points at one: nothing
        // pushed afterwards can move them.
        self.iovecs.clear();
        if hide_hdr {
            for i in 0..n {
                self.iovecs.push(libc::iovec {
                    iov_base: self.headers[i].as_mut_ptr().cast(),
                    iov_len: VNET_HDR_LEN,
                });
                self.iovecs.push(libc::iovec {
                    // SAFETY: slot `i` lies inside `slab` (n slots fit, checked above).
                    iov_base: unsafe { base.add(i * slot) }.cast(),
                    iov_len: slot,
                });
            }
        }
        {
            let mut sq = self.ring.submission();
            for i in 0..n {
                let entry = if hide_hdr {
                    opcode::Readv::new(types::Fixed(0), self.iovecs[2 * i..].as_ptr(), 2)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build()
                } else {
                    // SAFETY: slot `i` lies inside `slab` (n slots fit, checked above).
                    let buf = unsafe { base.add(i * slot) };
                    opcode::Read::new(types::Fixed(0), buf, slot.min(u32::MAX as usize) as u32)
                        .rw_flags(libc::RWF_NOWAIT)
                        .build()
                }
                .user_data(i as u64);
                // Until the batch is answered.
                self.broken = true;
                // SAFETY: the entry points into `slab` (borrowed mutably by this call), at
                // `headers` and at `iovecs` (neither moved nor changed until every read has
                // completed: `complete` waits for all of them). The queue holds BATCH entries and
                // was empty.
                unsafe { sq.push(&entry) }.map_err(|_| io::Error::other("io_uring full"))?;
            }
        }
        self.complete(n)?;
        self.broken = false;
        out[..n].copy_from_slice(&self.results[..n]);
        Ok(n)
    }

    /// Submits what is queued and waits until all `n` requests have answered.
    fn complete(&mut self, n: usize) -> io::Result<()> {
        let mut done = 0;
        self.results[..n].fill(0);
        while done < n {
            match self.ring.submit_and_wait(n - done) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            for c in self.ring.completion() {
                if let Some(r) = self.results.get_mut(c.user_data() as usize) {
                    *r = c.result();
                }
                done += 1;
            }
        }
        Ok(())
    }
}
