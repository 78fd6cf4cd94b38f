//! No-guest NIC benchmark: host CPU time per frame spent by each NIC model (virtio-net, e1000,
//! rtl8139 in C+ mode as 8139cp drives it and in normal mode as 8139too does) on a tap, driven
//! by its synthetic driver, next to a bare write()/read() of the same frames on the same tap
//! (the "floor", measured batch by batch in between the model's batches so that drift hits
//! both alike); plus virtio-net on libslirp both ways (UDP to a host socket, and from one
//! through a `hostfwd=udp:` port).
//!
//! Cases: TX of full-size TCP frames, TX with checksum offload, TX of 64 KiB TCP sends with
//! TSO / large send (per wire frame and per send; the floor writes the same MSS-sized frames
//! one by one), TX of one TCP stream's full-size segments, with and without checksum offload,
//! as a guest sends a bulk transfer when its NIC does not segment (the tap takes runs of them
//! merged, see net-backends' `coalesce.rs`; the TX frames above carry PSH and never merge),
//! and RX of TCP segments injected from the tap's host side into the model's
//! ring: in bursts of a ring's worth (one wake-up of the model takes up to 64 frames, one
//! interrupt), and one frame per wake-up. Then the floor itself with its syscalls batched (the same
//! writes and reads through io_uring, 64 per `io_uring_enter`): how much of the floor fewer
//! syscalls than frames could take off any model on this host.
//! Every model runs on a tap with a virtio-net header, as nicvm opens them: virtio-net passes
//! the guest's offloads through it, e1000 and 8139cp fill one in for their checksum offload
//! and TSO, so their TSO sends too reach the tap whole (the floor still writes wire frames).
//!
//! The floor's buffers (and virtio-net's TX buffers) are taken in turn from 64 at every
//! cache-line offset of a page: how fast the kernel copies a frame depends on where the
//! user buffer lies (see `Spread`), and one fixed buffer made a floor fast or slow by luck.
//!
//! Only the model's share is timed (thread CPU, the clock's own cost subtracted): for TX the
//! doorbell writes (virtio-net's I/O-thread kick; e1000's and rtl8139's register writes, whose
//! frames wait in the port for the I/O thread's turn the first write asked for, here taken
//! once after the doorbells, as when the guest rings them faster than the I/O thread wakes),
//! that turn, and the interrupt ack; for RX the I/O thread's handle(Backend). Filling rings and buffers and reclaiming them is the
//! guest's work and untimed. Every case checks its outcome: the tap's counters must show every
//! frame the model sent (count and bytes), the driver every completion and every received
//! frame; anything else aborts the run.
//!
//! Last, the models' own work: the same drivers and cases on a backend that makes no system
//! calls (`Canned`), so that what a model adds to the floor's syscalls is seen apart from
//! them. The port's own eventfd kicks stay in it (one read and at most one write a batch of
//! doorbells), and it runs with warm caches: between a model's syscalls its work costs more.
//!
//! Runs in a private network namespace (needs root); the taps vanish with the process.
//! Usage: netbench [--quick] [--json] [--user] [FRAMES] [FRAME_LEN]
//!   (defaults: 200000 frames of 1514 bytes; --quick: 3000 frames; --json: JSON on stdout;
//!   --user: only the models' own work, which needs no root and no tap; with --json as JSON;
//!   --slirp: only the two user-mode networking rows, as a table)

use devices::e1000;
use devices::net::offload::{fill_ipv4_checksum, fill_l4_checksum, fold, ones_sum, parse};
use devices::net::{NetEvent, NicStats};
use devices::rtl8139::{self, tx::*};
use devices::virtio::net::driver::{used_base, Driver, BUF_BASE, RING_ROOM};
use devices::virtio::net::*;
use devices::virtio::VIRTIO_F_VERSION_1;
use net_backends::slirp::{SlirpBackend, SlirpOptions};
use net_backends::tap::Tap;
use net_backends::vnet::*;
use net_backends::NetBackend;
use std::net::UdpSocket;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
const MSS: usize = 1460;
/// A TSO send: a 64 KiB frame, Ethernet header included.
const TSO_LEN: usize = 65536;

fn fail(msg: String) -> ! {
    eprintln!("netbench: FAILED: {msg}");
    std::process::exit(2);
}

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

/// Thread CPU time of a closure, less what reading the clock itself costs.
struct Clock {
    overhead: f64,
}

impl Clock {
    fn calibrate() -> Clock {
        let n = 20_000;
        let t0 = thread_cpu();
        for _ in 0..n {
            std::hint::black_box(thread_cpu());
        }
        let overhead = (thread_cpu() - t0).as_nanos() as f64 / n as f64;
        Clock { overhead }
    }

    fn time(&self, f: impl FnOnce()) -> f64 {
        let t0 = thread_cpu();
        f();
        (thread_cpu() - t0).as_nanos() as f64 - self.overhead
    }
}

fn ip_checksum(ip: &mut [u8]) {
    ip[10..12].fill(0);
    let sum = !fold(ones_sum(&ip[..20]));
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
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
    ip_checksum(ip);
    let udp_len = ip_len - 20;
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    f[38..40].copy_from_slice(&udp_len.to_be_bytes());
    f
}

/// An Ethernet/IPv4/TCP frame of `len` bytes with valid checksums, to a unicast address that
/// is not the tap's (the host stack drops it first thing, the same for model and floor).
fn tcp_frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; len.max(54)];
    f[..6].copy_from_slice(&[0x52, 0x55, 10, 0, 2, 2]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (f.len() - 14) as u16;
    f[14..26].copy_from_slice(&[0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[26..34].copy_from_slice(&[10, 0, 2, 15, 10, 0, 2, 2]);
    f[34..38].copy_from_slice(&[0x9c, 0x40, 0x00, 0x50]);
    f[38..42].copy_from_slice(&1000u32.to_be_bytes());
    f[42..46].copy_from_slice(&7u32.to_be_bytes());
    f[46..50].copy_from_slice(&[0x50, 0x18, 0xff, 0xff]);
    for (i, b) in f[54..].iter_mut().enumerate() {
        *b = (i * 7) as u8;
    }
    let at = parse(&f).expect("a TCP frame");
    fill_ipv4_checksum(&mut f, &at);
    fill_l4_checksum(&mut f, &at);
    f
}

/// `n` segments of one TCP stream, `len` bytes each, as a guest sends a bulk transfer when
/// its NIC does not segment for it (8139too; e1000 or virtio-net with TSO off): sequence
/// numbers and IP IDs one after the other, ACK alone (the frames of [`tcp_frame`] each
/// carry PSH and one sequence number, so none of them follow one another).
fn tcp_stream(len: usize, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let mut f = tcp_frame(len);
            let seq = 1000 + (i * (len - 54)) as u32;
            f[18..20].copy_from_slice(&(0x1234 + i as u16).to_be_bytes());
            f[38..42].copy_from_slice(&seq.to_be_bytes());
            f[47] = 0x10;
            let at = parse(&f).expect("a TCP frame");
            fill_ipv4_checksum(&mut f, &at);
            fill_l4_checksum(&mut f, &at);
            f
        })
        .collect()
}

/// What a driver leaves in the TCP checksum field for offload: the pseudo-header sum (with
/// the TCP length, or without it for e1000's TSO).
fn seed_pseudo(f: &mut [u8], l4_len: Option<usize>) {
    let sum = ones_sum(&f[26..34]) + 6 + l4_len.unwrap_or(0) as u64;
    f[50..52].copy_from_slice(&fold(sum).to_be_bytes());
}

/// A frame for RX: a TCP segment, as a guest receives in a download (e1000 and 8139cp, set
/// up as Linux sets them up, verify its checksums), sent to the broadcast address (every
/// model's filter takes it).
fn rx_frame(len: usize) -> Vec<u8> {
    let mut f = tcp_frame(len);
    f[..6].copy_from_slice(&[0xff; 6]);
    f
}

// ---- the taps ---------------------------------------------------------------------------

/// One tap as the floor measurements and checks see it: a dup of the model's fd (same queue)
/// and a packet socket on the host side.
struct TapSide {
    name: &'static str,
    fd: RawFd,
    vnet: bool,
    sock: RawFd,
}

/// Brings tap `name` up, without IPv6: its router solicitations would mix with the measured
/// frames.
fn bring_up(name: &str) {
    let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/disable_ipv6"), "1");
    let ok = std::process::Command::new("ip")
        .args(["link", "set", name, "up"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        fail(format!("ip link set {name} up"));
    }
}

impl TapSide {
    fn open(name: &'static str, vnet: bool) -> (Tap, TapSide) {
        let tap = Tap::open(name, Some(vnet))
            .unwrap_or_else(|e| fail(format!("tap {name} (vnet_hdr={vnet}): {e}")));
        bring_up(name);
        // SAFETY: dup of the tap's fd, for the floor measurements on the same queue.
        let fd = unsafe { libc::dup(tap.fd()) };
        let sock = injector(name);
        (
            tap,
            TapSide {
                name,
                fd,
                vnet,
                sock,
            },
        )
    }

    /// `frame` as written to / read from this tap (with a zero virtio-net header if it has one).
    fn wire(&self, frame: &[u8]) -> Vec<u8> {
        let mut v = if self.vnet {
            vec![0u8; VNET_HDR_LEN]
        } else {
            vec![]
        };
        v.extend_from_slice(frame);
        v
    }

    /// The kernel's count of frames written into the tap: (packets, bytes, dropped).
    fn counters(&self) -> (u64, u64, u64) {
        let dev = std::fs::read_to_string("/proc/net/dev").unwrap_or_default();
        let prefix = format!("{}:", self.name);
        let line = dev
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| fail(format!("{} missing from /proc/net/dev", self.name)));
        let v: Vec<u64> = line[prefix.len()..]
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        (v[1], v[0], v[3])
    }

    fn drain(&self) {
        let mut buf = vec![0u8; 65_600];
        // SAFETY: reading into a buffer we own; the fd is non-blocking.
        while unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
    }

    fn inject(&self, f: &[u8], n: usize) {
        for _ in 0..n {
            // SAFETY: sending from a buffer we own.
            let r = unsafe { libc::send(self.sock, f.as_ptr().cast(), f.len(), 0) };
            if r as usize != f.len() {
                fail(format!("inject: {}", std::io::Error::last_os_error()));
            }
        }
    }
}

