//! Stream backends talking to each other (and to raw sockets) through the kernel.

mod common;

use common::*;
use net_backends::stream::{StreamAddr, StreamBackend, StreamOptions};
use net_backends::{NetBackend, MAX_FRAME};
use std::io::{IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

fn server(addr: StreamAddr) -> StreamBackend {
    StreamBackend::new(&StreamOptions {
        addr,
        server: true,
        reconnect: None,
    })
    .unwrap()
}

fn client(addr: StreamAddr, reconnect: Option<Duration>) -> StreamBackend {
    StreamBackend::new(&StreamOptions {
        addr,
        server: false,
        reconnect,
    })
    .unwrap()
}

fn tcp_server() -> (StreamBackend, SocketAddr) {
    let s = server(StreamAddr::Inet(vec!["127.0.0.1:0".parse().unwrap()]));
    let a = s.local_addr().unwrap();
    (s, a)
}

#[test]
fn tcp_listen_connect_pair_and_a_new_peer_after_the_first_leaves() {
    let (mut s, a) = tcp_server();
    assert!(!s.link_up(), "a server without a peer is down");
    let mut c = client(StreamAddr::Inet(vec![a]), None);
    assert!(c.link_up());
    assert!(wait_for(Duration::from_secs(5), || s.link_up()));
    exchange(&mut s, &mut c, 1);

    drop(c);
    assert!(
        wait_for(Duration::from_secs(5), || !s.link_up()),
        "peer gone: link down"
    );
    let before = s.dropped();
    send(&mut s, &frame(1, 7, 100));
    send(&mut s, &frame(1, 8, 100));
    assert_eq!(
        s.dropped(),
        before + 2,
        "frames sent while down are counted"
    );
    assert_quiet(&mut s, Duration::from_millis(300));

    let mut c = client(StreamAddr::Inet(vec![a]), None);
    assert!(
        wait_for(Duration::from_secs(5), || s.link_up()),
        "the next peer is accepted"
    );
    exchange(&mut s, &mut c, 2);
}

#[test]
fn unix_stream_pair_and_the_socket_file_goes_with_the_server() {
    let dir = TempDir::new("stream-unix");
    let path = dir.path().join("s.sock");
    let mut s = server(StreamAddr::Unix(path.clone()));
    let mut c = client(StreamAddr::Unix(path.clone()), None);
    assert!(wait_for(Duration::from_secs(5), || s.link_up()));
    exchange(&mut s, &mut c, 1);
    drop(s);
    assert!(!path.exists(), "the server removes its socket file");
    assert!(wait_for(Duration::from_secs(5), || !c.link_up()));
    let d = c.dropped();
    send(&mut c, &frame(2, 1, 60));
    assert_eq!(c.dropped(), d + 1);
    assert_quiet(&mut c, Duration::from_millis(300));
}

#[test]
fn client_without_a_server_fails_unless_it_may_reconnect() {
    let dir = TempDir::new("stream-nopeer");
    let path = dir.path().join("none.sock");
    let e = StreamBackend::new(&StreamOptions {
        addr: StreamAddr::Unix(path.clone()),
        server: false,
        reconnect: None,
    })
    .err()
    .unwrap();
    assert!(e.contains("none.sock"), "{e}");
    // With reconnect it starts down and comes up once the server appears.
    let mut c = client(
        StreamAddr::Unix(path.clone()),
        Some(Duration::from_millis(100)),
    );
    assert!(!c.link_up());
    assert_quiet(&mut c, Duration::from_millis(250));
    let mut s = server(StreamAddr::Unix(path.clone()));
    assert!(wait_for(Duration::from_secs(5), || c.link_up() && s.link_up()));
    exchange(&mut s, &mut c, 1);
}

#[test]
fn client_reconnects_after_the_server_restarts() {
    let dir = TempDir::new("stream-reconnect");
    let path = dir.path().join("s.sock");
    let mut s = server(StreamAddr::Unix(path.clone()));
    let mut c = client(
        StreamAddr::Unix(path.clone()),
        Some(Duration::from_millis(200)),
    );
    assert!(wait_for(Duration::from_secs(5), || s.link_up()));
    exchange(&mut s, &mut c, 1);
    drop(s);
    assert!(wait_for(Duration::from_secs(5), || !c.link_up()));
    let d = c.dropped();
    for i in 0..3 {
        send(&mut c, &frame(2, i, 100));
    }
    assert_eq!(c.dropped(), d + 3);
    assert_quiet(&mut c, Duration::from_millis(400));
    let mut s = server(StreamAddr::Unix(path.clone()));
    assert!(
        wait_for(Duration::from_secs(5), || c.link_up() && s.link_up()),
        "reconnected"
    );
    exchange(&mut s, &mut c, 2);
}

#[test]
fn frames_split_across_reads_and_several_in_one_read() {
    let (mut s, a) = tcp_server();
    let mut raw = TcpStream::connect(a).unwrap();
    raw.set_nodelay(true).unwrap();
    assert!(wait_for(Duration::from_secs(5), || s.link_up()));
    let f1 = frame(9, 1, 1000);
    let f2 = frame(9, 2, 60);
    let f3 = frame(9, 3, 300);
    let mut wire = vec![];
    for f in [&f1, &f2, &f3] {
        wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
        wire.extend_from_slice(f);
    }
    // The first frame dribbles in (its length header split too); the other two arrive
    // together.
    let first = 4 + f1.len();
    for piece in wire[..4].chunks(1).chain(wire[4..first].chunks(300)) {
        raw.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    raw.write_all(&wire[first..]).unwrap();
    assert_eq!(recv(&mut s), f1);
    assert_eq!(recv(&mut s), f2);
    assert_eq!(recv(&mut s), f3);

    // The other way: the raw peer sees QEMU's framing.
    let f = frame(1, 4, 777);
    send(&mut s, &f);
    let mut hdr = [0u8; 4];
    raw.read_exact(&mut hdr).unwrap();
    assert_eq!(u32::from_be_bytes(hdr) as usize, f.len());
    let mut got = vec![0u8; f.len()];
    raw.read_exact(&mut got).unwrap();
    assert_eq!(got, f);

    // A length no frame can have ends the connection.
    raw.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes())
        .unwrap();
    assert!(wait_for(Duration::from_secs(5), || !s.link_up()));
}

#[test]
fn a_slow_peer_blocks_sends_and_partial_writes_complete_whole_frames() {
    let (mut s, a) = tcp_server();
    let mut raw = TcpStream::connect(a).unwrap();
    assert!(wait_for(Duration::from_secs(5), || s.link_up()));
    // Nobody reads: sends must end up blocked (WouldBlock, fd not writable), never silently
    // lose frames. (Right after a WouldBlock the relay may still be moving frames into the
    // socket's buffer, making room again; keep going until it stalls.)
    let mut sent = vec![];
    let mut seq = 0u32;
    loop {
        assert!(
            seq < 20_000,
            "sends never blocked against a peer that does not read"
        );
        let f = frame(1, seq, 60_000 + (seq as usize % 7) * 111);
        match s.send(&[IoSlice::new(&f[..30]), IoSlice::new(&f[30..])]) {
            Ok(()) => {
                sent.push(f);
                seq += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if poll_fd(s.fd(), libc::POLLOUT, Duration::from_millis(300)) == 0 {
                    break;
                }
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(s.dropped(), 0);
    let reader = std::thread::spawn(move || {
        let mut got = vec![];
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        loop {
            let mut hdr = [0u8; 4];
            if raw.read_exact(&mut hdr).is_err() {
                return got;
            }
            let mut f = vec![0u8; u32::from_be_bytes(hdr) as usize];
            raw.read_exact(&mut f).unwrap();
            let last = f.len() == 100;
            got.push(f);
            if last {
                return got;
            }
        }
    });
    assert_ne!(
        poll_fd(s.fd(), libc::POLLOUT, Duration::from_secs(5)),
        0,
        "writable again"
    );
    let end = frame(1, 999_999, 100);
    send(&mut s, &end);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), sent.len() + 1);
    for (g, w) in got.iter().zip(&sent) {
        assert!(g == w, "a frame arrived damaged or out of order");
    }
}

#[test]
fn a_server_tells_the_nic_when_a_peer_connects() {
    // The NIC model hears of link changes only through its backend fd: accepting a peer
    // must make it readable even before the peer sends anything.
    let (mut s, a) = tcp_server();
    assert_quiet(&mut s, Duration::from_millis(100));
    let _raw = TcpStream::connect(a).unwrap();
    let r = poll_fd(s.fd(), libc::POLLIN, Duration::from_secs(5));
    assert_ne!(r & libc::POLLIN, 0, "no event for the new peer");
    assert!(s.link_up());
    let mut buf = vec![0u8; MAX_FRAME];
    assert_eq!(s.recv(&mut buf).unwrap(), None, "the nudge is not a frame");
}
