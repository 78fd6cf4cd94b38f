//! No-guest benchmark: host CPU time per frame spent by the virtio-net model on a tap, driven by
//! the synthetic driver, next to a bare write()/read() of the same frame on the same tap.
//!
//! Runs in a private network namespace (needs root); the tap vanishes with the process.
//! Usage: netbench [FRAMES] [FRAME_LEN]     (defaults: 200000 frames of 1514 bytes)

use devices::net::{NetEvent, NetFrontend};
use devices::virtio::net::driver::{Driver, BUF_BASE, QSIZE};
use devices::virtio::net::*;
use devices::virtio::VIRTIO_F_VERSION_1;
use net_backends::slirp::{SlirpBackend, SlirpOptions};
use net_backends::tap::Tap;
use net_backends::vnet::VNET_HDR_LEN;
use net_backends::NetBackend;
use std::net::UdpSocket;
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

fn process_cpu() -> Duration {
    // SAFETY: getrusage writes the struct we own.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| Duration::new(v.tv_sec as u64, v.tv_usec as u32 * 1000);
    t(u.ru_utime) + t(u.ru_stime)
}

/// An Ethernet/IPv4/UDP frame from the guest (10.0.2.15) to the slirp gateway (10.0.2.2).
fn udp_frame(len: usize, port: u16) -> Vec<u8> {
    let mut f = vec![0u8; len.max(42)];
    f[..6].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (f.len() - 14) as u16;
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[10, 0, 2, 15]);
    ip[16..20].copy_from_slice(&[10, 0, 2, 2]);
    let sum = ip
        .chunks(2)
        .fold(0u32, |a, w| a + u16::from_be_bytes([w[0], w[1]]) as u32);
    let sum = (sum & 0xffff) + (sum >> 16);
    ip[10..12].copy_from_slice(&(!((sum & 0xffff) + (sum >> 16)) as u16).to_be_bytes());
    let udp_len = ip_len - 20;
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    f
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

    // ---- The model on user-mode networking: UDP from the guest to a host loopback socket.
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let host = UdpSocket::bind("127.0.0.1:0").expect("udp");
    host.set_nonblocking(true).unwrap();
    let port = host.local_addr().unwrap().port();
    let slirp = SlirpBackend::new(SlirpOptions::default()).expect("slirp");
    let mut d = Driver::start(Box::new(slirp), features);
    let mut uf = vec![0u8; VNET_HDR_LEN];
    uf.extend_from_slice(&udp_frame(len, port));
    d.mem.write_slice(&uf, GuestAddress(tx_addr)).unwrap();
    let m = n.min(50_000);
    let mut got = 0usize;
    let mut rb = vec![0u8; 65536];
    host.set_nonblocking(false).unwrap();
    host.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t0 = process_cpu();
    let mut posted = 0;
    while posted < m {
        // One batch in flight at a time, as a guest waiting on its socket buffer would be.
        let b = batch.min(m - posted);
        for _ in 0..b {
            d.post_at(TX, tx_addr, uf.len() as u32, false);
        }
        d.dev.handle(NetEvent::TxKick);
        posted += b;
        let mut in_batch = 0; // a lost datagram costs one 200 ms wait, then is counted missing
        while in_batch < b && host.recv(&mut rb).is_ok() {
            in_batch += 1;
        }
        got += in_batch;
    }
    let slirp_tx = (process_cpu() - t0).as_nanos() as f64 / got.max(1) as f64;
    // Floor: the same datagrams sent and received with bare sockets on loopback.
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let payload = &uf[VNET_HDR_LEN + 42..];
    let t0 = process_cpu();
    let mut fgot = 0;
    for _ in 0..m {
        let _ = a.send_to(payload, ("127.0.0.1", port));
        if host.recv(&mut rb).is_ok() {
            fgot += 1;
        }
    }
    let udp_floor = (process_cpu() - t0).as_nanos() as f64 / fgot.max(1) as f64;

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
    println!();
    println!(
        "virtio-net on user (libslirp): UDP to a host loopback socket, {m} frames of {len} bytes,"
    );
    println!("process CPU (all threads) ns/frame; floor = bare UDP send + recv on loopback");
    println!("| path | model + slirp | bare sockets (floor) | ratio | delivered |");
    println!("|---|---|---|---|---|");
    println!(
        "| TX (ring -> slirp -> host socket) | {slirp_tx:.0} | {udp_floor:.0} | {:.2} | {got}/{m} |",
        slirp_tx / udp_floor
    );
}