/// A packet socket on the tap's host side: what it sends, the tap's reader receives.
fn injector(ifname: &str) -> RawFd {
    // SAFETY: plain socket/ioctl/bind calls on descriptors and structs we own.
    unsafe {
        let s = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        if s < 0 {
            fail(format!(
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            ));
        }
        let idx = libc::if_nametoindex(std::ffi::CString::new(ifname).unwrap().as_ptr());
        let mut sll: libc::sockaddr_ll = std::mem::zeroed();
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_ifindex = idx as i32;
        let r = libc::bind(
            s,
            (&sll as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        );
        if r != 0 {
            fail(format!("bind: {}", std::io::Error::last_os_error()));
        }
        s
    }
}

// ---- the models -------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Plain,
    Csum,
    Tso,
}

/// One NIC model with its synthetic driver, as the benchmark drives it. "Sends" are frames,
/// or 64 KiB frames in TSO mode.
trait Nic {
    fn name(&self) -> &'static str;
    fn modes(&self) -> &'static [Mode] {
        &[Mode::Plain, Mode::Csum, Mode::Tso]
    }
    /// Guest side: `frames` (TCP frames with valid checksums) prepared as the driver hands
    /// them over in `mode`, to be sent in turn, over and over.
    fn tx_prepare(&mut self, mode: Mode, frames: &[Vec<u8>]);
    /// Sends the TX ring holds at once.
    fn tx_batch(&self) -> usize;
    /// Guest side, untimed: `k` sends put in the ring, no doorbell yet.
    fn tx_queue(&mut self, k: usize);
    /// Timed: the doorbell write(s) that make the model send what was queued, the ack.
    fn tx_kick(&mut self);
    /// [`Nic::tx_kick`] timed on `clock`, for a driver whose guest-side work (filling a
    /// buffer) falls between its doorbells and is left out.
    fn tx_kick_timed(&mut self, clock: &Clock) -> f64 {
        clock.time(|| self.tx_kick())
    }
    /// Guest side, untimed: sends the device completed since the last call.
    fn tx_reclaim(&mut self) -> usize;
    /// Whether a TSO send reaches the tap whole, with a virtio-net header asking the host
    /// kernel to segment it.
    fn passes_gso(&self) -> bool {
        false
    }
    /// Frames the RX ring holds at once.
    fn rx_batch(&self) -> usize;
    /// Timed: the I/O thread's handle(Backend), one turn, as the event loop gives one per
    /// wake-up: it comes back while the tap stays readable (the caller's loop plays that),
    /// and does not read a drained tap again to find it empty.
    fn rx_pump(&mut self);
    /// Guest side, untimed: frames received (each must be `len` bytes), buffers given back.
    fn rx_reclaim(&mut self, len: usize) -> usize;
    fn stats(&self) -> NicStats;
}

fn check_len(model: &str, got: usize, want: usize) {
    if got != want {
        fail(format!(
            "{model} RX: a frame of {got} bytes arrived, {want} were sent"
        ));
    }
}

/// Guest memory for the virtio-net TX buffers, from BUF_BASE[TX] to the end of memory.
const TX_AREA: u64 = 0x8_0000;

struct Virtio {
    d: Driver,
    len: u32,
    /// Where the copies of the frame being sent lie, used in turn.
    tx_addrs: Vec<u64>,
    tx_next: usize,
    tx_used: u16,
    rx_used: u16,
    rx_slot: u64,
}

impl Virtio {
    /// Offloads (CSUM, HOST_TSO4) only where the backend takes them.
    fn new(backend: Box<dyn NetBackend>) -> Virtio {
        let mut features =
            VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MRG_RXBUF;
        if backend.capabilities().vnet_hdr {
            features |= VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4;
        }
        let mut v = Virtio {
            // Queues of 128: more than a burst (64 frames), as a Linux guest's 256 are.
            d: Driver::start_sized(backend, features, RING_ROOM),
            len: 0,
            tx_addrs: vec![],
            tx_next: 0,
            tx_used: 0,
            rx_used: 0,
            rx_slot: 0,
        };
        for _ in 0..v.rx_batch() {
            v.post_rx();
        }
        v
    }

    /// Guest side: the lengths (header included) of the frames received since the last
    /// call, whatever they are, their buffers given back.
    fn rx_take(&mut self) -> Vec<usize> {
        let u = self.d.used_idx(RX);
        let n = u.wrapping_sub(self.rx_used);
        let mut lens = vec![];
        for i in 0..n {
            let e = used_base(RX) + 4 + 8 * (self.rx_used.wrapping_add(i) % RING_ROOM) as u64;
            let got: u32 = self.d.mem.read_obj(GuestAddress(e + 4)).unwrap();
            lens.push(got as usize);
            self.post_rx();
        }
        self.rx_used = u;
        lens
    }

    fn post_rx(&mut self) {
        let addr = BUF_BASE[RX] + self.rx_slot % RING_ROOM as u64 * 2048;
        self.rx_slot += 1;
        self.d.post_at(RX, addr, 2048, true);
    }
}

impl Nic for Virtio {
    fn name(&self) -> &'static str {
        "virtio-net"
    }
    fn tx_prepare(&mut self, mode: Mode, frames: &[Vec<u8>]) {
        let bufs: Vec<Vec<u8>> = frames
            .iter()
            .map(|frame| {
                let mut f = frame.to_vec();
                let mut h = VnetHdr::default();
                if mode != Mode::Plain {
                    h.flags = VIRTIO_NET_HDR_F_NEEDS_CSUM;
                    h.csum_start = 34;
                    h.csum_offset = 16;
                    let l4_len = f.len() - 34;
                    seed_pseudo(&mut f, Some(l4_len));
                }
                if mode == Mode::Tso {
                    h.gso_type = VIRTIO_NET_HDR_GSO_TCPV4;
                    h.hdr_len = 54;
                    h.gso_size = MSS as u16;
                }
                let mut buf = h.to_bytes().to_vec();
                buf.extend_from_slice(&f);
                buf
            })
            .collect();
        // Copies at offsets spread over a page (see Spread), as many as the area holds; the
        // frames in turn (a whole number of rounds of them).
        let stride = bufs[0].len().next_multiple_of(4096) as u64 + 64;
        let mut copies = (TX_AREA / stride).clamp(1, SPREAD as u64);
        if bufs.len() > 1 {
            copies = bufs.len() as u64;
            assert!(
                copies * stride <= TX_AREA,
                "more frames than the TX area holds"
            );
        }
        self.tx_addrs = (0..copies).map(|i| BUF_BASE[TX] + i * stride).collect();
        for (i, &a) in self.tx_addrs.iter().enumerate() {
            let buf = &bufs[i % bufs.len()];
            self.d.mem.write_slice(buf, GuestAddress(a)).unwrap();
        }
        self.len = bufs[0].len() as u32;
    }
    fn tx_batch(&self) -> usize {
        RING_ROOM as usize - 1
    }
    fn tx_queue(&mut self, k: usize) {
        for _ in 0..k {
            let a = self.tx_addrs[self.tx_next % self.tx_addrs.len()];
            self.tx_next += 1;
            self.d.post_at(TX, a, self.len, false);
        }
    }
    fn tx_kick(&mut self) {
        self.d.dev.handle(NetEvent::TxKick);
    }
    fn tx_reclaim(&mut self) -> usize {
        let u = self.d.used_idx(TX);
        let n = u.wrapping_sub(self.tx_used);
        self.tx_used = u;
        n as usize
    }
    fn passes_gso(&self) -> bool {
        true
    }
    fn rx_batch(&self) -> usize {
        RING_ROOM as usize - 1
    }
    fn rx_pump(&mut self) {
        self.d.dev.handle(NetEvent::Backend);
    }
    fn rx_reclaim(&mut self, len: usize) -> usize {
        let u = self.d.used_idx(RX);
        let n = u.wrapping_sub(self.rx_used);
        for i in 0..n {
            let e = used_base(RX) + 4 + 8 * (self.rx_used.wrapping_add(i) % RING_ROOM) as u64;
            let got: u32 = self.d.mem.read_obj(GuestAddress(e + 4)).unwrap();
            check_len(self.name(), got as usize, VNET_HDR_LEN + len);
            self.post_rx();
        }
        self.rx_used = u;
        n as usize
    }
    fn stats(&self) -> NicStats {
        self.d.dev.stats()
    }
}

struct E1000 {
    d: e1000::driver::Driver,
    mode: Mode,
    frames: Vec<Vec<u8>>,
    next: usize,
    tails: Vec<u32>,
}

impl E1000 {
    fn new(backend: Box<dyn NetBackend>) -> E1000 {
        let mut d = e1000::driver::Driver::new(backend);
        d.probe();
        d.open();
        E1000 {
            d,
            mode: Mode::Plain,
            frames: vec![],
            next: 0,
            tails: vec![],
        }
    }
}

