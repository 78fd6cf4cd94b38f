//! The user network's TCP as a guest sees it, with a small TCP receiver standing in for the
//! guest: what a guest's retransmitted handshake segment does to a connection that is
//! already carrying data.
//!
//! A guest that is slow to see the last segment of a handshake (a loaded host, an emulated
//! CPU) sends its SYN or SYN-ACK again. libslirp (4.7) re-reads the MSS option of every SYN
//! segment and re-sizes the connection's buffers on it, throwing away what they held: a
//! transfer from the host lost up to 128 KiB in its middle and ended with a normal FIN.

mod common;

use common::{recv_within, send};
use net_backends::csum::{fold, ones_sum};
use net_backends::slirp::{HostFwd, SlirpBackend, SlirpOptions};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const GUEST_PORT: u16 = 5001;
const SYN: u8 = 0x02;
const RST: u8 = 0x04;
const ACK: u8 = 0x10;
const FIN: u8 = 0x01;

/// The checksum field's value for these bytes (pseudo-header included by the caller).
fn checksum(parts: &[&[u8]]) -> u16 {
    !fold(parts.iter().map(|p| ones_sum(p)).sum())
}

/// An Ethernet frame from the guest to slirp's gateway MAC (slirp takes any unicast).
fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x52, 0x55, 10, 0, 2, 2];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn arp(op: u16, tha: [u8; 6], tpa: Ipv4Addr) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&GUEST_MAC);
    a.extend_from_slice(&GUEST_IP.octets());
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa.octets());
    let mut f = eth(0x0806, &a);
    if op == 1 {
        f[..6].copy_from_slice(&[0xff; 6]);
    }
    f
}

/// A TCP segment from the guest's port to `peer` on 10.0.2.2.
fn tcp(peer: u16, flags: u8, seq: u32, ack: u32, options: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&GUEST_PORT.to_be_bytes());
    t.extend_from_slice(&peer.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.push((((20 + options.len()) / 4) << 4) as u8);
    t.push(flags);
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(options);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&GUEST_IP.octets());
    pseudo.extend_from_slice(&HOST_IP.octets());
    pseudo.extend_from_slice(&[0, 6]);
    pseudo.extend_from_slice(&(t.len() as u16).to_be_bytes());
    let c = checksum(&[&pseudo, &t]);
    t[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + t.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&GUEST_IP.octets());
    ip.extend_from_slice(&HOST_IP.octets());
    let c = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&t);
    eth(0x0800, &ip)
}

/// A TCP segment slirp sent to the guest's port.
struct Segment {
    peer: u16,
    flags: u8,
    seq: u32,
    ack: u32,
    payload: Vec<u8>,
}

fn parse(f: &[u8]) -> Option<Segment> {
    if f.len() < 54 || f[12..14] != [8, 0] || f[23] != 6 {
        return None;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 15) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let t = ip.get(ihl..total)?;
    let doff = usize::from(t[12] >> 4) * 4;
    if u16::from_be_bytes([t[2], t[3]]) != GUEST_PORT || t.len() < doff {
        return None;
    }
    Some(Segment {
        peer: u16::from_be_bytes([t[0], t[1]]),
        flags: t[13],
        seq: u32::from_be_bytes([t[4], t[5], t[6], t[7]]),
        ack: u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
        payload: t[doff..].to_vec(),
    })
}

/// The guest's side of one connection: receives in order, acknowledges every segment, and
/// sends `again` (its handshake segment) once more after the first 32 KiB.
struct Receiver {
    peer: u16,
    snd_nxt: u32,
    rcv_nxt: u32,
    got: Vec<u8>,
    fin: bool,
    again: Option<Vec<u8>>,
}

impl Receiver {
    fn segment(&mut self, b: &mut SlirpBackend, s: Segment) {
        assert_eq!(s.flags & RST, 0, "slirp reset the connection");
        if s.seq == self.rcv_nxt {
            self.got.extend_from_slice(&s.payload);
            self.rcv_nxt = self.rcv_nxt.wrapping_add(s.payload.len() as u32);
            if s.flags & FIN != 0 {
                self.rcv_nxt = self.rcv_nxt.wrapping_add(1);
                self.fin = true;
            }
        }
        if !s.payload.is_empty() || s.flags & FIN != 0 {
            send(b, &tcp(self.peer, ACK, self.snd_nxt, self.rcv_nxt, &[]));
        }
        if self.got.len() >= 32 << 10 {
            if let Some(f) = self.again.take() {
                send(b, &f);
            }
        }
    }
}

/// 256 KiB in which no 64 KiB stretch repeats (a hole shows in the bytes too).
fn data() -> Vec<u8> {
    (0..256u32 << 10)
        .map(|i| (i.wrapping_mul(0x9e37_79b1) >> 24) as u8 ^ (i >> 16) as u8)
        .collect()
}

