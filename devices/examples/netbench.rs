//! No-guest benchmark: host CPU time per frame spent by the virtio-net model on a tap, driven by
//! the synthetic driver, next to a bare write()/read() of the same frame on the same tap.
//!
//! Runs in a private network namespace (needs root); the tap vanishes with the process.
//! Usage: netbench [FRAMES] [FRAME_LEN]     (defaults: 200000 frames of 1514 bytes)

use devices::net::{NetEvent, NetFrontend};
use devices::virtio::net::driver::{Driver, BUF_BASE, QSIZE};
use devices::virtio::net::*;
use devices::virtio::VIRTIO_F_VERSION_1;
use net_backends::tap::Tap;
use net_backends::vnet::VNET_HDR_LEN;
use net_backends::NetBackend;
use std::os::fd::RawFd;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x99]);
    f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes()); // local experimental ethertype
    for (i, b) in f[14..].iter_mut().enumerate() {
        *b = i as u8;
    }
    f
}

/// A packet socket on the tap's host side: what it sends, the tap's reader receives.
fn injector(ifname: &str) -> RawFd {
    // SAFETY: plain socket/ioctl/bind calls on descriptors and structs we own.
    unsafe {
        let s = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        assert!(
            s >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        let idx = libc::if_nametoindex(std::ffi::CString::new(ifname).unwrap().as_ptr());
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = idx as i32;
        let r = libc::bind(
            s,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        s
    }
}

fn inject(sock: RawFd, f: &[u8], n: usize) {
    for _ in 0..n {
        // SAFETY: sending from a buffer we own.
        let r = unsafe { libc::send(sock, f.as_ptr().cast(), f.len(), 0) };
        assert_eq!(
            r as usize,
            f.len(),
            "inject: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let len: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1514);
    // SAFETY: unshare only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "netbench: needs root to make a private network namespace: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    let tap = Tap::open("nb0", Some(true)).expect("tap");
    // No IPv6 on the tap: its router solicitations would mix with the measured frames.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/nb0/disable_ipv6", "1");
    let ok = std::process::Command::new("ip")
        .args(["link", "set", "nb0", "up"])
        .status()
        .expect("ip");
    assert!(ok.success());
    // SAFETY: dup of the tap's fd, for the floor measurements on the same queue.
    let raw = unsafe { libc::dup(tap.fd()) };
    let f = frame(len);
    let mut with_hdr = vec![0u8; VNET_HDR_LEN];
    with_hdr.extend_from_slice(&f);
    let batch = (QSIZE - 1) as usize;

    // ---- TX floor: writev of header + frame, as the model issues it.
    let t0 = thread_cpu();
    for _ in 0..n {
        // SAFETY: writing a buffer we own to the tap.
        let r = unsafe { libc::write(raw, with_hdr.as_ptr().cast(), with_hdr.len()) };
        assert_eq!(
            r as usize,
            with_hdr.len(),
            "tap write: {}",
            std::io::Error::last_os_error()
        );
    }
    let tx_floor = (thread_cpu() - t0).as_nanos() as f64 / n as f64;

    // ---- RX floor: read() frames the packet socket put in the tap.
    let sock = injector("nb0");
    let mut buf = vec![0u8; 65_600];
    let mut rx_floor_ns = 0u128;
    let mut done = 0;
    while done < n {
        let b = batch.min(n - done);
        inject(sock, &f, b);
        let t0 = thread_cpu();
        for _ in 0..b {
            // SAFETY: reading into a buffer we own.
            let r = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
            assert_eq!(
                r as usize,
                with_hdr.len(),
                "tap read: {}",
                std::io::Error::last_os_error()
            );
        }
        rx_floor_ns += (thread_cpu() - t0).as_nanos();
        done += b;
    }
    let rx_floor = rx_floor_ns as f64 / n as f64;

    // ---- The model: TX from the synthetic driver's ring to the tap.
    let features =
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF;
    let mut d = Driver::start(Box::new(tap), features);
    let tx_addr = BUF_BASE[TX];
    d.mem.write_slice(&with_hdr, GuestAddress(tx_addr)).unwrap();
    let mut tx_ns = 0u128;
    let mut done = 0;
    while done < n {
        let b = batch.min(n - done);
        for _ in 0..b {
            d.post_at(TX, tx_addr, with_hdr.len() as u32, false);
        }
        let t0 = thread_cpu();
        d.dev.handle(NetEvent::TxKick);
        tx_ns += (thread_cpu() - t0).as_nanos();
        done += b;
    }
    assert_eq!(d.dev.stats.tx_frames as usize, n, "every frame sent");
    let tx_model = tx_ns as f64 / n as f64;

    // ---- The model: RX from the tap into the synthetic driver's buffers.
    let mut rx_ns = 0u128;
    let mut done = 0;
    while done < n {
        let b = batch.min(n - done);
        inject(sock, &f, b);
        for i in 0..b {
            d.post_at(RX, BUF_BASE[RX] + i as u64 * 2048, 2048, true);
        }
        let t0 = thread_cpu();
        d.dev.handle(NetEvent::Backend);
        rx_ns += (thread_cpu() - t0).as_nanos();
        done += b;
    }
    assert_eq!(d.dev.stats.rx_frames as usize, n, "every frame delivered");
    let rx_model = rx_ns as f64 / n as f64;

    println!("virtio-net on tap, {n} frames of {len} bytes, batches of {batch}, host CPU ns/frame");
    println!("| path | model | bare syscall (floor) | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| TX (ring -> tap) | {tx_model:.0} | {tx_floor:.0} | {:.2} |",
        tx_model / tx_floor
    );
    println!(
        "| RX (tap -> ring) | {rx_model:.0} | {rx_floor:.0} | {:.2} |",
        rx_model / rx_floor
    );
}