impl Nic for E1000 {
    fn name(&self) -> &'static str {
        "e1000"
    }
    fn passes_gso(&self) -> bool {
        true
    }
    fn tx_prepare(&mut self, mode: Mode, frames: &[Vec<u8>]) {
        self.frames = frames
            .iter()
            .map(|frame| {
                let mut f = frame.to_vec();
                match mode {
                    Mode::Plain => {}
                    Mode::Csum => seed_pseudo(&mut f, Some(frame.len() - 34)),
                    Mode::Tso => {
                        // e1000_tso: IP total length and checksum zeroed, TCP length left out.
                        f[16..18].fill(0);
                        f[24..26].fill(0);
                        seed_pseudo(&mut f, None);
                    }
                }
                f
            })
            .collect();
        self.mode = mode;
        self.next = 0;
    }
    fn tx_batch(&self) -> usize {
        let descs = match self.mode {
            Mode::Plain => 1,
            Mode::Csum => 2,
            Mode::Tso => 1 + TSO_LEN.div_ceil(e1000::driver::TX_BUF_SIZE),
        };
        (e1000::driver::RING_SIZE - 1) / descs
    }
    fn tx_queue(&mut self, k: usize) {
        for _ in 0..k {
            let frame = &self.frames[self.next % self.frames.len()];
            self.next += 1;
            match self.mode {
                Mode::Plain => self.d.queue_legacy(frame, None, None),
                Mode::Csum => self.d.queue_csum(frame, 34, 50, true),
                Mode::Tso => self.d.queue_tso(frame, 14, 34, 54, MSS as u16, None),
            }
            self.tails.push(self.d.tx_next() as u32);
        }
    }
    fn tx_kick(&mut self) {
        // One TDT write per frame, as e1000_xmit_frame does without xmit_more; then the I/O
        // thread's turn that the first write asked for (the guest rang the rest before it
        // woke), which hands the frames to the tap.
        for i in 0..self.tails.len() {
            self.d.w_only(e1000::regs::TDT, self.tails[i]);
        }
        self.tails.clear();
        self.d.dev.run_flush_kicks();
        self.d.r(e1000::regs::ICR);
    }
    fn tx_reclaim(&mut self) -> usize {
        self.d.tx_done()
    }
    fn rx_batch(&self) -> usize {
        e1000::driver::RING_SIZE - 1
    }
    fn rx_pump(&mut self) {
        self.d.dev.handle(NetEvent::Backend);
    }
    fn rx_reclaim(&mut self, len: usize) -> usize {
        let frames = self.d.rx_poll();
        let verified = e1000::regs::RXD_STAT_IPCS | e1000::regs::RXD_STAT_TCPCS;
        for f in &frames {
            check_len(self.name(), f.data.len(), len);
            if f.status & verified != verified || f.errors != 0 {
                fail(format!("e1000 RX: checksums not verified good: {f:?}"));
            }
        }
        frames.len()
    }
    fn stats(&self) -> NicStats {
        self.d.dev.stats()
    }
}

/// rtl8139 in C+ mode, driven as 8139cp does.
struct Cp {
    d: rtl8139::driver::Driver,
    mode: Mode,
    frames: Vec<Vec<u8>>,
    next: usize,
    opts1: u32,
}

impl Cp {
    /// The NIC brought up as 8139cp does.
    fn new(backend: Box<dyn NetBackend>) -> Cp {
        let mut d = rtl8139::driver::Driver::new(backend, true);
        d.probe();
        d.open_cp(0);
        Cp {
            d,
            mode: Mode::Plain,
            frames: vec![],
            next: 0,
            opts1: 0,
        }
    }
}

/// 8139cp maps one page per descriptor: a large send takes this many bytes a descriptor.
const CP_FRAG: usize = 4096;

impl Nic for Cp {
    fn name(&self) -> &'static str {
        "rtl8139 C+"
    }
    fn passes_gso(&self) -> bool {
        true
    }
    fn tx_prepare(&mut self, mode: Mode, frames: &[Vec<u8>]) {
        self.mode = mode;
        self.frames = frames.to_vec();
        self.next = 0;
        self.opts1 = match mode {
            Mode::Plain => 0,
            Mode::Csum => TX_IPCS | TX_TCPCS,
            Mode::Tso => TX_LGSEN | (MSS as u32) << TX_MSS_SHIFT,
        };
    }
    fn tx_batch(&self) -> usize {
        let descs = self.frames[0].len().div_ceil(CP_FRAG);
        (rtl8139::driver::CP_RING as usize - 1) / descs
    }
    fn tx_queue(&mut self, k: usize) {
        for _ in 0..k {
            let frame = &self.frames[self.next % self.frames.len()];
            self.next += 1;
            let frags: Vec<&[u8]> = frame.chunks(CP_FRAG).collect();
            self.d.cp_queue(&frags, self.opts1, 0);
        }
    }
    fn tx_kick(&mut self) {
        self.d
            .w_only(rtl8139::TPPOLL, rtl8139::TPPOLL_NPQ as u32, 1);
        // The I/O thread's turn that the doorbell asked for: the frames go to the tap.
        self.d.dev.run_flush_kicks();
        let isr = self.d.r16(rtl8139::ISR);
        self.d.w16(rtl8139::ISR, isr);
    }
    fn tx_reclaim(&mut self) -> usize {
        let done = self.d.cp_tx_done();
        done.iter().filter(|s| *s & DESC_LS != 0).count()
    }
    fn rx_batch(&self) -> usize {
        rtl8139::driver::CP_RING as usize - 1
    }
    fn rx_pump(&mut self) {
        self.d.dev.handle(NetEvent::Backend);
    }
    fn rx_reclaim(&mut self, len: usize) -> usize {
        let frames = self.d.cp_rx();
        use rtl8139::rx::{RX_IPF, RX_PID_TCP, RX_TCPF, RX_UDPF};
        for (status, _, data) in &frames {
            check_len(self.name(), data.len(), len);
            if status & (3 << 16 | RX_IPF | RX_TCPF | RX_UDPF) != RX_PID_TCP {
                fail(format!(
                    "8139cp RX: checksums not verified good: {status:#x}"
                ));
            }
        }
        frames.len()
    }
    fn stats(&self) -> NicStats {
        self.d.dev.stats()
    }
}

/// rtl8139 in normal mode, driven as 8139too does: four TX slots, one RX ring buffer.
struct Too {
    d: rtl8139::driver::Driver,
    len: u32,
    /// The frames sent in turn, when more than one (each copied into its slot before its
    /// TSD write, as rtl8139_start_xmit copies it).
    frames: Vec<Vec<u8>>,
    queued: usize,
    sent: usize,
    reclaimed: usize,
    reported: usize,
}

impl Too {
    /// The NIC brought up as 8139too does.
    fn new(backend: Box<dyn NetBackend>) -> Too {
        let mut d = rtl8139::driver::Driver::new(backend, false);
        d.probe();
        d.open_too(0);
        Too {
            d,
            len: 0,
            frames: vec![],
            queued: 0,
            sent: 0,
            reclaimed: 0,
            reported: 0,
        }
    }

    /// rtl8139_tx_interrupt: ack, then take back every slot sent and not yet reclaimed.
    /// The driver's TX interrupt: the ack and the slots reclaimed (the frames they queued
    /// wait for the I/O thread's turn, which a TSD write asked for).
    fn tx_interrupt(&mut self) {
        let isr = self.d.r16(rtl8139::ISR);
        self.d.w_only(rtl8139::ISR, isr as u32, 2);
        while self.reclaimed < self.sent {
            let tsd = self.d.r32(rtl8139::TSD0 + 4 * (self.reclaimed % 4));
            if tsd & rtl8139::TSD_TOK == 0 {
                fail(format!("8139too TX slot not done: TSD {tsd:#x}"));
            }
            self.reclaimed += 1;
        }
    }
}

impl Nic for Too {
    fn name(&self) -> &'static str {
        "rtl8139 normal"
    }
    fn modes(&self) -> &'static [Mode] {
        &[Mode::Plain]
    }
    fn tx_prepare(&mut self, _: Mode, frames: &[Vec<u8>]) {
        // One frame never changes: copied into the four slot buffers once, not per send.
        for i in 0..4 {
            let at = rtl8139::driver::TOO_TX_BUFS + i * rtl8139::driver::TOO_TX_SLOT;
            self.d
                .mem
                .write_slice(&frames[0], GuestAddress(at))
                .unwrap();
        }
        self.len = frames[0].len() as u32;
        self.frames = if frames.len() > 1 {
            frames.to_vec()
        } else {
            vec![]
        };
    }
    fn tx_batch(&self) -> usize {
        256
    }
    fn tx_queue(&mut self, k: usize) {
        self.queued += k;
    }
    fn tx_kick(&mut self) {
        // rtl8139_start_xmit writes the slot's TSD; with all four slots in flight the
        // queue stops until the TX interrupt reclaims them.
        for _ in 0..std::mem::take(&mut self.queued) {
            if self.sent - self.reclaimed == 4 {
                self.tx_interrupt();
            }
            self.d
                .w_only(rtl8139::TSD0 + 4 * (self.sent % 4), self.len, 4);
            self.sent += 1;
        }
        // The I/O thread's turn that the first TSD write asked for (the guest wrote the
        // rest before it woke): the frames go to the tap.
        self.d.dev.run_flush_kicks();
        self.tx_interrupt();
    }
    fn tx_kick_timed(&mut self, clock: &Clock) -> f64 {
        if self.frames.is_empty() {
            return clock.time(|| self.tx_kick());
        }
        // Each frame copied into its slot (untimed: the guest's copy), then its TSD write.
        let mut ns = 0.0;
        for _ in 0..std::mem::take(&mut self.queued) {
            if self.sent - self.reclaimed == 4 {
                ns += clock.time(|| self.tx_interrupt());
            }
            let slot = self.sent % 4;
            let at = rtl8139::driver::TOO_TX_BUFS + slot as u64 * rtl8139::driver::TOO_TX_SLOT;
            let frame = &self.frames[self.sent % self.frames.len()];
            self.d.mem.write_slice(frame, GuestAddress(at)).unwrap();
            ns += clock.time(|| {
                self.d.w_only(rtl8139::TSD0 + 4 * slot, self.len, 4);
            });
            self.sent += 1;
        }
        ns + clock.time(|| {
            self.d.dev.run_flush_kicks();
            self.tx_interrupt();
        })
    }
    fn tx_reclaim(&mut self) -> usize {
        self.reclaimed - std::mem::replace(&mut self.reported, self.reclaimed)
    }
    fn rx_batch(&self) -> usize {
        // A 32 KiB ring holds 21 full-size frames, and the model takes them in one turn (it
        // took 18 before its room was counted at full-size frames; the bench gave it 16).
        21
    }
    fn rx_pump(&mut self) {
        self.d.dev.handle(NetEvent::Backend);
    }
    fn rx_reclaim(&mut self, len: usize) -> usize {
        let frames = self.d.too_rx();
        for (_, data) in &frames {
            check_len(self.name(), data.len(), len);
        }
        frames.len()
    }
    fn stats(&self) -> NicStats {
        self.d.dev.stats()
    }
}

