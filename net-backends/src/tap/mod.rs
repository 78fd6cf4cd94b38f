//! Linux tap interfaces (`-netdev tap`): opened through /dev/net/tun with IFF_TAP|IFF_NO_PI and
//! IFF_VNET_HDR (12-byte header) unless `vnet_hdr=off`, so offloads pass straight through:
//! virtio-net's, and the checksums and segmentation e1000 and rtl8139 C+ hand over. A tap fd
//! handed over with a header `vnet_hdr=off` refuses has the header hidden: stripped from the
//! frames read, a zeroed one put in front of the frames written.

mod bridge;

use crate::coalesce::Coalescer;
use crate::uring::{FrameRing, BATCH};
use crate::vnet::VNET_HDR_LEN;
use crate::{recv_each, send_each, Capabilities, EventSet, NetBackend, Offloads};
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `ifr_flags` values as `struct ifreq` holds them.
const IFF_TAP: libc::c_short = libc::IFF_TAP as libc::c_short;
const IFF_NO_PI: libc::c_short = libc::IFF_NO_PI as libc::c_short;
const IFF_VNET_HDR: libc::c_short = libc::IFF_VNET_HDR as libc::c_short;

/// What a hidden header looks like on the way out: no checksum to fill in, no segmentation.
const ZERO_HDR: [u8; VNET_HDR_LEN] = [0; VNET_HDR_LEN];

/// Frames of up to this many pieces get the hidden header put in front without allocating.
const INLINE_IOVS: usize = 24;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("/dev/net/tun: {0} (is the tun module loaded?)")]
    NoTun(io::Error),
    #[error("ifname={0}: the name is longer than {max} characters", max = libc::IFNAMSIZ - 1)]
    NameTooLong(String),
    #[error("ifname={0}: busy (another program has it open)")]
    Busy(String),
    #[error("ifname={0}: not allowed to open or create it (needs CAP_NET_ADMIN, or a tap owned by this user)")]
    Permission(String),
    #[error("ifname={0}: exists and is not a tap interface")]
    NotTap(String),
    #[error("ifname={0}: {1}")]
    Other(String, io::Error),
    /// The option key (`fd` or `fds`), the descriptor, why.
    #[error("{0}={1}: not an open tap file descriptor ({2})")]
    BadFd(&'static str, RawFd, io::Error),
    #[error("fd={0}: {1}")]
    FdSetup(RawFd, io::Error),
    #[error("ifname={0}: exists without multiple queues (or is not a tap); queues= needs one made with multi_queue")]
    NotMultiQueue(String),
    #[error("ifname={0}: is a multiqueue tap; give queues=N to open it")]
    IsMultiQueue(String),
    #[error("vnet_hdr=on: this kernel's tap cannot carry a virtio-net header")]
    NoVnetHdr,
    #[error("vnet_hdr=on: the tap behind fd={0} was opened without IFF_VNET_HDR")]
    FdNoVnetHdr(RawFd),
    #[error("br={br}: {what}: {source}")]
    Bridge {
        br: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("tap {tap}: cannot {what}: {source}")]
    Setup {
        tap: String,
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "fds=: {0} is a queue of tap {1}, which has one queue (not made with IFF_MULTI_QUEUE)"
    )]
    FdNotMultiQueue(RawFd, String),
    #[error(
        "fds=: {fd} is a queue of tap {name}, {first} of tap {first_name}: give one tap's queues"
    )]
    FdOtherTap {
        fd: RawFd,
        name: String,
        first: RawFd,
        first_name: String,
    },
}

pub struct Tap {
    file: File,
    name: String,
    /// Frames cross `send`/`recv` with a virtio-net header in front (the frontend's to use).
    vnet_hdr: bool,
    /// The fd carries a header the frontend did not ask for: nicvm strips it from frames
    /// read and writes a zeroed one in front of frames sent.
    hide_hdr: bool,
    /// The interface was deleted under us (reads and writes fail with EBADFD): the link is
    /// down for good and frames sent are counted as dropped.
    gone: bool,
    /// The last write found the interface down on the host (warned once until one goes).
    down: bool,
    /// One queue of a multiqueue tap that the frontend turned off (TUNSETQUEUE detached it:
    /// the kernel steers no frames to it); it is not read meanwhile.
    detached_queue: bool,
    dropped: u64,
    /// Where batches of frames go ([`NetBackend::send_batch`], [`NetBackend::recv_batch`]).
    batch: Batch,
    /// Writes may go in batches: the tap's send buffer is the kernel's default, unlimited, so
    /// no write in a batch can find it full while a later one gets through (which would
    /// leave the earlier frame to be dropped or sent out of order). A tap someone limited
    /// (TUNSETSNDBUF, QEMU's `sndbuf=`) is written one frame at a time.
    tx_batches: bool,
    /// Merges runs of TCP segments into GSO frames ([`crate::coalesce`]).
    merge: Coalescer,
}

/// Whether the tap on `fd` has the kernel's default send buffer (`INT_MAX`: never full).
fn sndbuf_unlimited(fd: RawFd) -> bool {
    /// `_IOR('T', 211, int)`.
    const TUNGETSNDBUF: libc::c_ulong = 0x8004_54d3;
    let mut size: libc::c_int = 0;
    // SAFETY: TUNGETSNDBUF writes one int to the pointer given.
    let r = unsafe { libc::ioctl(fd, TUNGETSNDBUF, &mut size) };
    r == 0 && size == libc::c_int::MAX
}

/// How a tap sends a batch of frames.
enum Batch {
    /// Through an io_uring, made at the first batch.
    Untried,
    Ring(Box<FrameRing>),
    /// One `write` per frame: the kernel gave no io_uring, or it failed.
    Each,
}

/// A `struct ifreq` naming `name` with `flags`.
fn ifreq(name: &str, flags: libc::c_short) -> Result<libc::ifreq, TapError> {
    if name.len() >= libc::IFNAMSIZ {
        return Err(TapError::NameTooLong(name.into()));
    }
    // SAFETY: ifreq is plain data (a name and a union of integers, addresses and a pointer);
    // all zeroes is a valid value of each.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    r.ifr_ifru.ifru_flags = flags;
    Ok(r)
}

fn ifreq_name(r: &libc::ifreq) -> String {
    let bytes: Vec<u8> = r
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Whether tap `name` exists as a multiqueue one: a queue opened on it with
/// IFF_MULTI_QUEUE (and closed at once) is accepted.
fn is_multiqueue(name: &str, flags: libc::c_short) -> bool {
    let Ok(file) = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
    else {
        return false;
    };
    let Ok(mut req) = ifreq(name, flags | libc::IFF_MULTI_QUEUE as libc::c_short) else {
        return false;
    };
    // SAFETY: TUNSETIFF reads and updates the ifreq we own.
    unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) == 0 }
}

/// The tap flags (`IFF_*`) of a tun/tap fd, and its interface name; fails on anything that is
/// not one.
fn tun_get_iff(fd: RawFd) -> io::Result<(libc::c_short, String)> {
    let mut req = ifreq("", 0).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: TUNGETIFF fills the ifreq we own; a descriptor that is not a tun/tap fails.
    if unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TUNGETIFF wrote the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok((flags, ifreq_name(&req)))
}

impl Tap {
    /// Opens tap `name` (created if missing and allowed; the kernel picks `tapN` when `name` is
    /// empty). `vnet_hdr`: None = use it if the kernel can, Some(x) = insist.
    pub fn open(name: &str, vnet_hdr: Option<bool>) -> Result<Tap, TapError> {
        Tap::open_flags(name, vnet_hdr, false)
    }

    /// Opens `queues` descriptors on one tap (`-netdev tap,queues=N`): with more than one,
    /// the tap is a multiqueue one (IFF_MULTI_QUEUE) and the kernel spreads the frames it
    /// sends the guest over them by flow. Each queue is a backend of its own.
    pub fn open_queues(
        name: &str,
        vnet_hdr: Option<bool>,
        queues: usize,
    ) -> Result<Vec<Tap>, TapError> {
        if queues <= 1 {
            return Ok(vec![Tap::open(name, vnet_hdr)?]);
        }
        let first = Tap::open_flags(name, vnet_hdr, true)?;
        let mut taps = Vec::with_capacity(queues);
        let (name, vnet) = (first.name.clone(), Some(first.vnet_hdr));
        taps.push(first);
        for _ in 1..queues {
            taps.push(Tap::open_flags(&name, vnet, true)?);
        }
        Ok(taps)
    }

