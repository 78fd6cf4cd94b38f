//! A tap on a host bridge, made as QEMU's bridge helper makes one: a new tap (not persistent,
//! so it leaves the bridge when it is closed) with the bridge's MTU, added to the bridge and
//! brought up. It takes CAP_NET_ADMIN; without it QEMU's setuid helper does these steps (the
//! vmm crate runs it).

use super::{ifreq, Tap, TapError};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// linux/sockios.h: add an interface to a bridge (ifr_ifindex names it).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

/// linux/ethtool.h: ETHTOOL_GDRVINFO, and the `ethtool_drvinfo` it fills.
const ETHTOOL_GDRVINFO: u32 = 3;
#[repr(C)]
struct EthtoolDrvinfo {
    cmd: u32,
    driver: [u8; 32],
    version: [u8; 32],
    fw_version: [u8; 32],
    bus_info: [u8; 32],
    erom_version: [u8; 32],
    reserved2: [u8; 12],
    n_priv_flags: u32,
    n_stats: u32,
    testinfo_len: u32,
    eedump_len: u32,
    regdump_len: u32,
}

/// Whether interface `req` names is a bridge: its driver, as ethtool reports it, is
/// `bridge` (asked of the interface in this namespace; sysfs shows the one it was mounted in).
fn is_bridge(sock: &OwnedFd, req: &mut libc::ifreq) -> bool {
    // SAFETY: plain integers and byte arrays; all zeroes is a valid value.
    let mut info: EthtoolDrvinfo = unsafe { std::mem::zeroed() };
    info.cmd = ETHTOOL_GDRVINFO;
    req.ifr_ifru.ifru_data = (&mut info as *mut EthtoolDrvinfo).cast();
    // A driver without the request (loopback) is no bridge either.
    let asked = ioctl(sock, libc::SIOCETHTOOL, req).is_ok();
    asked && info.driver.split(|b| *b == 0).next() == Some(&b"bridge"[..])
}

/// One interface ioctl on a socket made for it. The caller keeps alive whatever `req` points
/// to (SIOCETHTOOL's `ifru_data`).
fn ioctl(sock: &OwnedFd, request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: the request reads and writes the ifreq we own, on a socket we own, and for
    // SIOCETHTOOL the ethtool_drvinfo its data member points to, which the caller owns and
    // keeps alive across the call (is_bridge).
    if unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Tap {
    /// A new tap on bridge `br`, with a virtio-net header when the kernel can carry one.
    pub fn on_bridge(br: &str) -> Result<Tap, TapError> {
        let bridge = |what, source| TapError::Bridge {
            br: br.into(),
            what,
            source,
        };
        // SAFETY: socket() with constant arguments; the result is checked before it is owned.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(bridge(
                "no socket to configure it",
                io::Error::last_os_error(),
            ));
        }
        // SAFETY: a descriptor socket() just returned, owned by nothing else.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let named = |name: &str| {
            ifreq(name, 0)
                .map_err(|_| bridge("not an interface name", io::ErrorKind::InvalidInput.into()))
        };
        let mut req = named(br)?;
        ioctl(&sock, libc::SIOCGIFMTU, &mut req).map_err(|e| bridge("no such interface", e))?;
        // SAFETY: SIOCGIFMTU wrote the MTU member of the union.
        let mtu = unsafe { req.ifr_ifru.ifru_mtu };
        if !is_bridge(&sock, &mut named(br)?) {
            return Err(bridge(
                "not a bridge",
                io::Error::from_raw_os_error(libc::EOPNOTSUPP),
            ));
        }
        let tap = Tap::open("", None)?;
        let setup = |what, source| TapError::Setup {
            tap: tap.name.clone(),
            what,
            source,
        };
        let mut req = named(&tap.name)?;
        req.ifr_ifru.ifru_mtu = mtu;
        ioctl(&sock, libc::SIOCSIFMTU, &mut req).map_err(|e| setup("take the bridge's MTU", e))?;
        let cname = std::ffi::CString::new(tap.name.as_str()).unwrap_or_default();
        // SAFETY: a NUL-terminated name we own.
        let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if index == 0 {
            return Err(setup("find its index", io::Error::last_os_error()));
        }
        let mut req = named(br)?;
        req.ifr_ifru.ifru_ifindex = index as libc::c_int;
        ioctl(&sock, SIOCBRADDIF, &mut req).map_err(|e| match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => bridge("not a bridge", e),
            _ => bridge("cannot add the tap to it", e),
        })?;
        let mut req = named(&tap.name)?;
        ioctl(&sock, libc::SIOCGIFFLAGS, &mut req).map_err(|e| setup("read its flags", e))?;
        // SAFETY: SIOCGIFFLAGS wrote the flags member of the union.
        unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
        ioctl(&sock, libc::SIOCSIFFLAGS, &mut req).map_err(|e| setup("bring it up", e))?;
        Ok(tap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// In a namespace of the test's own: the tap takes the bridge's MTU, is on it and up, and
    /// is gone (off the bridge) once dropped; an interface that is not a bridge, or none, is
    /// refused with the reason.
    #[test]
    fn a_tap_on_a_bridge_as_the_helper_makes_it() {
        super::super::tests::in_own_netns(|| {
            let ip = |cmd: &str| {
                std::process::Command::new("ip")
                    .args(cmd.split(' '))
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !ip("link add nbr0 type bridge") {
                eprintln!("SKIPPED: no ip(8) or no bridge support");
                return;
            }
            assert!(ip("link set nbr0 mtu 1400") && ip("link add ndm0 type veth peer name ndm1"));
            let tap = match Tap::on_bridge("nbr0") {
                Err(TapError::NoTun(e)) => {
                    eprintln!("SKIPPED: no /dev/net/tun ({e})");
                    return;
                }
                r => r.unwrap(),
            };
            // ip(8), run from this thread, asks the namespace the thread is in (sysfs would
            // show the one it was mounted in).
            let link = |name: &str| {
                std::process::Command::new("ip")
                    .args(["-o", "link", "show", name])
                    .output()
                    .ok()
                    .filter(|o| o.status.success())
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            };
            let shown = link(&tap.name).unwrap_or_default();
            for want in [",UP", "mtu 1400 ", "master nbr0 "] {
                assert!(shown.contains(want), "{want}: {shown}");
            }
            let name = tap.name.clone();
            drop(tap);
            assert_eq!(link(&name), None, "{name} outlived its descriptor");
            for (br, why) in [
                ("ndm0", "br=ndm0: not a bridge"),
                ("lo", "br=lo: not a bridge"),
                ("nbr9", "br=nbr9: no such interface"),
            ] {
                let e = Tap::on_bridge(br).err().unwrap().to_string();
                assert!(e.starts_with(why), "{e}");
            }
            let all = std::process::Command::new("ip")
                .args(["-o", "link", "show"])
                .output()
                .unwrap();
            let all = String::from_utf8_lossy(&all.stdout).into_owned();
            assert!(
                !all.contains(": tap"),
                "a refused tap was left behind: {all}"
            );
        });
    }
}