// ---- measuring --------------------------------------------------------------------------

struct Row {
    model: &'static str,
    dir: &'static str,
    /// Wire frames measured (model and floor each).
    frames: usize,
    model_ns: f64,
    floor_ns: f64,
    /// TSO: wire frames per send.
    per_send: Option<usize>,
}

/// Buffers of `len` bytes at every cache-line offset within a page (64 of them), taken in
/// turn. How fast the kernel copies a frame to or from user memory depends on where the
/// buffer lies against the kernel's side of the copy: on the machine this was written on, a
/// receive buffer 4 KiB-aliased with the kernel's copy of the frame costs ~200 ns more per
/// 1514-byte frame. A floor that always used one buffer was fast or slow by the luck of the
/// heap (one run's floor for a model 30% above the next run's); the port's receive slots,
/// and the outbox e1000 and rtl8139 send from, lie at offsets spread over a page as these.
struct Spread {
    mem: Vec<u8>,
    base: usize,
    stride: usize,
    len: usize,
    next: usize,
}

const SPREAD: usize = 64;

impl Spread {
    fn new(len: usize) -> Spread {
        let stride = len.next_multiple_of(4096) + 4096 / SPREAD;
        let mem = vec![0u8; stride * SPREAD + 4096];
        let base = mem.as_ptr().align_offset(4096);
        Spread {
            mem,
            base,
            stride,
            len,
            next: 0,
        }
    }

    /// Every buffer holding `frame`.
    fn of(frame: &[u8]) -> Spread {
        let mut s = Spread::new(frame.len());
        for _ in 0..SPREAD {
            s.take().copy_from_slice(frame);
        }
        s
    }

    /// The next buffer.
    fn take(&mut self) -> &mut [u8] {
        let at = self.base + self.next % SPREAD * self.stride;
        self.next += 1;
        &mut self.mem[at..at + self.len]
    }
}

/// Bare write() of each of `frames` on the tap, `reps` times: the TX floor.
fn write_all(tap: &TapSide, frames: &mut [Spread], reps: usize) {
    for _ in 0..reps {
        for f in frames.iter_mut() {
            let b = f.take();
            // SAFETY: writing a buffer we own to the tap.
            let r = unsafe { libc::write(tap.fd, b.as_ptr().cast(), b.len()) };
            if r as usize != b.len() {
                fail(format!("tap write: {}", std::io::Error::last_os_error()));
            }
        }
    }
}

/// One bare read() of `n` frames of `want` bytes each: the RX floor.
fn read_all(tap: &TapSide, bufs: &mut Spread, n: usize, want: usize) {
    for _ in 0..n {
        let buf = bufs.take();
        // SAFETY: reading into a buffer we own.
        let r = unsafe { libc::read(tap.fd, buf.as_mut_ptr().cast(), buf.len()) };
        if r as usize != want {
            fail(format!(
                "floor RX on {}: read {r} ({}), expected {want} bytes",
                tap.name,
                std::io::Error::last_os_error()
            ));
        }
    }
}

/// One TX case: `sends` sends of `frames` in turn through the model, each batch followed by
/// the same wire frames written bare (interleaved, so drift hits both alike). Returns (model,
/// floor) ns per wire frame.
///
/// Several frames are a stream's segments (see [`tcp_stream`]): the tap may take runs of them
/// merged into one GSO frame each, and then counts fewer frames than were sent, each with the
/// headers once; its byte count must say exactly that. The floor writes the first segment
/// over and over: the same size, the same cost.
fn tx_case(
    nic: &mut dyn Nic,
    tap: &TapSide,
    clock: &Clock,
    mode: Mode,
    frames: &[Vec<u8>],
    sends: usize,
) -> (f64, f64) {
    let frame = &frames[0];
    let stream = frames.len() > 1;
    let mut wire: Vec<Vec<u8>> = vec![];
    if mode == Mode::Tso {
        let at = parse(frame).expect("TCP");
        let mut scratch = vec![];
        let _ = devices::net::offload::segment_tcp(frame, &at, MSS, &mut scratch, |s| {
            wire.push(s.to_vec());
            Ok::<(), ()>(())
        });
    } else {
        wire.push(frame.to_vec());
    }
    let mut bare: Vec<Spread> = wire.iter().map(|f| Spread::of(&tap.wire(f))).collect();
    let wire_bytes: usize = wire.iter().map(Vec::len).sum();
    let who = format!("{} {mode:?}", nic.name());
    let (tap_frames, tap_bytes) = if mode == Mode::Tso && nic.passes_gso() {
        (1, frame.len())
    } else {
        (wire.len(), wire_bytes)
    };
    nic.tx_prepare(mode, frames);
    let batch = nic.tx_batch();
    let c0 = tap.counters();
    let s0 = nic.stats().tx_frames;
    let (mut ns, mut floor, mut done, mut reclaimed) = (0.0, 0.0, 0, 0);
    while done < sends {
        let k = batch.min(sends - done);
        nic.tx_queue(k);
        ns += nic.tx_kick_timed(clock);
        reclaimed += nic.tx_reclaim();
        floor += clock.time(|| write_all(tap, &mut bare, k));
        done += k;
    }
    if reclaimed != sends {
        fail(format!("{who}: {reclaimed} of {sends} sends completed"));
    }
    let sent = nic.stats().tx_frames - s0;
    if sent != (sends * tap_frames) as u64 {
        fail(format!("{who}: the model counted {sent} frames sent"));
    }
    // The tap saw the model's frames and the floor's.
    let c = tap.counters();
    let (p, b, d) = (c.0 - c0.0, c.1 - c0.1, c.2 - c0.2);
    let mut want = sends * (tap_frames + wire.len());
    let mut want_bytes = sends * (tap_bytes + wire_bytes);
    if stream && p <= want as u64 && p > (sends * wire.len()) as u64 {
        // The model's share of the frames: each carries the headers once, and every
        // segment's payload is in one of them.
        let merged = p as usize - sends * wire.len();
        want = p as usize;
        want_bytes = merged * 54 + sends * (frame.len() - 54) + sends * wire_bytes;
    }
    if p != want as u64 || b != want_bytes as u64 || d != 0 {
        fail(format!(
            "{who} on {}: the tap got {p} frames / {b} bytes ({d} dropped), expected {want} \
             frames / {want_bytes} bytes (model and floor)",
            tap.name
        ));
    }
    let per = (sends * wire.len()) as f64;
    (ns / per, floor / per)
}

/// One RX case: `n` frames injected on the tap's host side and read by the model into its
/// ring, each batch followed by the same frames read bare. Returns (model, floor) ns per
/// frame.
/// RX of `n` frames injected `burst` at a time (at most the ring's room): each burst wakes
/// the model once (its handle(Backend)), which delivers up to RX_BURST frames with one
/// interrupt.
fn rx_case(
    nic: &mut dyn Nic,
    tap: &TapSide,
    clock: &Clock,
    f: &[u8],
    n: usize,
    burst: usize,
) -> (f64, f64) {
    let who = nic.name();
    let batch = nic.rx_batch().min(burst);
    let want = tap.wire(f).len();
    let mut buf = Spread::new(65_536);
    tap.drain();
    let s0 = nic.stats();
    let (mut ns, mut floor, mut done) = (0.0, 0.0, 0);
    while done < n {
        let b = batch.min(n - done);
        tap.inject(f, b);
        let (mut got, mut idle) = (0, 0);
        while got < b {
            ns += clock.time(|| nic.rx_pump());
            let g = nic.rx_reclaim(f.len());
            got += g;
            idle = if g == 0 { idle + 1 } else { 0 };
            if idle == 3 {
                fail(format!(
                    "{who} RX stalled: {} of {n} frames delivered",
                    done + got
                ));
            }
        }
        if got > b {
            fail(format!("{who} RX: {got} frames delivered, {b} injected"));
        }
        tap.inject(f, b);
        floor += clock.time(|| read_all(tap, &mut buf, b, want));
        done += b;
    }
    let s = nic.stats();
    if s.rx_frames - s0.rx_frames != n as u64 || s.rx_dropped != s0.rx_dropped {
        fail(format!(
            "{who} RX: the model counted {} frames delivered, {} dropped; {n} injected",
            s.rx_frames - s0.rx_frames,
            s.rx_dropped - s0.rx_dropped
        ));
    }
    (ns / n as f64, floor / n as f64)
}

fn run_model(
    nic: &mut dyn Nic,
    tap: &TapSide,
    clock: &Clock,
    n: usize,
    len: usize,
    rows: &mut Vec<Row>,
) {
    let small = vec![tcp_frame(len)];
    let big = vec![tcp_frame(TSO_LEN)];
    let stream = tcp_stream(len, SPREAD);
    let segs = (TSO_LEN - 54).div_ceil(MSS);
    let cases = nic.modes().iter().map(|&m| (m, false));
    let streams = nic
        .modes()
        .iter()
        .filter(|&&m| m != Mode::Tso)
        .map(|&m| (m, true));
    for (mode, in_stream) in cases.chain(streams).collect::<Vec<_>>() {
        let (frames, sends, dir) = match (mode, in_stream) {
            (Mode::Plain, false) => (&small, n, "TX"),
            (Mode::Csum, false) => (&small, n, "TX csum"),
            (Mode::Tso, _) => (&big, n.div_ceil(segs), "TX TSO 64K"),
            (Mode::Plain, true) => (&stream, n, "TX stream"),
            (Mode::Csum, true) => (&stream, n, "TX csum stream"),
        };
        let (model_ns, floor_ns) = tx_case(nic, tap, clock, mode, frames, sends);
        let per_send = (mode == Mode::Tso).then_some(segs);
        rows.push(Row {
            model: nic.name(),
            dir,
            frames: sends * per_send.unwrap_or(1),
            model_ns,
            floor_ns,
            per_send,
        });
    }
    for (dir, burst, frames) in [("RX", usize::MAX, n), ("RX 1/wake-up", 1, n / 4)] {
        let (model_ns, floor_ns) = rx_case(nic, tap, clock, &rx_frame(len), frames, burst);
        rows.push(Row {
            model: nic.name(),
            dir,
            frames,
            model_ns,
            floor_ns,
            per_send: None,
        });
    }
}