    /// The queues of a tap someone else opened (`fds=N:M:...`, as libvirt passes a multiqueue
    /// tap), each taken as [`Tap::from_fd`] takes one. Two or more must be queues of one
    /// multiqueue tap; on an error the descriptors already taken are closed. `key` (`fd`,
    /// `fds`) is the option that named them, for messages.
    ///
    /// # Safety
    ///
    /// As for [`Tap::from_fd`], for each descriptor; no descriptor twice.
    pub unsafe fn from_queue_fds(
        key: &'static str,
        fds: &[RawFd],
        vnet_hdr: Option<bool>,
    ) -> Result<Vec<Tap>, TapError> {
        let mut taps: Vec<Tap> = Vec::with_capacity(fds.len());
        for &fd in fds {
            if fds.len() > 1 {
                let (flags, name) = tun_get_iff(fd).map_err(|e| TapError::BadFd(key, fd, e))?;
                if flags & libc::IFF_MULTI_QUEUE as libc::c_short == 0 {
                    return Err(TapError::FdNotMultiQueue(fd, name));
                }
                if let Some(first) = taps.first().filter(|t| t.name != name) {
                    return Err(TapError::FdOtherTap {
                        fd,
                        name,
                        first: fds[0],
                        first_name: first.name.clone(),
                    });
                }
            }
            // SAFETY: the caller hands each descriptor over once (see above).
            let tap = unsafe { Tap::from_fd(fd, vnet_hdr) }.map_err(|e| match e {
                TapError::BadFd(_, fd, e) => TapError::BadFd(key, fd, e),
                e => e,
            })?;
            taps.push(tap);
        }
        Ok(taps)
    }

    fn open_flags(name: &str, vnet_hdr: Option<bool>, multi: bool) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::NoTun)?;
        let mut features: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes one unsigned int to the pointer given.
        unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNGETFEATURES, &mut features) };
        let can_vnet = features & libc::IFF_VNET_HDR as libc::c_uint != 0;
        let use_vnet = match vnet_hdr {
            Some(true) if !can_vnet => return Err(TapError::NoVnetHdr),
            Some(v) => v,
            None => can_vnet,
        };
        let mut flags = IFF_TAP | IFF_NO_PI;
        if use_vnet {
            flags |= IFF_VNET_HDR;
        }
        if multi {
            flags |= libc::IFF_MULTI_QUEUE as libc::c_short;
        }
        let mut req = ifreq(name, flags)?;
        // SAFETY: TUNSETIFF reads and updates the ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            let n = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(n),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(n),
                Some(libc::EINVAL) if multi => TapError::NotMultiQueue(n),
                Some(libc::EINVAL) if is_multiqueue(name, flags) => TapError::IsMultiQueue(n),
                Some(libc::EINVAL) => TapError::NotTap(n),
                _ => TapError::Other(n, e),
            });
        }
        let file_fd = file.as_raw_fd();
        let tap = Tap {
            file,
            name: ifreq_name(&req),
            vnet_hdr: use_vnet,
            hide_hdr: false,
            gone: false,
            down: false,
            detached_queue: false,
            dropped: 0,
            batch: Batch::Untried,
            tx_batches: sndbuf_unlimited(file_fd),
            merge: Coalescer::default(),
        };
        let fd = tap.file.as_raw_fd();
        if use_vnet {
            set_vnet_hdr_size(fd).map_err(|e| TapError::Other(tap.name.clone(), e))?;
        }
        // The offloads are the interface's, not the file's: a persistent tap keeps those
        // an earlier program (or nicvm run) set. None until the frontend asks (QEMU resets them
        // at open too).
        reset_offloads(fd, use_vnet, &tap.name)
            .map_err(|e| TapError::Other(tap.name.clone(), e))?;
        Ok(tap)
    }

    /// Adopts a tap fd opened by someone else (`fd=`). `vnet_hdr` says what the frontend
    /// wants: None = frames as the fd carries them (with a virtio-net header if it was opened
    /// with IFF_VNET_HDR), Some(true) = insist on the header, Some(false) = no header: one the
    /// fd carries is hidden (stripped on receive, a zeroed one sent in front of each frame).
    ///
    /// A descriptor that is not a tap is refused and left as it was; a tap is owned by the
    /// returned `Tap` (closed when it is dropped) from the moment it is recognised, also when
    /// a later step fails.
    ///
    /// # Safety
    ///
    /// `fd` must be an open descriptor that nothing else owns or will close: the `Tap` takes
    /// it over.
    pub unsafe fn from_fd(fd: RawFd, vnet_hdr: Option<bool>) -> Result<Tap, TapError> {
        let (flags, name) = tun_get_iff(fd).map_err(|e| TapError::BadFd("fd", fd, e))?;
        if flags & IFF_TAP == 0 {
            return Err(TapError::BadFd(
                "fd",
                fd,
                io::Error::other("a tun (layer 3) device, not a tap"),
            ));
        }
        // SAFETY: the caller hands the descriptor over to us (see above); TUNGETIFF proved it
        // is an open tap.
        let file = unsafe { File::from_raw_fd(fd) };
        let setup = |e: io::Error| TapError::FdSetup(fd, e);
        // SAFETY: F_GETFL/F_SETFL/F_SETFD on a descriptor we own, integer arguments only.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            if fl < 0 || libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
                return Err(setup(io::Error::last_os_error()));
            }
            // Scripts nicvm runs later must not hold the tap open.
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        let has_hdr = flags & IFF_VNET_HDR != 0;
        let (vnet_hdr, hide_hdr) = match vnet_hdr {
            Some(true) if !has_hdr => return Err(TapError::FdNoVnetHdr(fd)),
            Some(false) => (false, has_hdr),
            _ => (has_hdr, false),
        };
        if has_hdr {
            set_vnet_hdr_size(fd).map_err(setup)?;
        }
        // Whoever opened the tap may have enabled offloads: none until the frontend asks.
        reset_offloads(fd, vnet_hdr, &name).map_err(setup)?;
        Ok(Tap {
            file,
            name,
            vnet_hdr,
            hide_hdr,
            gone: false,
            down: false,
            detached_queue: false,
            dropped: 0,
            batch: Batch::Untried,
            tx_batches: sndbuf_unlimited(fd),
            merge: Coalescer::default(),
        })
    }

    /// Errors that mean the interface no longer exists: the fd is detached from any tap.
    /// (EIO is not one: tun refuses a write with it while the interface is down on the
    /// host, which may change; see [`Tap::write_failed`].)
    fn detached(&mut self, e: &io::Error) -> bool {
        let gone = matches!(e.raw_os_error(), Some(libc::EBADFD) | Some(libc::ENODEV));
        if gone && !self.gone {
            log::warn!(
                "tap {}: the interface is gone ({e}); link down, frames to it are dropped",
                self.name
            );
            self.gone = true;
        }
        gone
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Up to `BATCH` frames per system call through an io_uring; one by one where there
    /// is none, for a single frame, and once the interface is gone.
    fn send_frames(&mut self, iov: &[IoSlice<'_>], ends: &[usize], out: &mut Vec<io::Result<()>>) {
        let mut done = 0;
        while done < ends.len() {
            let rest = &ends[done..];
            let start = done.checked_sub(1).map_or(0, |i| ends[i]);
            if rest.len() < 2 || self.gone || !self.tx_batches || !self.has_ring() {
                if done == 0 {
                    send_each(self, iov, ends, out);
                } else {
                    // After a ring that stopped part way (rare): the rest, counted anew.
                    let rest = relative(rest, start);
                    send_each(self, &iov[start.min(iov.len())..], &rest, out);
                }
                return;
            }
            let chunk = &rest[..rest.len().min(BATCH)];
            let hdr = self.hide_hdr.then_some(&ZERO_HDR[..]);
            let Batch::Ring(ring) = &mut self.batch else {
                unreachable!("has_ring said so")
            };
            let mut results = [0i32; BATCH];
            let answered = match ring.write(hdr, iov, start, chunk, &mut results) {
                Ok(n) => n,
                Err(e) => {
                    // Whether some of these went is unknown: they go again, one by one (a frame
                    // twice rather than none; the kernel gave no reason to expect this).
                    log::warn!(
                        "tap {}: io_uring failed ({e}); frames go one by one",
                        self.name
                    );
                    self.batch = Batch::Each;
                    continue;
                }
            };
            let mut raw = &results[..answered];
            if let Some(i) = raw.iter().position(|r| *r == -libc::EOPNOTSUPP) {
                // A kernel whose tun cannot answer at once instead of waiting (no RWF_NOWAIT
                // before Linux 6.x) refuses every write so asked, making none: from here the
                // frames go one by one.
                log::debug!("tap {}: no RWF_NOWAIT; frames go one by one", self.name);
                self.batch = Batch::Each;
                raw = &raw[..i];
            }
            let n = raw.len();
            // EAGAIN: the tap is full (only with a send buffer someone limited: batches are
            // used only on taps without one, see `tx_batches`). One that frames after it got
            // past cannot be retried without reordering: dropped, as on a wire. Trailing
            // ones: the batch stops there.
            let last_sent = raw.iter().rposition(|r| *r != -libc::EAGAIN);
            for (i, &r) in raw.iter().enumerate() {
                if r == -libc::EAGAIN && last_sent.is_none_or(|l| i > l) {
                    out.push(Err(io::ErrorKind::WouldBlock.into()));
                    return;
                }
                let r = match r {
                    r if r >= 0 => {
                        self.down = false;
                        Ok(())
                    }
                    r if r == -libc::EAGAIN => {
                        log::debug!("tap {}: dropped a frame the full tap refused", self.name);
                        self.dropped += 1;
                        Ok(())
                    }
                    r => Err(io::Error::from_raw_os_error(-r)),
                };
                out.push(r.or_else(|e| self.write_failed(e)));
            }
            done += n;
        }
    }

    /// What a failed write means: a frame the kernel refuses (malformed GSO header, too
    /// large) is the guest's problem and dropped rather than stalling the queue; one refused
    /// while the interface is down on the host (EIO) is dropped, as a switch port that is
    /// down drops it, and the next ones go once someone brings it up; on a deleted
    /// interface, dropped too; anything else is the error.
    fn write_failed(&mut self, e: io::Error) -> io::Result<()> {
        if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EMSGSIZE)) {
            log::debug!("tap {}: dropped a frame: {e}", self.name);
            self.dropped += 1;
            return Ok(());
        }
        if e.raw_os_error() == Some(libc::EIO) {
            if !self.down {
                log::warn!(
                    "tap {}: the interface is down on the host; frames to it are dropped \
                     until it is up (ip link set {} up)",
                    self.name,
                    self.name
                );
                self.down = true;
            }
            self.dropped += 1;
            return Ok(());
        }
        if self.detached(&e) {
            self.dropped += 1;
            return Ok(());
        }
        Err(e)
    }

    /// Whether batches go through an io_uring (made now if not tried yet).
    fn has_ring(&mut self) -> bool {
        if let Batch::Untried = self.batch {
            self.batch = match FrameRing::new(self.file.as_raw_fd()) {
                Ok(r) => Batch::Ring(Box::new(r)),
                Err(e) => {
                    log::debug!("tap {}: no io_uring ({e}); frames go one by one", self.name);
                    Batch::Each
                }
            };
        }
        matches!(self.batch, Batch::Ring(_))
    }

    /// `writev` of `frame`, with a zeroed virtio-net header in front when the header is hidden.
    fn write_frame(&self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        let fd = self.file.as_raw_fd();
        if !self.hide_hdr {
            return writev(fd, frame);
        }
        if frame.len() < INLINE_IOVS {
            let mut iov = [IoSlice::new(&[]); INLINE_IOVS];
            let n = with_header(&ZERO_HDR, frame, &mut iov);
            writev(fd, &iov[..n])
        } else {
            let mut iov = vec![IoSlice::new(&[]); frame.len() + 1];
            let n = with_header(&ZERO_HDR, frame, &mut iov);
            writev(fd, &iov[..n])
        }
    }

    /// One `read` into `buf`; a hidden header is read aside. Ok(None) for a read without a
    /// frame after the header (the kernel never hands one out); the next read goes on.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let fd = self.file.as_raw_fd();
        if !self.hide_hdr {
            // SAFETY: reading into `buf`, within its length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            return if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(Some(n as usize))
            };
        }
        let mut hdr = [0u8; VNET_HDR_LEN];
        let mut iov = [IoSliceMut::new(&mut hdr), IoSliceMut::new(buf)];
        // SAFETY: IoSliceMut is ABI-compatible with iovec; both buffers outlive the call and
        // are written within their lengths.
        let n = unsafe { libc::readv(fd, iov.as_mut_ptr().cast(), iov.len() as libc::c_int) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(strip_header_len(n as usize))
    }
}