/// A user network whose ARP table knows the guest (slirp learns it from the guest's ARP
/// request for the gateway).
fn network(hostfwd: Vec<HostFwd>) -> SlirpBackend {
    let mut b = SlirpBackend::new(SlirpOptions {
        hostfwd,
        ..SlirpOptions::default()
    })
    .expect("slirp");
    send(&mut b, &arp(1, [0; 6], HOST_IP));
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < end, "no ARP reply from slirp");
        if let Some(f) = recv_within(&mut b, Duration::from_millis(200)) {
            if f[12..14] == [8, 6] && f[20..22] == [0, 2] {
                return b;
            }
        }
    }
}

/// Runs the guest until slirp's FIN (or 30 s): answers ARP, hands segments to `on_tcp`.
fn run(b: &mut SlirpBackend, mut on_tcp: impl FnMut(&mut SlirpBackend, Segment) -> bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while Instant::now() < end {
        let Some(f) = recv_within(b, Duration::from_millis(100)) else {
            continue;
        };
        if f.len() >= 42
            && f[12..14] == [8, 6]
            && f[20..22] == [0, 1]
            && f[38..42] == [10, 0, 2, 15]
        {
            let sha: [u8; 6] = f[22..28].try_into().unwrap();
            send(b, &arp(2, sha, Ipv4Addr::new(f[28], f[29], f[30], f[31])));
            continue;
        }
        if let Some(s) = parse(&f) {
            if on_tcp(b, s) {
                return;
            }
        }
    }
    panic!("the transfer did not end within 30 s");
}

/// The host writes 256 KiB, shuts its side and waits for the guest's end.
fn host_writes(mut s: TcpStream) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        s.write_all(&data()).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
        let _ = s.read(&mut [0u8; 16]);
    })
}

const MSS_1460: [u8; 4] = [2, 4, 0x05, 0xb4];

/// A hostfwd connection: slirp opens it to the guest, the guest's SYN-ACK comes twice.
#[test]
fn a_repeated_syn_ack_loses_no_data() {
    let port = common::free_port();
    let mut b = network(vec![HostFwd {
        udp: false,
        host_addr: Ipv4Addr::LOCALHOST,
        host_port: port,
        guest_addr: GUEST_IP,
        guest_port: GUEST_PORT,
    }]);
    let host = host_writes(TcpStream::connect(("127.0.0.1", port)).unwrap());
    let iss = 0x1000_0000u32;
    let mut r: Option<Receiver> = None;
    run(&mut b, |b, s| match &mut r {
        None => {
            assert_eq!(
                s.flags & (SYN | ACK),
                SYN,
                "slirp's first segment is its SYN"
            );
            let synack = tcp(s.peer, SYN | ACK, iss, s.seq.wrapping_add(1), &MSS_1460);
            send(b, &synack);
            r = Some(Receiver {
                peer: s.peer,
                snd_nxt: iss.wrapping_add(1),
                rcv_nxt: s.seq.wrapping_add(1),
                got: Vec::new(),
                fin: false,
                again: Some(synack),
            });
            false
        }
        Some(r) => {
            r.segment(b, s);
            r.fin
        }
    });
    let r = r.unwrap();
    assert!(r.again.is_none(), "the SYN-ACK was not sent again");
    assert_eq!(r.got.len(), 256 << 10, "bytes the guest received");
    assert!(r.got == data(), "the bytes differ");
    drop(b);
    host.join().unwrap();
}

/// A connection the guest opens to the host: its SYN comes twice while the host's data is
/// on its way to the guest.
#[test]
fn a_repeated_syn_loses_no_data() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut b = network(vec![]);
    let iss = 0x2000_0000u32;
    let syn = tcp(port, SYN, iss, 0, &MSS_1460);
    send(&mut b, &syn);
    let host = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        host_writes(s).join().unwrap();
    });
    let mut r = Receiver {
        peer: port,
        snd_nxt: iss.wrapping_add(1),
        rcv_nxt: 0,
        got: Vec::new(),
        fin: false,
        again: Some(syn),
    };
    let mut established = false;
    run(&mut b, |b, s| {
        if !established {
            assert_eq!(
                s.flags & (SYN | ACK),
                SYN | ACK,
                "slirp answers with SYN-ACK"
            );
            assert_eq!(s.ack, iss.wrapping_add(1));
            established = true;
            r.rcv_nxt = s.seq.wrapping_add(1);
            send(b, &tcp(port, ACK, r.snd_nxt, r.rcv_nxt, &[]));
            return false;
        }
        if s.flags & SYN != 0 {
            // slirp's answer to the repeated SYN repeats its SYN-ACK: acknowledge it again.
            send(b, &tcp(port, ACK, r.snd_nxt, r.rcv_nxt, &[]));
            return false;
        }
        r.segment(b, s);
        r.fin
    });
    assert!(r.again.is_none(), "the SYN was not sent again");
    assert_eq!(r.got.len(), 256 << 10, "bytes the guest received");
    assert!(r.got == data(), "the bytes differ");
    drop(b);
    host.join().unwrap();
}