/// virtio-net on user-mode networking: UDP from the guest to a host loopback socket, and the
/// same datagrams with bare sockets. Returns (model ns, floor ns, delivered, sent).
fn slirp_tx(len: usize, m: usize) -> (f64, f64, usize) {
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status();
    let host = UdpSocket::bind("127.0.0.1:0").expect("udp");
    // Room for a whole ring's batch (127 datagrams, about 3 KiB each as the kernel counts
    // them): with the default 208 KiB a fifth of them were lost before they were read, and
    // the model's CPU was divided among the rest.
    // (SO_RCVBUFFORCE, as root, past net.core.rmem_max; the delivered count shows a loss.)
    let room: libc::c_int = 4 << 20;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: setsockopt reads the int we own, on the socket we own.
        let r = unsafe {
            use std::os::fd::AsRawFd;
            libc::setsockopt(
                host.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&room as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            break;
        }
    }
    let port = host.local_addr().unwrap().port();
    let slirp = SlirpBackend::new(SlirpOptions::default()).expect("slirp");
    let mut v = Virtio::new(Box::new(slirp));
    v.tx_prepare(Mode::Plain, &[udp_frame(len, port)]);
    let batch = v.tx_batch();
    let mut got = 0usize;
    let mut rb = vec![0u8; 65536];
    host.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let t0 = process_cpu();
    let mut posted = 0;
    while posted < m {
        // One batch in flight at a time, as a guest waiting on its socket buffer would be.
        let b = batch.min(m - posted);
        v.tx_queue(b);
        v.tx_kick();
        posted += b;
        let mut in_batch = 0; // a lost datagram costs one 200 ms wait, then is counted missing
        while in_batch < b && host.recv(&mut rb).is_ok() {
            in_batch += 1;
        }
        got += in_batch;
    }
    let model = (process_cpu() - t0).as_nanos() as f64 / got.max(1) as f64;
    // Floor: the same datagrams sent and received with bare sockets on loopback.
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let payload = &udp_frame(len, port)[42..];
    let t0 = process_cpu();
    let mut fgot = 0;
    for _ in 0..m {
        let _ = a.send_to(payload, ("127.0.0.1", port));
        if host.recv(&mut rb).is_ok() {
            fgot += 1;
        }
    }
    let floor = (process_cpu() - t0).as_nanos() as f64 / fgot.max(1) as f64;
    (model, floor, got)
}

/// virtio-net on user-mode networking, the other way: UDP datagrams from a host socket to a
/// `hostfwd=udp:` port, which slirp hands to the guest as `len`-byte frames, into the
/// model's RX ring; the thread waits for them on the backend's fd, as an I/O thread does.
/// The floor as [`slirp_tx`]'s. Returns (model ns, floor ns, delivered).
fn slirp_rx(len: usize, m: usize) -> (f64, f64, usize) {
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("udp")
        .port();
    let fwd = format!("udp:127.0.0.1:{port}-:7")
        .parse()
        .unwrap_or_else(|e| fail(format!("hostfwd: {e}")));
    let opts = SlirpOptions {
        // No router advertisements: every frame the guest gets is one of the datagrams.
        ipv6: false,
        hostfwd: vec![fwd],
        ..SlirpOptions::default()
    };
    let slirp = SlirpBackend::new(opts).unwrap_or_else(|e| fail(format!("slirp: {e}")));
    let mut v = Virtio::new(Box::new(slirp));
    // slirp learns where the guest is from its gratuitous ARP (and answers nothing).
    v.tx_prepare(Mode::Plain, &[gratuitous_arp()]);
    v.tx_queue(1);
    v.tx_kick();
    if v.tx_reclaim() != 1 {
        fail("slirp RX: the guest's ARP was not sent".into());
    }
    let host = UdpSocket::bind("127.0.0.1:0").expect("udp");
    host.connect(("127.0.0.1", port)).expect("udp");
    let payload = vec![0x5au8; len.saturating_sub(42)];
    let mut fds = vec![];
    // Untimed: a datagram through first. The slirp thread may read the forwarded socket
    // before it takes the guest's ARP; then it asks the guest where 10.0.2.15 is (a frame
    // that is not a datagram, skipped here) and may drop the datagram: one is sent every
    // 100 ms until one comes, then what is still on its way is taken.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut through = false;
    while !through && std::time::Instant::now() < deadline {
        let _ = host.send(&payload);
        v.d.dev.backend_interest(0, &mut fds);
        wait_readable(&fds, 100);
        v.rx_pump();
        through = v.rx_take().contains(&(VNET_HDR_LEN + len));
    }
    if !through {
        fail("slirp RX: no datagram came through the forward in 5 s".into());
    }
    loop {
        v.d.dev.backend_interest(0, &mut fds);
        if !wait_readable(&fds, 100) {
            break;
        }
        v.rx_pump();
        v.rx_take();
    }
    // Bursts the forwarded socket's default buffer (208 KiB, about 3 KiB a datagram as the
    // kernel counts them) holds while slirp is yet to read them: a ring's worth overflowed it.
    let batch = v.rx_batch().min(SLIRP_RX_BURST);
    let mut got = 0;
    let t0 = process_cpu();
    let mut sent = 0;
    while sent < m {
        let b = batch.min(m - sent);
        for _ in 0..b {
            let _ = host.send(&payload);
        }
        sent += b;
        // Until the batch is in, or nothing came for 200 ms (then counted missing).
        let mut in_batch = 0;
        while in_batch < b {
            v.d.dev.backend_interest(0, &mut fds);
            if !wait_readable(&fds, 200) {
                break;
            }
            v.rx_pump();
            in_batch += v.rx_reclaim(len);
        }
        got += in_batch;
    }
    let model = (process_cpu() - t0).as_nanos() as f64 / got.max(1) as f64;
    // Floor: the same datagrams sent and received with bare sockets on loopback.
    let a = UdpSocket::bind("127.0.0.1:0").expect("udp");
    let b = UdpSocket::bind("127.0.0.1:0").expect("udp");
    b.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let to = b.local_addr().unwrap();
    let mut rb = vec![0u8; 65536];
    let t0 = process_cpu();
    let mut fgot = 0;
    for _ in 0..m {
        let _ = a.send_to(&payload, to);
        if b.recv(&mut rb).is_ok() {
            fgot += 1;
        }
    }
    let floor = (process_cpu() - t0).as_nanos() as f64 / fgot.max(1) as f64;
    (model, floor, got)
}

/// Waits up to `ms` for one of `fds` to be readable, as an I/O thread's wait does.
fn wait_readable<T>(fds: &[(RawFd, T)], ms: i32) -> bool {
    let mut polls: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, _)| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: poll reads and writes the pollfds we own, as many as we say.
    unsafe { libc::poll(polls.as_mut_ptr(), polls.len() as _, ms) > 0 }
}

/// Datagrams the host sends at once in [`slirp_rx`].
const SLIRP_RX_BURST: usize = 32;

/// A gratuitous ARP from the guest (10.0.2.15, the first address slirp's DHCP gives).
fn gratuitous_arp() -> Vec<u8> {
    let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[10, 0, 2, 15]);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&[10, 0, 2, 15]);
    f.resize(60, 0);
    f
}

/// Reads or writes one io_uring submission carries in [`batched_floor`].
const URING_BATCH: usize = 64;