/// `ends` counted from `start` rather than from 0.
fn relative(ends: &[usize], start: usize) -> Vec<usize> {
    ends.iter().map(|e| e.saturating_sub(start)).collect()
}

/// Bytes of frame in a read that began with a hidden header of [`VNET_HDR_LEN`] bytes.
fn strip_header_len(read: usize) -> Option<usize> {
    read.checked_sub(VNET_HDR_LEN).filter(|n| *n > 0)
}

/// `hdr` then the pieces of `frame`, into `out` (at least `frame.len() + 1` long); returns how
/// many of `out` are used.
fn with_header<'a>(hdr: &'a [u8], frame: &[IoSlice<'a>], out: &mut [IoSlice<'a>]) -> usize {
    out[0] = IoSlice::new(hdr);
    out[1..=frame.len()].copy_from_slice(frame);
    frame.len() + 1
}

/// At most this many pieces after [`merge_adjacent`] go to the kernel merged; a frame in more
/// goes as it came.
const MERGED_IOVS: usize = 64;

/// One frame to the tap. Pieces that lie back to back in memory (consecutive guest buffers,
/// as a driver's page fragments often are) go as one: the kernel's copy pays about 20 ns for
/// every piece it is handed. A frame in one piece goes by `write`, which costs the kernel less
/// than a `writev` of one.
fn writev(fd: RawFd, iov: &[IoSlice<'_>]) -> io::Result<()> {
    let mut merged = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; MERGED_IOVS];
    let n = match merge_adjacent(iov, &mut merged) {
        // SAFETY: the one piece covers bytes of `iov`'s slices, which outlive the call.
        Some(1) => unsafe { libc::write(fd, merged[0].iov_base, merged[0].iov_len) },
        // SAFETY: every merged piece covers bytes of `iov`'s slices (pieces that were
        // adjacent in the address space, only joined), which outlive the call; the kernel
        // only reads them.
        Some(n) => unsafe { libc::writev(fd, merged.as_ptr(), n as libc::c_int) },
        // SAFETY: IoSlice is ABI-compatible with iovec; the slices outlive the call.
        None => unsafe { libc::writev(fd, iov.as_ptr().cast(), iov.len() as libc::c_int) },
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The non-empty pieces of `iov` into `out`, each joined to the one before where it begins
/// at that one's end; how many of `out` are used, or None when that would be more than
/// `out` holds (or none: the kernel then sees the frame as it came).
fn merge_adjacent(iov: &[IoSlice<'_>], out: &mut [libc::iovec]) -> Option<usize> {
    let mut n = 0usize;
    for s in iov.iter().filter(|s| !s.is_empty()) {
        if let Some(last) = n.checked_sub(1).map(|i| &mut out[i]) {
            if (last.iov_base as usize).checked_add(last.iov_len) == Some(s.as_ptr() as usize) {
                last.iov_len += s.len();
                continue;
            }
        }
        *out.get_mut(n)? = libc::iovec {
            iov_base: s.as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        };
        n += 1;
    }
    (n > 0).then_some(n)
}

fn set_vnet_hdr_size(fd: RawFd) -> io::Result<()> {
    let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
    // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer given.
    if unsafe { libc::ioctl(fd, libc::TUNSETVNETHDRSZ, &size) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_offload(fd: RawFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value.
    if unsafe { libc::ioctl(fd, libc::TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Turns the tap's offloads off. Where frames come without a header (or with it hidden) the
/// kernel must hand them over complete, so a failure is an error; with a header the frontend
/// sets what it takes later, and a failure here is only warned about (as QEMU does).
fn reset_offloads(fd: RawFd, header: bool, name: &str) -> io::Result<()> {
    match set_offload(fd, 0) {
        Err(e) if header => {
            log::warn!("tap {name}: its offloads could not be reset ({e})");
            Ok(())
        }
        r => r,
    }
}

impl NetBackend for Tap {
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            vnet_hdr: self.vnet_hdr,
            offloads: if self.vnet_hdr {
                Offloads::ALL
            } else {
                Offloads::default()
            },
        }
    }

    fn set_rx_offloads(&mut self, o: Offloads) -> io::Result<()> {
        // A tap deleted under the guest takes no settings; it was said once already.
        if !self.vnet_hdr || self.gone {
            return Ok(());
        }
        let mut flags = 0;
        if o.csum {
            flags |= libc::TUN_F_CSUM;
            if o.tso4 {
                flags |= libc::TUN_F_TSO4;
            }
            if o.tso6 {
                flags |= libc::TUN_F_TSO6;
            }
            if (o.tso4 || o.tso6) && o.tso_ecn {
                flags |= libc::TUN_F_TSO_ECN;
            }
        }
        let fd = self.file.as_raw_fd();
        if o.csum && o.ufo && set_offload(fd, flags | libc::TUN_F_UFO).is_ok() {
            return Ok(());
        }
        set_offload(fd, flags)
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        // A detached queue still takes frames (the kernel accepts them): what the guest
        // queued on a pair it is turning off goes out.
        if self.gone {
            self.dropped += 1;
            return Ok(());
        }
        match self.write_frame(frame) {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => self.write_failed(e),
            r => {
                self.down &= r.is_err();
                r
            }
        }
    }

    /// Runs of one TCP stream's segments go as one GSO frame each where the tap carries a
    /// header (see `coalesce.rs`); every frame through io_uring, up to 64 per system
    /// call, where the tap allows.
    fn send_batch(&mut self, iov: &[IoSlice<'_>], ends: &[usize], out: &mut Vec<io::Result<()>>) {
        if !self.vnet_hdr || self.hide_hdr || self.gone {
            return self.send_frames(iov, ends, out);
        }
        let mut merge = std::mem::take(&mut self.merge);
        merge.send(iov, ends, out, |iov, ends, out| {
            self.send_frames(iov, ends, out)
        });
        self.merge = merge;
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.gone || self.detached_queue {
            return Ok(None);
        }
        match self.read_frame(buf) {
            Ok(n) => Ok(n),
            Err(e) => match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(None),
                _ if self.detached(&e) => Ok(None),
                _ => Err(e),
            },
        }
    }

    /// Up to `BATCH` reads per system call through an io_uring; one by one where there is
    /// none, and for a single frame.
    fn recv_batch(
        &mut self,
        slab: &mut [u8],
        slot: usize,
        n: usize,
        frames: &mut Vec<(usize, usize)>,
    ) -> io::Result<()> {
        if self.gone || self.detached_queue {
            return Ok(());
        }
        if n < 3 || !self.has_ring() {
            return recv_each(self, slab, slot, n, frames);
        }
        let Batch::Ring(ring) = &mut self.batch else {
            unreachable!("has_ring said so")
        };
        let mut results = [0i32; BATCH];
        let answered = match ring.read(self.hide_hdr, slab, slot, n, &mut results) {
            Ok(n) => n,
            Err(e) => {
                // Nothing is left in flight: a read either ran at once (RWF_NOWAIT) or was never
                // submitted, and the ring goes with its unsubmitted entries. Frames it took are
                // lost, as on a wire; the next ones come one by one.
                log::warn!(
                    "tap {}: io_uring failed ({e}); frames come one by one",
                    self.name
                );
                self.batch = Batch::Each;
                return Ok(());
            }
        };
        let raw = &results[..answered];
        if raw.contains(&-libc::EOPNOTSUPP) {
            // No RWF_NOWAIT on this kernel's tun (see send_batch): no read was made.
            log::debug!("tap {}: no RWF_NOWAIT; frames come one by one", self.name);
            self.batch = Batch::Each;
            if raw.iter().all(|r| *r == -libc::EOPNOTSUPP) {
                return recv_each(self, slab, slot, n, frames);
            }
        }
        let first = frames.len();
        let mut failed = None;
        // A read that found nothing may be followed by one that found a frame which came
        // in meanwhile: slots with frames need not be the first ones.
        for (i, &r) in raw.iter().enumerate() {
            if r >= 0 {
                let len = if self.hide_hdr {
                    strip_header_len(r as usize)
                } else {
                    Some(r as usize)
                };
                frames.extend(len.map(|len| (i, len)));
                continue;
            }
            let e = io::Error::from_raw_os_error(-r);
            let nothing = [libc::EAGAIN, libc::EINTR, libc::EOPNOTSUPP].contains(&-r);
            if !nothing && !self.detached(&e) {
                failed.get_or_insert(e);
            }
        }
        match failed {
            Some(e) if frames.len() == first => Err(e),
            _ => Ok(()),
        }
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn watch(&self, rx: bool, tx: bool, out: &mut Vec<(RawFd, EventSet)>) {
        if !self.detached_queue {
            out.push((self.fd(), crate::interest(rx, tx)));
        }
    }

    /// tun reports an error on the fd only once the interface is deleted (the file is then
    /// detached from it; a queue the frontend detached is not watched): the tap is gone,
    /// whether or not a frame found out first.
    fn ready(&mut self, _fd: RawFd, events: EventSet) {
        if events.contains(EventSet::ERROR) && !self.detached_queue {
            self.detached(&io::Error::from_raw_os_error(libc::EBADFD));
        }
    }

    fn link_up(&self) -> bool {
        !self.gone
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }

    fn set_queue_enabled(&mut self, on: bool) -> io::Result<()> {
        if on != self.detached_queue || self.gone {
            return Ok(());
        }
        let flags = if on {
            libc::IFF_ATTACH_QUEUE
        } else {
            libc::IFF_DETACH_QUEUE
        };
        let mut req = ifreq("", flags as libc::c_short)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: TUNSETQUEUE reads the flags of the ifreq we own.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETQUEUE, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            // A tap that is not multiqueue has one queue, which stays.
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(());
            }
            return Err(e);
        }
        self.detached_queue = !on;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::IntoRawFd;
    use std::time::{Duration, Instant};

    /// A SOCK_SEQPACKET pair keeps frame boundaries as a tap does.
    fn seqpacket_pair() -> (File, File) {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: socketpair writes two descriptors into `fds`, which has room for them.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(r, 0, "socketpair: {}", io::Error::last_os_error());
        // SAFETY: both descriptors are fresh and owned by nobody else.
        unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
    }

    fn tap_over(file: File, vnet_hdr: bool, hide_hdr: bool) -> Tap {
        Tap {
            file,
            name: "test".into(),
            vnet_hdr,
            hide_hdr,
            gone: false,
            down: false,
            detached_queue: false,
            dropped: 0,
            batch: Batch::Untried,
            tx_batches: true,
            merge: Coalescer::default(),
        }
    }

    #[test]
    fn framing_helpers() {
        assert_eq!(strip_header_len(VNET_HDR_LEN + 60), Some(60));
        assert_eq!(strip_header_len(VNET_HDR_LEN), None, "a header alone");
        assert_eq!(strip_header_len(3), None, "a runt");
        let (a, b) = (IoSlice::new(b"ab"), IoSlice::new(b"cde"));
        let mut out = [IoSlice::new(&[]); 4];
        assert_eq!(with_header(&ZERO_HDR, &[a, b], &mut out), 3);
        let joined: Vec<u8> = out[..3].iter().flat_map(|s| s.iter().copied()).collect();
        assert_eq!(&joined[..VNET_HDR_LEN], &ZERO_HDR);
        assert_eq!(&joined[VNET_HDR_LEN..], b"abcde");
    }

    /// An error on the fd (tun's sign that the interface was deleted) makes the tap gone:
    /// link down, frames dropped; not on a queue the frontend detached, whose fd is not
    /// watched.
    #[test]
    fn an_error_on_the_fd_means_the_interface_is_gone() {
        let (ours, _peer) = seqpacket_pair();
        let mut tap = tap_over(ours, false, false);
        tap.detached_queue = true;
        tap.ready(tap.fd(), EventSet::ERROR);
        assert!(tap.link_up());
        tap.detached_queue = false;
        tap.ready(tap.fd(), EventSet::IN);
        assert!(tap.link_up());
        tap.ready(tap.fd(), EventSet::ERROR | EventSet::HANG_UP);
        assert!(!tap.link_up());
        tap.send(&[IoSlice::new(&[0u8; 60])]).unwrap();
        assert_eq!(tap.dropped(), 1);
    }

    #[test]
    fn a_hidden_header_is_stripped_on_receive_and_zeroed_on_send() {
        let (ours, mut peer) = seqpacket_pair();
        let mut tap = tap_over(ours, false, true);
        let caps = tap.capabilities();
        assert!(!caps.vnet_hdr, "the frontend sees no header");
        assert_eq!(caps.offloads, Offloads::default());

        tap.send(&[IoSlice::new(b"abc"), IoSlice::new(b"defg")])
            .unwrap();
        let mut got = [0u8; 256];
        let n = peer.read(&mut got).unwrap();
        assert_eq!(&got[..VNET_HDR_LEN], &ZERO_HDR, "a zeroed header in front");
        assert_eq!(&got[VNET_HDR_LEN..n], b"abcdefg");

        // More pieces than fit inline.
        let pieces: Vec<[u8; 1]> = (0..40u8).map(|i| [i]).collect();
        let iov: Vec<IoSlice> = pieces.iter().map(|p| IoSlice::new(p)).collect();
        tap.send(&iov).unwrap();
        let n = peer.read(&mut got).unwrap();
        assert_eq!(n, VNET_HDR_LEN + 40);
        assert_eq!(&got[..VNET_HDR_LEN], &ZERO_HDR);
        assert!(got[VNET_HDR_LEN..n].iter().copied().eq(0..40u8));

        // The peer's header (DATA_VALID, say) never reaches the frontend.
        let mut msg = vec![2u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        msg.extend_from_slice(b"frame-from-the-host");
        peer.write_all(&msg).unwrap();
        let mut buf = [0u8; 256];
        let n = tap.recv(&mut buf).unwrap().expect("a frame");
        assert_eq!(&buf[..n], b"frame-from-the-host");

        peer.write_all(&[1, 2, 3]).unwrap();
        assert_eq!(tap.recv(&mut buf).unwrap(), None, "a runt is no frame");
        assert_eq!(tap.recv(&mut buf).unwrap(), None, "nothing waiting");
    }

    #[test]
    fn pieces_back_to_back_in_memory_go_as_one() {
        let buf: Vec<u8> = (0..=255u8).collect();
        let other = [7u8; 4];
        let none = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let span = |v: &libc::iovec| (v.iov_base as usize - buf.as_ptr() as usize, v.iov_len);
        let mut out = [none; 4];
        // Three adjacent pieces (an empty one between) make one; a piece elsewhere stays
        // apart, and so does one that follows it but begins further on.
        let iov = [
            IoSlice::new(&buf[0..10]),
            IoSlice::new(&buf[10..10]),
            IoSlice::new(&buf[10..100]),
            IoSlice::new(&buf[100..101]),
            IoSlice::new(&other),
            IoSlice::new(&buf[120..130]),
            IoSlice::new(&buf[131..140]),
        ];
        assert_eq!(merge_adjacent(&iov, &mut out), Some(4));
        assert_eq!(span(&out[0]), (0, 101));
        assert_eq!(
            (out[1].iov_base as usize, out[1].iov_len),
            (other.as_ptr() as usize, 4)
        );
        assert_eq!(span(&out[2]), (120, 10));
        assert_eq!(span(&out[3]), (131, 9));
        // More pieces than `out` holds: the caller hands the kernel the frame as it came.
        let apart: Vec<IoSlice> = (0..5)
            .map(|i| IoSlice::new(&buf[i * 2..i * 2 + 1]))
            .collect();
        assert_eq!(merge_adjacent(&apart, &mut out), None);
        assert_eq!(merge_adjacent(&[IoSlice::new(&[])], &mut out), None);
    }

    #[test]
    fn merged_pieces_hold_the_same_bytes_in_the_same_order() {
        // Two buffers in one allocation, so that a piece joined across them is still one
        // object's bytes.
        let both: Vec<u8> = (0..8192u32).map(|i| (i * 13 + i / 4096) as u8).collect();
        let (a, b) = both.split_at(4096);
        let none = libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        };
        let mut next = crate::test_rng();
        for _ in 0..2000 {
            // Up to 80 pieces, each from either buffer, at the end of the last piece taken
            // from it or a little further on, some empty.
            let mut at = [0usize; 2];
            let mut iov = vec![];
            for _ in 0..next(80) {
                let k = next(2);
                let buf = if k == 0 { a } else { b };
                let start = (at[k] + if next(3) == 0 { next(8) } else { 0 }).min(buf.len());
                let len = next(64).min(buf.len() - start);
                iov.push(IoSlice::new(&buf[start..start + len]));
                at[k] = start + len;
            }
            let want: Vec<u8> = iov.iter().flat_map(|p| p.iter().copied()).collect();
            let mut out = [none; MERGED_IOVS];
            match merge_adjacent(&iov, &mut out) {
                Some(n) => {
                    let got: Vec<u8> = out[..n]
                        .iter()
                        // SAFETY: every merged piece covers bytes of `both`.
                        .flat_map(|v| unsafe {
                            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                        })
                        .copied()
                        .collect();
                    assert_eq!(got, want);
                    assert!(out[..n].iter().all(|v| v.iov_len > 0));
                    assert!(n <= iov.iter().filter(|p| !p.is_empty()).count());
                }
                None => assert!(
                    want.is_empty() || iov.iter().filter(|p| !p.is_empty()).count() > MERGED_IOVS
                ),
            }
        }
    }

    #[test]
    fn a_frame_in_adjacent_and_scattered_pieces_arrives_whole() {
        let (ours, mut peer) = seqpacket_pair();
        let mut tap = tap_over(ours, true, false);
        let frame: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let copy = frame.clone();
        // Back to back in `frame`, then from another buffer, then back to back again.
        let mut iov: Vec<IoSlice> = frame[..1000].chunks(100).map(IoSlice::new).collect();
        iov.push(IoSlice::new(&copy[1000..2000]));
        iov.extend(frame[2000..].chunks(10).map(IoSlice::new));
        // 100 pieces from the two buffers by turns, none next to the one before: more than
        // are merged, so the kernel gets them as they came.
        let scattered: Vec<IoSlice> = (0..100)
            .map(|k| {
                let buf = if k % 2 == 0 { &frame } else { &copy };
                IoSlice::new(&buf[k * 10..k * 10 + 10])
            })
            .collect();
        let mut out = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MERGED_IOVS];
        assert_eq!(merge_adjacent(&scattered, &mut out), None);
        for pieces in [&iov[..], &iov[..11], &iov[..1], &scattered[..]] {
            tap.send(pieces).unwrap();
            let want: Vec<u8> = pieces.iter().flat_map(|p| p.iter().copied()).collect();
            let mut got = vec![0u8; 4096];
            let n = peer.read(&mut got).unwrap();
            assert_eq!(&got[..n], &want[..]);
        }
    }

    /// The tap's batches went through its io_uring, where the kernel gives one.
    fn assert_ring_used(tap: &Tap) {
        match FrameRing::new(tap.file.as_raw_fd()) {
            Ok(_) => assert!(matches!(tap.batch, Batch::Ring(_)), "went one by one"),
            Err(e) => eprintln!("SKIPPED the io_uring check: none here ({e})"),
        }
    }

    /// Frame `i` of a test batch: `i` repeated, 60 + 7 * i bytes, in pieces (the odd ones
    /// in two pieces that lie back to back, the others in three scattered ones).
    fn batch_frames(n: usize) -> (Vec<Vec<u8>>, Vec<usize>) {
        let frames: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; 60 + 7 * i]).collect();
        let mut ends = Vec::new();
        let mut pieces = 0;
        for i in 0..n {
            pieces += if i % 2 == 1 { 2 } else { 3 };
            ends.push(pieces);
        }
        (frames, ends)
    }

    fn batch_iov<'a>(frames: &'a [Vec<u8>], scattered: &'a [u8]) -> Vec<IoSlice<'a>> {
        let mut iov = Vec::new();
        for (i, f) in frames.iter().enumerate() {
            if i % 2 == 1 {
                let (a, b) = f.split_at(10);
                iov.extend([IoSlice::new(a), IoSlice::new(b)]);
            } else {
                // An empty piece and one from elsewhere: the frame ends with `scattered`.
                iov.extend([IoSlice::new(f), IoSlice::new(&[]), IoSlice::new(scattered)]);
            }
        }
        iov
    }

    /// The frames of a batch (more than one io_uring submission holds) reach the peer whole,
    /// each once, in order, with the hidden header in front; where the kernel has io_uring,
    /// they went through it.
    #[test]
    fn a_batch_reaches_the_peer_whole_and_in_order() {
        let (ours, mut peer) = seqpacket_pair();
        let mut tap = tap_over(ours, false, true);
        let (frames, ends) = batch_frames(BATCH + 30);
        let tail = *b"-end";
        let iov = batch_iov(&frames, &tail);
        let mut out = Vec::new();
        tap.send_batch(&iov, &ends, &mut out);
        assert_eq!(out.len(), frames.len());
        assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
        let mut got = [0u8; 2048];
        for (i, f) in frames.iter().enumerate() {
            let n = peer.read(&mut got).unwrap();
            let mut want = ZERO_HDR.to_vec();
            want.extend_from_slice(f);
            if i % 2 == 0 {
                want.extend_from_slice(&tail);
            }
            assert_eq!(&got[..n], &want[..], "frame {i}");
        }
        let mut probe = [0u8; 1];
        // SAFETY: a non-blocking recv into the byte we own.
        let r = unsafe {
            libc::recv(
                peer.as_raw_fd(),
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_DONTWAIT,
            )
        };
        assert_eq!(r, -1, "no frame more than sent");
        assert_ring_used(&tap);
    }

    /// A batch of reads (more than waits, with a header hidden and a runt among the frames)
    /// gets every frame, in order, each in its own slot, the header taken off; the runt is
    /// no frame.
    #[test]
    fn a_batch_of_reads_gets_what_waits_in_order() {
        let (ours, mut peer) = seqpacket_pair();
        let mut tap = tap_over(ours, false, true);
        let frames: Vec<Vec<u8>> = (0..5u8).map(|i| vec![i; 60 + i as usize]).collect();
        for (i, f) in frames.iter().enumerate() {
            let mut m = vec![0xee; VNET_HDR_LEN];
            m.extend_from_slice(f);
            peer.write_all(&m).unwrap();
            if i == 2 {
                peer.write_all(&[1, 2, 3]).unwrap();
            }
        }
        let slot = 128;
        let mut slab = vec![0u8; 8 * slot];
        let mut got = Vec::new();
        tap.recv_batch(&mut slab, slot, 8, &mut got).unwrap();
        let read: Vec<Vec<u8>> = got
            .iter()
            .map(|&(i, len)| slab[i * slot..i * slot + len].to_vec())
            .collect();
        assert_eq!(read, frames);
        let slots: Vec<usize> = got.iter().map(|f| f.0).collect();
        assert!(slots.windows(2).all(|w| w[0] < w[1]), "{slots:?}");
        got.clear();
        tap.recv_batch(&mut slab, slot, 8, &mut got).unwrap();
        assert!(got.is_empty(), "nothing more");
        assert_ring_used(&tap);
    }

    /// Where the fd refuses RWF_NOWAIT (tun before Linux 6.x; a pty master here), batches
    /// go one by one: every frame arrives, in order, none lost, and reads still get what
    /// waits.
    #[test]
    fn without_rwf_nowait_batches_go_one_by_one() {
        let (mut master, mut slave) = (0, 0);
        // SAFETY: openpty writes two descriptors into the ints given; no name, termios or
        // window size is asked for.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "openpty: {}", io::Error::last_os_error());
        // SAFETY: both descriptors are fresh and owned by nobody else.
        let (master, mut slave) = unsafe { (File::from_raw_fd(master), File::from_raw_fd(slave)) };
        // SAFETY: termios is plain data; tcgetattr fills it, cfmakeraw and tcsetattr use it.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(slave.as_raw_fd(), &mut t), 0);
            libc::cfmakeraw(&mut t);
            assert_eq!(libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t), 0);
            let fl = libc::fcntl(master.as_raw_fd(), libc::F_GETFL);
            assert_eq!(
                libc::fcntl(master.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK),
                0
            );
        }
        let mut tap = tap_over(master, false, false);
        let (frames, ends) = batch_frames(5);
        let iov = batch_iov(&frames, b"");
        let mut out = Vec::new();
        tap.send_batch(&iov, &ends, &mut out);
        assert_eq!(out.len(), 5);
        assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
        let want: Vec<u8> = frames.concat();
        let mut got = vec![0u8; want.len()];
        slave.read_exact(&mut got).unwrap();
        assert_eq!(got, want, "every frame, in order");
        assert_eq!(tap.dropped(), 0);
        assert!(
            !matches!(tap.batch, Batch::Ring(_)),
            "the ring is no longer asked"
        );
        slave.write_all(b"from-the-peer").unwrap();
        std::thread::sleep(Duration::from_millis(50));
        tap.batch = Batch::Untried;
        let mut slab = vec![0u8; 4 * 64];
        let mut read = Vec::new();
        tap.recv_batch(&mut slab, 64, 4, &mut read).unwrap();
        let bytes: Vec<u8> = read
            .iter()
            .flat_map(|&(i, len)| slab[i * 64..i * 64 + len].to_vec())
            .collect();
        assert_eq!(bytes, b"from-the-peer");
    }

    /// Makes `sock`'s send buffer the smallest the kernel allows (a few KiB).
    fn small_sndbuf(sock: &File) {
        let small: libc::c_int = 4096;
        // SAFETY: SO_SNDBUF reads one int from the pointer given.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&small as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_SNDBUF: {}", io::Error::last_os_error());
    }

    /// A frame the peer refuses outright (too large) in the middle of a batch is dropped,
    /// and the frames after it still go, in order.
    #[test]
    fn a_refused_frame_in_a_batch_is_dropped_and_the_rest_go() {
        let (ours, mut peer) = seqpacket_pair();
        small_sndbuf(&ours);
        let mut tap = tap_over(ours, false, false);
        let frames = [
            vec![1u8; 60],
            vec![2u8; 40_000],
            vec![3u8; 61],
            vec![4u8; 62],
        ];
        let iov: Vec<IoSlice> = frames.iter().map(|f| IoSlice::new(f)).collect();
        let mut out = Vec::new();
        tap.send_batch(&iov, &[1, 2, 3, 4], &mut out);
        assert_eq!(out.len(), 4);
        assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
        assert_eq!(tap.dropped(), 1);
        let mut got = [0u8; 2048];
        for f in [&frames[0], &frames[2], &frames[3]] {
            let n = peer.read(&mut got).unwrap();
            assert_eq!(&got[..n], &f[..]);
        }
    }

    /// A peer that fills up stops the batch at the frame it refused: that one is reported as
    /// WouldBlock, the ones before went, in order, and nothing after it went.
    #[test]
    fn a_full_peer_stops_a_batch_at_the_refused_frame() {
        let (ours, mut peer) = seqpacket_pair();
        small_sndbuf(&ours);
        let mut tap = tap_over(ours, false, false);
        let (frames, ends) = batch_frames(BATCH);
        let iov = batch_iov(&frames, b"");
        let mut out = Vec::new();
        tap.send_batch(&iov, &ends, &mut out);
        let sent = out.len() - 1;
        assert!(sent > 0 && sent < frames.len(), "{} results", out.len());
        assert!(out[..sent].iter().all(|r| r.is_ok()), "{out:?}");
        assert_eq!(
            out[sent].as_ref().unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let mut got = [0u8; 2048];
        for (i, f) in frames.iter().enumerate().take(sent) {
            let n = peer.read(&mut got).unwrap();
            assert_eq!(&got[..n], &f[..], "frame {i}");
        }
        let mut probe = [0u8; 1];
        // SAFETY: a non-blocking recv into the byte we own.
        let r = unsafe {
            libc::recv(
                peer.as_raw_fd(),
                probe.as_mut_ptr().cast(),
                1,
                libc::MSG_DONTWAIT,
            )
        };
        assert_eq!(r, -1, "a frame after the refused one went");
        assert_eq!(tap.dropped(), 0);
    }

    #[test]
    fn without_hiding_frames_pass_as_they_are() {
        for vnet in [false, true] {
            let (ours, mut peer) = seqpacket_pair();
            let mut tap = tap_over(ours, vnet, false);
            assert_eq!(tap.capabilities().vnet_hdr, vnet);
            tap.send(&[IoSlice::new(b"0123456789abcdef")]).unwrap();
            let mut got = [0u8; 64];
            let n = peer.read(&mut got).unwrap();
            assert_eq!(&got[..n], b"0123456789abcdef");
            peer.write_all(b"xyz").unwrap();
            let n = tap.recv(&mut got).unwrap().unwrap();
            assert_eq!(&got[..n], b"xyz");
        }
    }

    #[test]
    fn from_fd_refuses_what_is_not_a_tap_and_leaves_it_open() {
        let f = File::open("/dev/null").unwrap();
        // SAFETY: `f` keeps owning the descriptor: from_fd refuses it before taking it over.
        let e = unsafe { Tap::from_fd(f.as_raw_fd(), None) }.err().unwrap();
        assert!(matches!(e, TapError::BadFd(..)), "{e}");
        assert!(e.to_string().starts_with("fd="), "{e}");
        // SAFETY: F_GETFD only inspects the descriptor.
        assert!(unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) } >= 0);
    }

    /// Runs `f` on a thread in a network namespace of its own (gone when the thread ends, also
    /// on failure); skipped, loudly, where no namespace can be made.
    pub(super) fn in_own_netns(f: impl FnOnce() + Send + 'static) {
        // One at a time: these tests fork ip(8), and a child forked by one holds the other's
        // tap fds until it execs, which would make a tap look busy to the other.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let r = std::thread::spawn(|| {
            // SAFETY: unshare affects this thread only; it holds no other namespace state.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "SKIPPED: no network namespace ({})",
                    io::Error::last_os_error()
                );
                return;
            }
            f()
        })
        .join();
        assert!(r.is_ok(), "the namespace thread failed");
    }

    /// A persistent tap keeps the offloads a frontend set after nicvm lets go of it (they are
    /// the interface's, not the file's). Opened again without a virtio-net header, it must
    /// not hand over frames whose checksum was left to a header that is not there: the host's
    /// UDP datagram arrives with its checksum complete.
    #[test]
    fn a_reopened_tap_starts_without_the_offloads_left_on_it() {
        in_own_netns(|| {
            let ip = |args: &str| {
                let ok = std::process::Command::new("ip")
                    .args(args.split(' '))
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "ip {args}");
            };
            ip("tuntap add dev nro0 mode tap");
            ip("addr add 10.77.0.1/24 dev nro0");
            ip("link set nro0 up");
            ip("neigh add 10.77.0.2 lladdr 52:54:00:77:00:02 dev nro0");
            drop({
                let mut t = Tap::open("nro0", Some(true)).unwrap();
                t.set_rx_offloads(Offloads::ALL).unwrap();
                t
            });
            let mut t = Tap::open("nro0", Some(false)).unwrap();
            let sock = std::net::UdpSocket::bind("10.77.0.1:0").unwrap();
            let mut buf = vec![0u8; crate::MAX_FRAME];
            let start = Instant::now();
            let frame = loop {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "no datagram came"
                );
                sock.send_to(&[0x5a; 200], "10.77.0.2:9").unwrap();
                std::thread::sleep(Duration::from_millis(20));
                // IPv4, UDP, to port 9 (the namespace's IPv6 chatter passed over).
                match t.recv(&mut buf).unwrap() {
                    Some(n)
                        if n >= 42
                            && buf[12..14] == [8, 0]
                            && buf[23] == 17
                            && buf[36..38] == [0, 9] =>
                    {
                        break buf[..n].to_vec();
                    }
                    _ => {}
                }
            };
            let udp = &frame[34..];
            assert_eq!(udp.len(), 8 + 200);
            let pseudo = [
                &frame[26..34],
                &[0, 17],
                &(udp.len() as u16).to_be_bytes()[..],
            ]
            .concat();
            let sum =
                crate::csum::fold(crate::csum::ones_sum(&pseudo) + crate::csum::ones_sum(udp));
            assert_eq!(
                sum, 0xffff,
                "the UDP checksum {:02x}{:02x} is not complete: the offloads an earlier opener \
                 set were left on",
                udp[6], udp[7]
            );
        });
    }

    /// Asks the host side (NET.1, in this test's namespace) for its MAC from NET.2 through
    /// `taps[send]`, every 300 ms for 10 s at most, and returns the reply read from
    /// `taps[recv]` (other frames that come by, such as IPv6 router solicitations, skipped).
    fn arp_reply(taps: &mut [Tap], send: usize, recv: usize, net: [u8; 3]) -> Vec<u8> {
        let mac = [0x52, 0x54, 0x00, net[2], 0x00, 0x02];
        let mut arp = vec![0xff; 6];
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[net[0], net[1], net[2], 2]);
        arp.extend_from_slice(&[0; 6]);
        arp.extend_from_slice(&[net[0], net[1], net[2], 1]);
        arp.resize(60, 0);
        let start = Instant::now();
        let mut buf = vec![0u8; crate::MAX_FRAME];
        let mut sent = Instant::now() - Duration::from_secs(1);
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no ARP reply from the kernel"
            );
            if sent.elapsed() >= Duration::from_millis(300) {
                taps[send].send(&[IoSlice::new(&arp)]).unwrap();
                sent = Instant::now();
            }
            let Some(n) = taps[recv].recv(&mut buf).unwrap() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            let f = &buf[..n];
            if n >= 42 && f[..6] == mac && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                return f.to_vec();
            }
        }
    }

    /// A real tap created with IFF_VNET_HDR, as another program would pass it with fd=, in a
    /// network namespace of this test's own (gone when its thread ends, also on failure). The
    /// frontend wants no header: the kernel must understand the frames nicvm sends (it answers
    /// an ARP request) and nicvm's frames must come without the header (the answer parses).
    #[test]
    fn a_vnet_hdr_tap_passed_as_fd_hides_the_header() {
        in_own_netns(|| {
            let Ok(tun) = OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
            else {
                eprintln!("SKIPPED: no /dev/net/tun");
                return;
            };
            let mut req = ifreq("nvh0", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR).unwrap();
            // SAFETY: TUNSETIFF reads and updates the ifreq we own.
            let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
            assert_eq!(rc, 0, "TUNSETIFF: {}", io::Error::last_os_error());
            // Children forked from this thread live in its namespace.
            let ip = std::process::Command::new("ip")
                .args(["addr", "add", "192.168.77.1/24", "dev", "nvh0"])
                .status();
            if !matches!(ip, Ok(s) if s.success()) {
                eprintln!("SKIPPED: no ip(8)");
                return;
            }
            let up = std::process::Command::new("ip")
                .args(["link", "set", "nvh0", "up"])
                .status()
                .unwrap();
            assert!(up.success());

            let fd = tun.into_raw_fd();
            // SAFETY: `fd` came from into_raw_fd: nothing else owns it.
            let mut tap = unsafe { Tap::from_fd(fd, Some(false)) }.unwrap();
            assert_eq!(tap.name(), "nvh0");
            assert!(!tap.capabilities().vnet_hdr);
            assert!(tap.tx_batches, "the kernel's default send buffer: batches");
            // A send buffer someone limited (QEMU's sndbuf=): one write per frame.
            let limit: libc::c_int = 65536;
            // SAFETY: TUNSETSNDBUF (`_IOW('T', 212, int)`) reads one int from the pointer.
            let rc = unsafe { libc::ioctl(tap.file.as_raw_fd(), 0x4004_54d4, &limit) };
            assert_eq!(rc, 0, "TUNSETSNDBUF: {}", io::Error::last_os_error());
            assert!(!sndbuf_unlimited(tap.file.as_raw_fd()));

            let reply = arp_reply(std::slice::from_mut(&mut tap), 0, 0, [192, 168, 77]);
            assert_eq!(
                &reply[28..32],
                &[192, 168, 77, 1],
                "sender is the host side"
            );
        });
    }

    /// Runs of a TCP stream's segments reach the tap merged, and the kernel gives back the
    /// frames the guest sent, byte for byte: two taps on a bridge in a namespace of the test's
    /// own; the second takes no offloads, so the kernel cuts the GSO frames it forwards there
    /// (and fills in checksums left to it), as for a bridge port without TSO.
    #[test]
    fn merged_segments_leave_the_host_as_the_guest_sent_them() {
        use crate::coalesce::check::{cut, stream, stream6};
        in_own_netns(|| {
            let ip = |args: &[&str]| {
                let ok = std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .is_ok_and(|s| s.success());
                assert!(ok, "ip {}", args.join(" "));
            };
            let mut from = Tap::open("nco0", Some(true)).unwrap();
            let mut to = Tap::open("nco1", Some(true)).unwrap();
            ip(&["link", "add", "ncobr", "type", "bridge"]);
            for dev in ["nco0", "nco1"] {
                ip(&["link", "set", dev, "master", "ncobr"]);
                ip(&["link", "set", dev, "up"]);
            }
            ip(&["link", "set", "ncobr", "up"]);
            let rx_packets = || {
                let out = std::process::Command::new("ip")
                    .args(["-s", "link", "show", "nco0"])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let mut lines = text
                    .lines()
                    .skip_while(|l| !l.trim_start().starts_with("RX:"));
                let numbers = lines.nth(1).expect("ip -s link: RX counters");
                numbers
                    .split_whitespace()
                    .nth(1)
                    .unwrap()
                    .parse::<u64>()
                    .unwrap()
            };
            let mut buf = vec![0u8; crate::MAX_FRAME];
            // TCP over IPv4 or IPv6 (the namespace's own IPv6 chatter left out).
            let is_tcp = |f: &[u8]| match (f[12], f[13]) {
                (0x08, 0x00) => f[23] == 6,
                (0x86, 0xdd) => f[20] == 6,
                _ => false,
            };
            let mut tcp_from_to = |to: &mut Tap, want: usize, wait: Duration| {
                let mut got = Vec::new();
                let start = Instant::now();
                while got.len() < want && start.elapsed() < wait {
                    match to.recv(&mut buf).unwrap() {
                        Some(n) if n > VNET_HDR_LEN + 54 && is_tcp(&buf[VNET_HDR_LEN..n]) => {
                            let mut f = buf[..n].to_vec();
                            f[..VNET_HDR_LEN].fill(0);
                            got.push(f);
                        }
                        Some(_) => {}
                        None => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
                got
            };
            // The bridge forwards once its ports are up: a lone segment until one comes by.
            let probe = stream(1, 1, 1, 100, false);
            let start = Instant::now();
            loop {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "the bridge forwards nothing"
                );
                from.send(&[IoSlice::new(&probe[0])]).unwrap();
                if !tcp_from_to(&mut to, 1, Duration::from_millis(200)).is_empty() {
                    break;
                }
            }
            while !tcp_from_to(&mut to, 1, Duration::from_millis(100)).is_empty() {}

            // Two streams (checksums computed, and left to the peer), an ARP between them, and
            // one over IPv6.
            let mut batch = stream(30, 4_000_000_000, 65_530, 1448, false);
            let mut arp = vec![0u8; VNET_HDR_LEN];
            arp.extend_from_slice(&[0xff; 6]);
            arp.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x08, 0x06]);
            arp.resize(VNET_HDR_LEN + 60, 0);
            batch.push(arp);
            batch.extend(stream(10, 77, 3, 1000, true));
            batch.extend(stream6(12, 5, 1220, false));
            let before = rx_packets();
            let iov: Vec<IoSlice> = batch.iter().map(|f| IoSlice::new(f)).collect();
            let ends: Vec<usize> = (1..=batch.len()).collect();
            let mut out = Vec::new();
            from.send_batch(&iov, &ends, &mut out);
            assert_eq!(out.len(), batch.len());
            assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
            assert_eq!(rx_packets() - before, 4, "the tap took four frames for 53");

            let want: Vec<Vec<u8>> = batch
                .iter()
                .filter(|f| is_tcp(&f[VNET_HDR_LEN..]))
                .flat_map(|f| cut(f))
                .collect();
            let got = tcp_from_to(&mut to, want.len(), Duration::from_secs(5));
            assert_eq!(got.len(), want.len(), "segments out of the bridge");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                let at = g.iter().zip(w).position(|(a, b)| a != b);
                assert!(
                    g.len() == w.len() && at.is_none(),
                    "segment {i} ({} bytes, {} sent) differs at byte {at:?}",
                    g.len(),
                    w.len()
                );
            }
        });
    }

    /// A tap nicvm opens is down on the host until someone brings it up (`script=no`): what
    /// the guest sends meanwhile is dropped, one by one and in batches, and counted, with the
    /// link left up; once the interface is up, frames go both ways. (A down interface made
    /// the tap take itself for deleted: link down and every frame dropped, for good.)
    #[test]
    fn frames_sent_while_the_interface_is_down_are_dropped_until_it_is_up() {
        in_own_netns(|| {
            let mut tap = match Tap::open("nvd0", Some(false)) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("SKIPPED: no tap ({e})");
                    return;
                }
            };
            let (frames, ends) = batch_frames(4);
            tap.send(&[IoSlice::new(&frames[0])]).unwrap();
            let iov = batch_iov(&frames, b"");
            let mut out = Vec::new();
            tap.send_batch(&iov, &ends, &mut out);
            assert_eq!(out.len(), 4);
            assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
            if !matches!(tap.batch, Batch::Ring(_)) {
                eprintln!("NOTE: no io_uring batches here: the batch went one write at a time");
            }
            assert_eq!(tap.dropped(), 5);
            assert!(tap.link_up(), "a down interface is not a deleted one");
            let ip = |args: &[&str]| {
                std::process::Command::new("ip")
                    .args(args)
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !ip(&["addr", "add", "192.168.78.1/24", "dev", "nvd0"]) {
                eprintln!("SKIPPED: no ip(8)");
                return;
            }
            assert!(ip(&["link", "set", "nvd0", "up"]));
            let reply = arp_reply(std::slice::from_mut(&mut tap), 0, 0, [192, 168, 78]);
            assert_eq!(&reply[28..32], &[192, 168, 78, 1], "the host side answered");
            assert!(tap.link_up());
            let mut out = Vec::new();
            tap.send_batch(&iov, &ends, &mut out);
            assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
            assert_eq!(tap.dropped(), 5, "an interface that is up takes them");
            assert!(!tap.down);
        });
    }

    /// `queues=2`: two descriptors on one multiqueue tap; a queue turned off is detached in
    /// the kernel (every frame then comes on the other), and on again; a tap made without
    /// multiple queues is refused with a message that says so.
    /// A tap that has sent a batch lets go of the interface when it is dropped, at once: a
    /// persistent tap can be opened again right away (the next VM on the same `ifname=`).
    #[test]
    fn a_tap_that_batched_is_free_again_as_soon_as_it_is_dropped() {
        in_own_netns(|| {
            let ok = std::process::Command::new("ip")
                .args(["tuntap", "add", "dev", "nbt0", "mode", "tap"])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("SKIPPED: no ip(8) or no /dev/net/tun");
                return;
            }
            for round in 0..3 {
                let mut tap = Tap::open("nbt0", Some(false)).unwrap_or_else(|e| {
                    panic!("round {round}: {e}");
                });
                let (frames, ends) = batch_frames(4);
                let iov = batch_iov(&frames, b"");
                let mut out = Vec::new();
                tap.send_batch(&iov, &ends, &mut out);
                assert_eq!(out.len(), 4);
            }
        });
    }

    /// Gives tap `name` the host address NET.1/24 and brings it up; false (said SKIPPED) when
    /// there is no ip(8).
    fn host_side_up(name: &str, net: [u8; 3]) -> bool {
        let ip = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        let addr = format!("{}.{}.{}.1/24", net[0], net[1], net[2]);
        if !ip(&["addr", "add", &addr, "dev", name]) {
            eprintln!("SKIPPED: no ip(8)");
            return false;
        }
        assert!(ip(&["link", "set", name, "up"]));
        true
    }

    /// A tap's queues opened by another program, as libvirt passes them (`fds=N:M`): both
    /// carry frames; descriptors of a single-queue tap or of two different taps are refused.
    #[test]
    fn queue_fds_of_one_multiqueue_tap() {
        in_own_netns(|| {
            // A queue of tap `name` opened here, as another program would (None: no tun).
            let raw = |name: &str, multi: bool| -> Option<RawFd> {
                let tun = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/net/tun")
                    .ok()?;
                let mq = if multi {
                    libc::IFF_MULTI_QUEUE as libc::c_short
                } else {
                    0
                };
                let mut req = ifreq(name, IFF_TAP | IFF_NO_PI | mq).unwrap();
                // SAFETY: TUNSETIFF reads and updates the ifreq we own.
                let rc = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) };
                assert_eq!(rc, 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
                Some(tun.into_raw_fd())
            };
            let Some(q0) = raw("nqf0", true) else {
                eprintln!("SKIPPED: no /dev/net/tun");
                return;
            };
            let q1 = raw("nqf0", true).unwrap();
            // SAFETY: q0 and q1 came from into_raw_fd: nothing else owns them.
            let mut taps = unsafe { Tap::from_queue_fds("fds", &[q0, q1], Some(false)) }.unwrap();
            assert_eq!(taps.len(), 2);
            assert!(taps.iter().all(|t| t.name() == "nqf0"));
            if !host_side_up("nqf0", [192, 168, 79]) {
                return;
            }
            // Asked through queue 1, answered on queue 0 (queue 1 detached for the answer).
            taps[1].set_queue_enabled(false).unwrap();
            arp_reply(&mut taps, 1, 0, [192, 168, 79]);
            drop(taps);

            let (a, single) = (raw("nqf1", true).unwrap(), raw("nqs0", false).unwrap());
            // SAFETY: as above; `single` is left open by the refusal and closed below.
            match unsafe { Tap::from_queue_fds("fds", &[a, single], None) } {
                Err(e @ TapError::FdNotMultiQueue(..)) => {
                    assert!(e.to_string().contains("nqs0"), "{e}")
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a single-queue tap's descriptor taken as a queue"),
            }
            let (b, c) = (raw("nqf1", true).unwrap(), raw("nqf2", true).unwrap());
            // SAFETY: as above; `c` is left open by the refusal.
            match unsafe { Tap::from_queue_fds("fds", &[b, c], None) } {
                Err(e @ TapError::FdOtherTap { .. }) => assert!(
                    e.to_string().contains("nqf2") && e.to_string().contains("nqf1"),
                    "{e}"
                ),
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("queues of two taps taken as one tap's"),
            }
            for fd in [single, c] {
                // SAFETY: closing the descriptors the refusals left open, owned by nothing.
                unsafe { libc::close(fd) };
            }
        });
    }

    #[test]
    fn multiqueue_tap_queues_detach_and_attach() {
        in_own_netns(|| {
            let mut taps = match Tap::open_queues("nmq0", Some(false), 2) {
                Ok(t) => t,
                Err(TapError::NoTun(e)) => {
                    eprintln!("SKIPPED: no /dev/net/tun ({e})");
                    return;
                }
                Err(e) => panic!("{e}"),
            };
            assert_eq!(taps.len(), 2);
            assert!(taps.iter().all(|t| t.name() == "nmq0"));
            if !host_side_up("nmq0", [192, 168, 78]) {
                return;
            }
            taps[1].set_queue_enabled(false).unwrap();
            let mut buf = vec![0u8; crate::MAX_FRAME];
            assert_eq!(
                taps[1].recv(&mut buf).unwrap(),
                None,
                "a detached queue is not read"
            );
            // Opening it as a single-queue tap says what it is.
            match Tap::open("nmq0", Some(false)) {
                Err(e @ TapError::IsMultiQueue(_)) => assert!(e.to_string().contains("queues=")),
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a multiqueue tap opened with one queue"),
            }
            // Asked through the detached queue (the kernel takes it), answered on the
            // attached one.
            arp_reply(&mut taps, 1, 0, [192, 168, 78]);
            assert_eq!(taps[1].dropped(), 0, "a detached queue sends");
            assert!(taps[1].link_up(), "a detached queue is not a deleted tap");
            taps[1].set_queue_enabled(true).unwrap();
            assert!(!taps[1].detached_queue);
            drop(taps);

            let single = Tap::open("nsq0", Some(false)).unwrap();
            match Tap::open_queues("nsq0", Some(false), 2) {
                Err(e @ TapError::NotMultiQueue(_)) => {
                    assert!(e.to_string().contains("multi"), "{e}")
                }
                Err(e) => panic!("{e}"),
                Ok(_) => panic!("a single-queue tap opened as a multiqueue one"),
            }
            drop(single);
        });
    }
}
