//! Linux tap interfaces (`-netdev tap`): opened through /dev/net/tun with IFF_TAP|IFF_NO_PI and,
//! for virtio-net, IFF_VNET_HDR (12-byte header) so offloads pass straight through.

use crate::vnet::VNET_HDR_LEN;
use crate::{Capabilities, NetBackend, Offloads};
use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const TUNGETFEATURES: libc::c_ulong = 0x8004_54cf;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_TSO_ECN: libc::c_uint = 0x08;
const TUN_F_UFO: libc::c_uint = 0x10;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

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
    #[error("fd={0}: not an open tap file descriptor ({1})")]
    BadFd(RawFd, io::Error),
    #[error("vnet_hdr=on: this kernel's tap cannot carry a virtio-net header")]
    NoVnetHdr,
}

pub struct Tap {
    file: File,
    name: String,
    vnet_hdr: bool,
    /// The interface was deleted under us (reads and writes fail with EBADFD): the link is
    /// down for good and frames sent are counted as dropped.
    gone: bool,
    dropped: u64,
}

fn ifreq(name: &str, flags: libc::c_short) -> Result<IfReq, TapError> {
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    if name.len() >= libc::IFNAMSIZ {
        return Err(TapError::NameTooLong(name.into()));
    }
    r.name[..name.len()].copy_from_slice(name.as_bytes());
    Ok(r)
}

impl Tap {
    /// Opens tap `name` (created if missing and allowed; the kernel picks `tapN` when `name` is
    /// empty). `vnet_hdr`: None = use it if the kernel can, Some(x) = insist.
    pub fn open(name: &str, vnet_hdr: Option<bool>) -> Result<Tap, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::NoTun)?;
        let mut features: libc::c_uint = 0;
        // SAFETY: TUNGETFEATURES writes one unsigned int to the pointer given.
        unsafe { libc::ioctl(file.as_raw_fd(), TUNGETFEATURES, &mut features) };
        let can_vnet = features & IFF_VNET_HDR as libc::c_uint != 0;
        let use_vnet = match vnet_hdr {
            Some(true) if !can_vnet => return Err(TapError::NoVnetHdr),
            Some(v) => v,
            None => can_vnet,
        };
        let mut flags = IFF_TAP | IFF_NO_PI;
        if use_vnet {
            flags |= IFF_VNET_HDR;
        }
        let mut req = ifreq(name, flags)?;
        // SAFETY: TUNSETIFF reads and updates the ifreq we own.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let e = io::Error::last_os_error();
            let n = name.to_string();
            return Err(match e.raw_os_error() {
                Some(libc::EBUSY) => TapError::Busy(n),
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(n),
                Some(libc::EINVAL) => TapError::NotTap(n),
                _ => TapError::Other(n, e),
            });
        }
        let name = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tap = Tap {
            file,
            name,
            vnet_hdr: use_vnet,
            gone: false,
            dropped: 0,
        };
        if use_vnet {
            tap.set_vnet_hdr_size()?;
        }
        Ok(tap)
    }

    /// Adopts a tap fd opened by someone else (`fd=`), keeping whatever flags it was opened with.
    pub fn from_fd(fd: RawFd) -> Result<Tap, TapError> {
        let mut req = ifreq("", 0)?;
        // SAFETY: TUNGETIFF fills the ifreq we own; a non-tap fd just fails.
        if unsafe { libc::ioctl(fd, TUNGETIFF, &mut req) } < 0 {
            return Err(TapError::BadFd(fd, io::Error::last_os_error()));
        }
        // SAFETY: the caller handed us this descriptor to own; TUNGETIFF proved it is a tap.
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: F_SETFL on a descriptor we own.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        let name = CStr::from_bytes_until_nul(&req.name)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tap = Tap {
            file,
            name,
            vnet_hdr: req.flags & IFF_VNET_HDR != 0,
            gone: false,
            dropped: 0,
        };
        if tap.vnet_hdr {
            tap.set_vnet_hdr_size()?;
        }
        Ok(tap)
    }

    /// Errors that mean the interface no longer exists: the fd is detached from any tap.
    fn detached(&mut self, e: &io::Error) -> bool {
        let gone = matches!(
            e.raw_os_error(),
            Some(libc::EBADFD) | Some(libc::EIO) | Some(libc::ENODEV)
        );
        if gone && !self.gone {
            log::warn!(
                "tap {}: the interface is gone ({e}); link down, frames to it are dropped",
                self.name
            );
            self.gone = true;
        }
        gone
    }

    fn set_vnet_hdr_size(&self) -> Result<(), TapError> {
        let size: libc::c_int = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETVNETHDRSZ, &size) } < 0 {
            return Err(TapError::Other(
                self.name.clone(),
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
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
        if !self.vnet_hdr {
            return Ok(());
        }
        let mut flags = 0;
        if o.csum {
            flags |= TUN_F_CSUM;
            if o.tso4 {
                flags |= TUN_F_TSO4;
            }
            if o.tso6 {
                flags |= TUN_F_TSO6;
            }
            if (o.tso4 || o.tso6) && o.tso_ecn {
                flags |= TUN_F_TSO_ECN;
            }
        }
        let set = |f: libc::c_uint| {
            // SAFETY: TUNSETOFFLOAD takes its argument by value.
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, f as libc::c_ulong) }
        };
        if o.csum && o.ufo && set(flags | TUN_F_UFO) == 0 {
            return Ok(());
        }
        if set(flags) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn send(&mut self, frame: &[IoSlice<'_>]) -> io::Result<()> {
        if self.gone {
            self.dropped += 1;
            return Ok(());
        }
        // SAFETY: IoSlice is ABI-compatible with iovec; the slices outlive the call.
        let n = unsafe {
            libc::writev(
                self.file.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len() as libc::c_int,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            // A frame the kernel refuses (malformed GSO header, too large) is the guest's
            // problem: drop it rather than stall the queue.
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EMSGSIZE) {
                log::debug!("tap {}: dropped a frame: {e}", self.name);
                return Ok(());
            }
            if self.detached(&e) {
                self.dropped += 1;
                return Ok(());
            }
            return Err(e);
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if self.gone {
            return Ok(None);
        }
        // SAFETY: reading into `buf`, within its length.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(None),
                _ if self.detached(&e) => Ok(None),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn link_up(&self) -> bool {
        !self.gone
    }

    fn dropped(&self) -> u64 {
        self.dropped
    }
}