/// The floor with fewer syscalls than frames: `n` writes of `f` to the tap, then `n` reads of
/// it injected from the host side, [`URING_BATCH`] per `io_uring_enter`, each batch followed
/// by the same frames written or read bare. What batching could take off any model's TX and
/// RX on this host. Returns (direction, io_uring ns, bare ns) per frame for TX and RX; None,
/// said on stderr, where io_uring cannot be had (an older kernel, a sysctl, a seccomp filter).
fn batched_floor(
    side: &TapSide,
    clock: &Clock,
    f: &[u8],
    n: usize,
) -> Option<[(&'static str, f64, f64); 2]> {
    use io_uring::{opcode, types, IoUring};
    let ring = IoUring::builder()
        .setup_single_issuer()
        .setup_coop_taskrun()
        .build(URING_BATCH as u32)
        .and_then(|r| r.submitter().register_files(&[side.fd]).map(|()| r));
    let mut ring: IoUring = match ring {
        Ok(r) => r,
        Err(e) => {
            eprintln!("netbench: no batched floor: io_uring: {e}");
            return None;
        }
    };
    let wire = side.wire(f);
    let (mut wire_u, mut wire_f) = (Spread::of(&wire), [Spread::of(&wire)]);
    // Distinct buffers for the reads of one batch (a Spread has as many as a batch).
    let mut bufs = Spread::new(2048);
    let mut one = Spread::new(65_536);
    // Submits `k` prepared entries and checks every result is a whole frame.
    let run = |ring: &mut IoUring, k: usize| {
        ring.submit_and_wait(k)
            .unwrap_or_else(|e| fail(format!("io_uring_enter: {e}")));
        let mut seen = 0;
        for c in ring.completion() {
            if c.result() != wire.len() as i32 {
                fail(format!(
                    "io_uring on {}: {} for a {}-byte frame",
                    side.name,
                    c.result(),
                    wire.len()
                ));
            }
            seen += 1;
        }
        if seen != k {
            fail(format!("io_uring: {seen} of {k} completions"));
        }
    };
    let (mut tx_u, mut tx_f, mut rx_u, mut rx_f) = (0.0, 0.0, 0.0, 0.0);
    let c0 = side.counters();
    let mut done = 0;
    while done < n {
        let k = URING_BATCH.min(n - done);
        tx_u += clock.time(|| {
            let mut sq = ring.submission();
            for _ in 0..k {
                let w = wire_u.take();
                let e = opcode::Write::new(types::Fixed(0), w.as_ptr(), w.len() as u32).build();
                // SAFETY: `wire_u` outlives the submission, which completes before `run`
                // returns.
                unsafe { sq.push(&e) }.unwrap_or_else(|_| fail("io_uring: queue full".into()));
            }
            drop(sq);
            run(&mut ring, k);
        });
        tx_f += clock.time(|| write_all(side, &mut wire_f, k));
        done += k;
    }
    let c = side.counters();
    if c.0 - c0.0 != 2 * n as u64 {
        fail(format!(
            "{}: the tap got {} frames, expected {}",
            side.name,
            c.0 - c0.0,
            2 * n
        ));
    }
    side.drain();
    done = 0;
    while done < n {
        let k = URING_BATCH.min(n - done);
        side.inject(f, k);
        rx_u += clock.time(|| {
            let mut sq = ring.submission();
            for _ in 0..k {
                let b = bufs.take();
                let e = opcode::Read::new(types::Fixed(0), b.as_mut_ptr(), b.len() as u32).build();
                // SAFETY: `bufs` outlives the submission, which completes before `run` returns.
                unsafe { sq.push(&e) }.unwrap_or_else(|_| fail("io_uring: queue full".into()));
            }
            drop(sq);
            run(&mut ring, k);
        });
        side.inject(f, k);
        rx_f += clock.time(|| read_all(side, &mut one, k, wire.len()));
        done += k;
    }
    let n = n as f64;
    Some([("TX", tx_u / n, tx_f / n), ("RX", rx_u / n, rx_f / n)])
}

// ---- two queue pairs: one I/O thread, or a thread each ------------------------------------

/// Frames per queue in a round of the two-queue case (the queues hold RING_ROOM).
const MQ_FRAMES: usize = 120;

/// A broadcast [`udp_frame`] to `port`: a flow, which a multiqueue tap steers to one of its
/// queues by its hash.
fn flow_frame(len: usize, port: u16) -> Vec<u8> {
    let mut f = udp_frame(len, port);
    f[..6].fill(0xff);
    f
}

/// One direction of the two-queue case: wall-clock ns per frame, median of the rounds, with
/// both queues on one thread and with a thread each; the device's queue workers, and the
/// floor (bare read()/write() of the two tap queues' fds) the same way.
struct Queues {
    dir: &'static str,
    frames: usize,
    one: f64,
    each: f64,
    floor_one: f64,
    floor_each: f64,
}

/// Runs `work` on `groups.len()` threads (each with its group), started together; the wall
/// time from the first start to the last end, in ns per frame of `frames`.
fn side_by_side<G: Send + 'static>(
    groups: Vec<G>,
    frames: usize,
    work: impl Fn(G) + Send + Sync + Clone + 'static,
) -> f64 {
    use std::sync::{Arc, Barrier};
    use std::time::Instant;
    let go = Arc::new(Barrier::new(groups.len() + 1));
    let threads: Vec<_> = groups
        .into_iter()
        .map(|g| {
            let (go, work) = (go.clone(), work.clone());
            std::thread::spawn(move || {
                go.wait();
                let t0 = Instant::now();
                work(g);
                (t0, Instant::now())
            })
        })
        .collect();
    go.wait();
    let spans: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let t0 = spans.iter().map(|s| s.0).min().unwrap();
    let t1 = spans.iter().map(|s| s.1).max().unwrap();
    (t1 - t0).as_nanos() as f64 / frames as f64
}

/// virtio-net's two queue pairs over a two-queue tap, as a guest with two vCPUs uses them:
/// `rounds` rounds each way of MQ_FRAMES frames a queue. RX: frames injected on the host side
/// first (a flow that lands on each tap queue), then taken into the guest's buffers. TX:
/// chains made available and both doorbells rung first, then sent. Each round runs the
/// device's queue workers on one I/O thread (as nicvm ran all queues once) or on a thread
/// each (as it does now), and the floor the same two ways; the four alternate. Every frame is
/// checked (lengths in the RX used rings, the tap's count of frames it got).
fn two_queues(len: usize, rounds: usize) -> [Queues; 2] {
    use devices::net::Nic as Dev;
    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    let name = "nbmq";
    let taps = Tap::open_queues(name, Some(true), 2)
        .unwrap_or_else(|e| fail(format!("two-queue tap {name}: {e}")));
    bring_up(name);
    let side = TapSide {
        name,
        fd: -1,
        vnet: true,
        sock: injector(name),
    };
    // SAFETY: dups of the queues' fds, for the floor and to see where a flow lands.
    let fds: Vec<RawFd> = taps.iter().map(|t| unsafe { libc::dup(t.fd()) }).collect();
    let backends: Vec<Box<dyn NetBackend>> = taps
        .into_iter()
        .map(|t| Box::new(t) as Box<dyn NetBackend>)
        .collect();
    let mut d = Driver::new_mq(backends, true);
    let features = VIRTIO_F_VERSION_1
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_STATUS
        | VIRTIO_NET_F_MRG_RXBUF
        | VIRTIO_NET_F_CTRL_VQ
        | VIRTIO_NET_F_MQ;
    if !d.negotiate(features) {
        fail("two-queue virtio-net refused its features".into());
    }
    d.enable_msix();
    for q in 0..5 {
        d.setup_queue(q, RING_ROOM);
    }
    d.driver_ok();
    // VIRTIO_NET_CTRL_MQ, VQ_PAIRS_SET 2, on the control queue (4).
    if d.ctrl(4, 4, 0, &2u16.to_le_bytes()) != Some(0) {
        fail("two-queue virtio-net refused two queue pairs".into());
    }
    // A flow for each tap queue.
    let mut flows: [Option<Vec<u8>>; 2] = [None, None];
    let mut scratch = vec![0u8; 65_600];
    for port in 1024..1280 {
        let f = flow_frame(len, port);
        side.inject(&f, 1);
        for (q, &fd) in fds.iter().enumerate() {
            // SAFETY: reading into a buffer we own; the fd is non-blocking.
            if unsafe { libc::read(fd, scratch.as_mut_ptr().cast(), scratch.len()) } > 0
                && flows[q].is_none()
            {
                flows[q] = Some(f.clone());
            }
        }
        if flows.iter().all(Option::is_some) {
            break;
        }
    }
    let [Some(f0), Some(f1)] = flows else {
        fail("no flow of 256 landed on each of the tap's two queues".into());
    };
    // Pair i: RX queue 2i with RING_ROOM buffers of 2 KiB in an area of its own; TX queue
    // 2i + 1 with its frame (header and all) at the area's end, made available again and
    // again. The TX frames are flows of their own: a tap steers a flow to the queue that
    // last sent it, which must not move the RX flows.
    let area = [BUF_BASE[RX], TX_AREA];
    let wire = side.wire(&f0);
    let tx_wire = [
        side.wire(&flow_frame(len, 3000)),
        side.wire(&flow_frame(len, 3001)),
    ];
    let tx_at = [0xe_0000u64, 0xf_0000];
    for (at, w) in tx_at.iter().zip(&tx_wire) {
        d.mem.write_slice(w, GuestAddress(*at)).unwrap();
    }
    let mut slot = [0u64; 2];
    let mut post_rx = |d: &mut Driver, i: usize, k: usize| {
        for _ in 0..k {
            let addr = area[i] + slot[i] % RING_ROOM as u64 * 2048;
            slot[i] += 1;
            d.post_at(2 * i, addr, 2048, true);
        }
    };
    post_rx(&mut d, 0, MQ_FRAMES);
    post_rx(&mut d, 1, MQ_FRAMES);
    let mem = d.mem.clone();
    let used_idx = move |q: usize| -> u16 { mem.read_obj(GuestAddress(used_base(q) + 2)).unwrap() };
    let mem = d.mem.clone();
    let nic = Arc::new(Mutex::new(d.lend()));
    let frames = 2 * MQ_FRAMES;
    // [dir][floor][each]
    let mut ns = [
        [[vec![], vec![]], [vec![], vec![]]],
        [[vec![], vec![]], [vec![], vec![]]],
    ];
    for round in 0..8 * rounds {
        let (tx, floor, each) = (round % 8 >= 4, round % 4 >= 2, round % 2 == 1);
        let split = |all: Vec<usize>| -> Vec<Vec<usize>> {
            if each {
                all.into_iter().map(|i| vec![i]).collect()
            } else {
                vec![all]
            }
        };
        let got_before = side.counters().0;
        if !tx {
            for _ in 0..MQ_FRAMES {
                side.inject(&f0, 1);
                side.inject(&f1, 1);
            }
        }
        let t = if floor {
            let fds = fds.clone();
            let tx_wire = tx_wire.clone();
            side_by_side(split(vec![0, 1]), frames, move |pairs: Vec<usize>| {
                let mut buf = vec![0u8; 65_600];
                let t0 = Instant::now();
                for i in pairs {
                    let mut done = 0;
                    while done < MQ_FRAMES {
                        if t0.elapsed() > Duration::from_secs(5) {
                            fail("two-queue floor stalled".into());
                        }
                        // SAFETY: buffers we own; the fds are non-blocking.
                        let r = unsafe {
                            if tx {
                                let w = &tx_wire[i];
                                libc::write(fds[i], w.as_ptr().cast(), w.len())
                            } else {
                                libc::read(fds[i], buf.as_mut_ptr().cast(), buf.len())
                            }
                        };
                        if r > 0 {
                            done += 1;
                        }
                    }
                }
            })
        } else {
            let q_of = move |i: usize| 2 * i + tx as usize;
            let start: Vec<u16> = (0..2).map(|i| used_idx(q_of(i))).collect();
            if tx {
                for (i, (&at, w)) in tx_at.iter().zip(&tx_wire).enumerate() {
                    for _ in 0..MQ_FRAMES {
                        d.post_at(q_of(i), at, w.len() as u32, false);
                    }
                    nic.lock().unwrap().port.kick_tx_of(i);
                }
            }
            let workers: Vec<_> = Dev::workers(&nic).into_iter().map(Some).collect();
            let workers = Arc::new(Mutex::new(workers));
            let (start, used_idx) = (start.clone(), used_idx.clone());
            side_by_side(split(vec![0, 1]), frames, move |pairs: Vec<usize>| {
                let mut em = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
                    .expect("event manager");
                for &i in &pairs {
                    let w = workers.lock().unwrap()[i].take().unwrap();
                    em.add_subscriber(Box::new(w));
                }
                let t0 = Instant::now();
                let done =
                    |i: &usize| used_idx(q_of(*i)).wrapping_sub(start[*i]) as usize >= MQ_FRAMES;
                while !pairs.iter().all(done) {
                    if t0.elapsed() > Duration::from_secs(5) {
                        let got: Vec<u16> = pairs
                            .iter()
                            .map(|&i| used_idx(q_of(i)).wrapping_sub(start[i]))
                            .collect();
                        fail(format!(
                            "two-queue virtio-net {} stalled: {got:?} of {MQ_FRAMES} a queue",
                            if tx { "TX" } else { "RX" }
                        ));
                    }
                    let _ = em.run_with_timeout(100);
                }
            })
        };
        ns[tx as usize][floor as usize][each as usize].push(t);
        if tx {
            let got = side.counters().0 - got_before;
            if got != frames as u64 {
                fail(format!(
                    "two-queue TX: the tap got {got} frames, {frames} sent"
                ));
            }
        } else if !floor {
            for i in 0..2 {
                let q = 2 * i;
                let end = used_idx(q);
                for k in 0..MQ_FRAMES as u16 {
                    let at = end.wrapping_sub(MQ_FRAMES as u16).wrapping_add(k);
                    let e = used_base(q) + 4 + 8 * (at % RING_ROOM) as u64;
                    let n: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
                    check_len("virtio-net (two queues)", n as usize, wire.len());
                }
                post_rx(&mut d, i, MQ_FRAMES);
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut out = ns.map(|mut dir| Queues {
        dir: "",
        frames: frames * rounds,
        one: median(&mut dir[0][0]),
        each: median(&mut dir[0][1]),
        floor_one: median(&mut dir[1][0]),
        floor_each: median(&mut dir[1][1]),
    });
    out[0].dir = "RX";
    out[1].dir = "TX";
    out
}

fn main() {
    let mut json = false;
    let mut quick = false;
    let mut user = false;
    let mut slirp_only = false;
    let mut nums = vec![];
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--json" => json = true,
            "--quick" => quick = true,
            "--user" => user = true,
            "--slirp" => slirp_only = true,
            _ => match a.parse::<usize>() {
                Ok(v) => nums.push(v),
                Err(_) => {
                    eprintln!(
                        "usage: netbench [--quick] [--json] [--user | --slirp] [FRAMES] [FRAME_LEN]"
                    );
                    std::process::exit(1);
                }
            },
        }
    }
    let n = nums
        .first()
        .copied()
        .unwrap_or(if quick { 3000 } else { 200_000 })
        .max(1);
    let len = nums.get(1).copied().unwrap_or(1514).clamp(60, 1514);
    if user {
        let clock = Clock::calibrate();
        let own = own_work(&clock, n, len);
        if json {
            println!(
                "{{\n  \"frame_len\": {len},\n  \"own_work\": {}\n}}",
                own_work_json(&own)
            );
        } else {
            print_own_work(&own, &clock, len);
        }
        return;
    }
    // SAFETY: unshare only changes this process's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        eprintln!(
            "netbench: needs root to make a private network namespace: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
    if slirp_only {
        let m = n.min(50_000);
        print_slirp(m, len, slirp_tx(len, m), slirp_rx(len, m));
        return;
    }
    let clock = Clock::calibrate();
    let mut rows = vec![];
    // All taps up front: a tap's first moments after "link up" are slower to write to.
    let [t0, t1, t2, t3, t4] = [
        ("nb0", true),
        ("nb1", true),
        ("nb2", true),
        ("nb3", true),
        ("nb4", true),
    ]
    .map(|(name, vnet)| TapSide::open(name, vnet));
    std::thread::sleep(Duration::from_millis(500));
    let (tap, side) = t0;

    run_model(
        &mut Virtio::new(Box::new(tap)),
        &side,
        &clock,
        n,
        len,
        &mut rows,
    );
    let (tap, side) = t1;
    run_model(
        &mut E1000::new(Box::new(tap)),
        &side,
        &clock,
        n,
        len,
        &mut rows,
    );
    let (tap, side) = t2;
    run_model(
        &mut Cp::new(Box::new(tap)),
        &side,
        &clock,
        n,
        len,
        &mut rows,
    );
    let (tap, side) = t3;
    run_model(
        &mut Too::new(Box::new(tap)),
        &side,
        &clock,
        n,
        len,
        &mut rows,
    );

    let mq = two_queues(len, (n / (2 * MQ_FRAMES)).clamp(10, 200));
    let m = n.min(50_000);
    let (slirp, udp_floor, got) = slirp_tx(len, m);
    let (slirp_in, udp_floor_in, got_in) = slirp_rx(len, m);
    let (_tap, side) = t4;
    let batched = batched_floor(&side, &clock, &rx_frame(len), n);
    let own = own_work(&clock, n, len);

    if json {
        let items: Vec<String> = rows
            .iter()
            .map(|r| {
                let send = r.per_send.map_or(String::new(), |k| {
                    format!(
                        ", \"frames_per_send\": {k}, \"ns_per_send_model\": {:.0}, \
                         \"ns_per_send_floor\": {:.0}",
                        r.model_ns * k as f64,
                        r.floor_ns * k as f64
                    )
                });
                format!(
                    "    {{\"model\": \"{}\", \"direction\": \"{}\", \"frames\": {}, \
                     \"ns_per_frame_model\": {:.0}, \"ns_per_frame_floor\": {:.0}, \
                     \"ratio\": {:.3}{send}}}",
                    r.model,
                    r.dir,
                    r.frames,
                    r.model_ns,
                    r.floor_ns,
                    r.model_ns / r.floor_ns
                )
            })
            .collect();
        println!("{{\n  \"frame_len\": {len},\n  \"mss\": {MSS},\n  \"tso_len\": {TSO_LEN},");
        println!("  \"clock_overhead_ns\": {:.0},", clock.overhead);
        println!("  \"rows\": [\n{}\n  ],", items.join(",\n"));
        let b: Vec<String> = batched
            .iter()
            .flatten()
            .map(|b| {
                format!(
                    "    {{\"direction\": \"{}\", \"frames\": {n}, \"batch\": {URING_BATCH}, \
                     \"ns_per_frame_uring\": {:.0}, \"ns_per_frame_floor\": {:.0}, \
                     \"ratio\": {:.3}}}",
                    b.0,
                    b.1,
                    b.2,
                    b.1 / b.2
                )
            })
            .collect();
        println!("  \"uring_floor\": [\n{}\n  ],", b.join(",\n"));
        println!("  \"own_work\": {},", own_work_json(&own));
        let q: Vec<String> = mq
            .iter()
            .map(|q| {
                format!(
                    "    {{\"model\": \"virtio-net\", \"direction\": \"{}\", \"queues\": 2, \
                     \"frames\": {}, \"ns_per_frame_one_thread\": {:.0}, \
                     \"ns_per_frame_thread_each\": {:.0}, \"ratio\": {:.3}, \
                     \"floor_ns_per_frame_one_thread\": {:.0}, \
                     \"floor_ns_per_frame_thread_each\": {:.0}, \"floor_ratio\": {:.3}}}",
                    q.dir,
                    q.frames,
                    q.one,
                    q.each,
                    q.each / q.one,
                    q.floor_one,
                    q.floor_each,
                    q.floor_each / q.floor_one
                )
            })
            .collect();
        println!("  \"queues\": [\n{}\n  ],", q.join(",\n"));
        println!(
            "  \"slirp\": {{\"model\": \"virtio-net\", \"direction\": \"TX udp via slirp\", \
             \"frames\": {m}, \"delivered\": {got}, \"ns_per_frame_model\": {slirp:.0}, \
             \"ns_per_frame_floor\": {udp_floor:.0}, \"ratio\": {:.3}}},",
            slirp / udp_floor
        );
        println!(
            "  \"slirp_rx\": {{\"model\": \"virtio-net\", \"direction\": \"RX udp via slirp\", \
             \"frames\": {m}, \"delivered\": {got_in}, \"ns_per_frame_model\": {slirp_in:.0}, \
             \"ns_per_frame_floor\": {udp_floor_in:.0}, \"ratio\": {:.3}}}\n}}",
            slirp_in / udp_floor_in
        );
        return;
    }
    println!(
        "NIC models on a tap, host CPU ns per wire frame (thread CPU of the model's share; \
         clock cost {:.0} ns subtracted)",
        clock.overhead
    );
    println!(
        "{len}-byte frames; TSO: {TSO_LEN}-byte TCP sends cut at MSS {MSS}; floor = bare \
         write()/read() of the same wire frames on the same tap"
    );
    println!("| model | direction | frames | ns/frame model | ns/frame floor | ratio | ns/send model | ns/send floor |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let send = r.per_send.map_or(" | ".to_string(), |k| {
            format!(
                "{:.0} | {:.0}",
                r.model_ns * k as f64,
                r.floor_ns * k as f64
            )
        });
        println!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.2} | {send} |",
            r.model,
            r.dir,
            r.frames,
            r.model_ns,
            r.floor_ns,
            r.model_ns / r.floor_ns
        );
    }
    println!();
    print_own_work(&own, &clock, len);
    if let Some(batched) = &batched {
        println!();
        println!(
            "The floor's syscalls batched: the same frames through io_uring, {URING_BATCH} per \
             io_uring_enter (registered fd), interleaved with the bare floor"
        );
        println!("| direction | frames | ns/frame io_uring | ns/frame floor | ratio |");
        println!("|---|---|---|---|---|");
        for (dir, uring, floor) in batched {
            println!(
                "| {dir} | {n} | {uring:.0} | {floor:.0} | {:.2} |",
                uring / floor
            );
        }
    }
    println!();
    println!(
        "virtio-net on two queue pairs (a two-queue tap, {MQ_FRAMES} frames a queue a round): \
         wall-clock ns per frame, median of the rounds"
    );
    println!("| direction | reader | frames | one thread | a thread each | ratio |");
    println!("|---|---|---|---|---|---|");
    for q in &mq {
        println!(
            "| {} | virtio-net's queue workers | {} | {:.0} | {:.0} | {:.2} |",
            q.dir,
            q.frames,
            q.one,
            q.each,
            q.each / q.one
        );
        println!(
            "| {} | floor: read()/write() of each queue | {} | {:.0} | {:.0} | {:.2} |",
            q.dir,
            q.frames,
            q.floor_one,
            q.floor_each,
            q.floor_each / q.floor_one
        );
    }
    println!();
    print_slirp(
        m,
        len,
        (slirp, udp_floor, got),
        (slirp_in, udp_floor_in, got_in),
    );
}

/// The user-mode networking rows: (model ns, floor ns, delivered) each way, of `m` frames.
fn print_slirp(m: usize, len: usize, tx: (f64, f64, usize), rx: (f64, f64, usize)) {
    println!(
        "virtio-net on user (libslirp): UDP between the ring and a host loopback socket, {m} \
         frames of {len} bytes each way,"
    );
    println!("process CPU (all threads) ns/frame; floor = bare UDP send + recv on loopback");
    println!("| path | model + slirp | bare sockets (floor) | ratio | delivered |");
    println!("|---|---|---|---|---|");
    let (slirp, udp_floor, got) = tx;
    println!(
        "| TX (ring -> slirp -> host socket) | {slirp:.0} | {udp_floor:.0} | {:.2} | {got}/{m} |",
        slirp / udp_floor
    );
    let (slirp_in, udp_floor_in, got_in) = rx;
    println!(
        "| RX (host socket -> hostfwd -> slirp -> ring) | {slirp_in:.0} | {udp_floor_in:.0} | \
         {:.2} | {got_in}/{m} |",
        slirp_in / udp_floor_in
    );
}

/// A backend that makes no system calls (the port's eventfd kicks remain), for the models'
/// own share of the work (`--user`): it takes every frame sent (counting them) and hands
/// over `pending` copies of one frame. The frame is copied into a receive slot only the
/// first time the slot is used; after that the slot still holds it (models read received
/// frames, never write them: the checks on every delivered frame would see it otherwise).
/// Its counters are shared with the bench's thread, the only one there is (so loads and
/// stores, not read-modify-writes).
struct Canned {
    frame: Vec<u8>,
    pending: Arc<AtomicUsize>,
    sent: Arc<[AtomicU64; 2]>,
    filled: Vec<bool>,
    ready: vmm_sys_util::eventfd::EventFd,
}

impl Canned {
    fn take(&self) -> bool {
        let n = self.pending.load(Relaxed);
        self.pending.store(n.saturating_sub(1), Relaxed);
        n > 0
    }
}

impl NetBackend for Canned {
    fn capabilities(&self) -> net_backends::Capabilities {
        net_backends::Capabilities {
            vnet_hdr: true,
            offloads: net_backends::Offloads::ALL,
        }
    }
    fn send(&mut self, frame: &[std::io::IoSlice<'_>]) -> std::io::Result<()> {
        let len: usize = frame.iter().map(|s| s.len()).sum();
        let [n, b] = &*self.sent;
        n.store(n.load(Relaxed) + 1, Relaxed);
        b.store(b.load(Relaxed) + len as u64, Relaxed);
        Ok(())
    }
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        if !self.take() {
            return Ok(None);
        }
        let n = self.frame.len().min(buf.len());
        buf[..n].copy_from_slice(&self.frame[..n]);
        Ok(Some(self.frame.len()))
    }
    fn recv_batch(
        &mut self,
        slab: &mut [u8],
        slot: usize,
        n: usize,
        frames: &mut Vec<(usize, usize)>,
    ) -> std::io::Result<()> {
        for i in 0..n.min(slab.len() / slot) {
            if !self.take() {
                break;
            }
            if self.filled.len() <= i {
                self.filled.resize(i + 1, false);
            }
            if !std::mem::replace(&mut self.filled[i], true) {
                slab[i * slot..i * slot + self.frame.len()].copy_from_slice(&self.frame);
            }
            frames.push((i, self.frame.len()));
        }
        Ok(())
    }
    fn fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.ready.as_raw_fd()
    }
}

/// The models' own work per frame, measured on [`Canned`]: TX, TX with checksum offload,
/// RX in bursts and RX one frame per wake-up (as `run_model`'s cases, with nothing to
/// compare with: this is what a model adds to the syscalls of the floor).
struct OwnWork {
    model: &'static str,
    ns: [Option<f64>; 4],
}

const OWN_WORK_CASES: [&str; 4] = ["TX", "TX csum", "RX", "RX 1/wake-up"];

fn own_work(clock: &Clock, n: usize, len: usize) -> Vec<OwnWork> {
    let rx = rx_frame(len);
    let tx = tcp_frame(len);
    let mut wire = vec![0u8; VNET_HDR_LEN];
    wire.extend_from_slice(&rx);
    let mut rows = vec![];
    for which in 0..4 {
        let pending = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let sent_now = || [sent[0].load(Relaxed), sent[1].load(Relaxed)];
        let backend = Box::new(Canned {
            frame: wire.clone(),
            pending: pending.clone(),
            sent: sent.clone(),
            filled: vec![],
            ready: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        });
        let mut nic: Box<dyn Nic> = match which {
            0 => Box::new(Virtio::new(backend)),
            1 => Box::new(E1000::new(backend)),
            2 => Box::new(Cp::new(backend)),
            _ => Box::new(Too::new(backend)),
        };
        let mut ns = [None; 4];
        for (i, mode) in [Mode::Plain, Mode::Csum].into_iter().enumerate() {
            if !nic.modes().contains(&mode) {
                continue;
            }
            nic.tx_prepare(mode, std::slice::from_ref(&tx));
            let batch = nic.tx_batch();
            let (s0, mut t, mut done) = (sent_now(), 0.0, 0);
            while done < n {
                let k = batch.min(n - done);
                nic.tx_queue(k);
                t += clock.time(|| nic.tx_kick());
                if nic.tx_reclaim() != k {
                    fail(format!(
                        "{} own work: a TX batch did not complete",
                        nic.name()
                    ));
                }
                done += k;
            }
            let s = sent_now();
            if s[0] - s0[0] != n as u64 || s[1] - s0[1] != (n * (VNET_HDR_LEN + len)) as u64 {
                fail(format!(
                    "{} own work: {} frames sent",
                    nic.name(),
                    s[0] - s0[0]
                ));
            }
            ns[i] = Some(t / n as f64);
        }
        for (i, (burst, frames)) in [(usize::MAX, n), (1, n.div_ceil(4))]
            .into_iter()
            .enumerate()
        {
            let batch = nic.rx_batch().min(burst);
            let (mut t, mut done) = (0.0, 0);
            while done < frames {
                let b = batch.min(frames - done);
                pending.store(b, Relaxed);
                let mut got = 0;
                while got < b {
                    t += clock.time(|| nic.rx_pump());
                    let g = nic.rx_reclaim(len);
                    if g == 0 {
                        fail(format!("{} own work: RX stalled", nic.name()));
                    }
                    got += g;
                }
                done += b;
            }
            if nic.stats().rx_dropped != 0 {
                fail(format!("{} own work: frames dropped", nic.name()));
            }
            ns[2 + i] = Some(t / frames as f64);
        }
        rows.push(OwnWork {
            model: nic.name(),
            ns,
        });
    }
    rows
}

/// The own-work rows as a JSON array (ns per frame by case; a case a model lacks left out).
fn own_work_json(rows: &[OwnWork]) -> String {
    let o: Vec<String> = rows
        .iter()
        .map(|r| {
            let cells: Vec<String> = OWN_WORK_CASES
                .iter()
                .zip(&r.ns)
                .filter_map(|(case, v)| Some(format!("\"{case}\": {:.0}", (*v)?)))
                .collect();
            format!(
                "    {{\"model\": \"{}\", \"ns_per_frame\": {{{}}}}}",
                r.model,
                cells.join(", ")
            )
        })
        .collect();
    format!("[\n{}\n  ]", o.join(",\n"))
}

fn print_own_work(rows: &[OwnWork], clock: &Clock, len: usize) {
    println!(
        "The models' own work: host CPU ns per {len}-byte frame on a backend that makes no \
         system calls (the same drivers and cases; the port's eventfd kicks remain; thread \
         CPU, clock cost {:.0} ns subtracted)",
        clock.overhead
    );
    println!("| model | {} |", OWN_WORK_CASES.join(" | "));
    println!("|---|---|---|---|---|");
    for r in rows {
        let cells: Vec<String> =
            r.ns.iter()
                .map(|v| v.map_or(String::new(), |v| format!("{v:.0}")))
                .collect();
        println!("| {} | {} |", r.model, cells.join(" | "));
    }
}
