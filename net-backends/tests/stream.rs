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
    assert!(wait_link(&mut [&mut s], true, Duration::from_secs(5)));
    exchange(&mut s, &mut c, 1);

    drop(c);
    assert!(
        wait_link(&mut [&mut s], false, Duration::from_secs(5)),
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
        wait_link(&mut [&mut s], true, Duration::from_secs(5)),
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
    assert!(wait_link(&mut [&mut s], true, Duration::from_secs(5)));
    exchange(&mut s, &mut c, 1);
    drop(s);
    assert!(!path.exists(), "the server removes its socket file");
    assert!(wait_link(&mut [&mut c], false, Duration::from_secs(5)));
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
    .unwrap()
    .to_string();
    assert!(e.contains("none.sock"), "{e}");
    // With reconnect it starts down and comes up once the server appears.
    let mut c = client(
        StreamAddr::Unix(path.clone()),
        Some(Duration::from_millis(100)),
    );
    assert!(!c.link_up());
    // Its timer wakes it every 100 ms, and nothing else.
    assert_idle(
        &mut c,
        Duration::from_millis(250),
        Some(Duration::from_millis(100)),
    );
    let mut s = server(StreamAddr::Unix(path.clone()));
    assert!(wait_link(
        &mut [&mut c, &mut s],
        true,
        Duration::from_secs(5)
    ));
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
    assert!(wait_link(&mut [&mut s], true, Duration::from_secs(5)));
    exchange(&mut s, &mut c, 1);
    drop(s);
    assert!(wait_link(&mut [&mut c], false, Duration::from_secs(5)));
    let d = c.dropped();
    for i in 0..3 {
        send(&mut c, &frame(2, i, 100));
    }
    assert_eq!(c.dropped(), d + 3);
    assert_idle(
        &mut c,
        Duration::from_millis(400),
        Some(Duration::from_millis(200)),
    );
    let mut s = server(StreamAddr::Unix(path.clone()));
    assert!(
        wait_link(&mut [&mut c, &mut s], true, Duration::from_secs(5)),
        "reconnected"
    );
    exchange(&mut s, &mut c, 2);
}

#[test]
fn frames_split_across_reads_and_several_in_one_read() {
    let (mut s, a) = tcp_server();
    let mut raw = TcpStream::connect(a).unwrap();
    raw.set_nodelay(true).unwrap();
    assert!(wait_link(&mut [&mut s], true, Duration::from_secs(5)));
    let f1 = frame(9, 1, 1000);
    let f2 = frame(9, 2, 60);
    let f3 = frame(9, 3, 300);
    let mut wire = vec![];
    for f in [&f1, &f2, &vec![], &f3] {
        wire.extend_from_slice(&(f.len() as u32).to_be_bytes());
        wire.extend_from_slice(f);
    }
    // The first frame dribbles in (its length header split too); the others (an empty one
    // among them, which is no frame for the guest) arrive together.
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
    assert!(wait_for(Duration::from_secs(5), || {
        recv_within(&mut s, Duration::from_millis(50)).is_none() && !s.link_up()
    }));
    // The peer is told at once, not when the backend next has an event.
    raw.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(raw.read(&mut [0u8; 1]).unwrap(), 0, "the connection ended");
    assert_quiet(&mut s, Duration::from_millis(100));
}

#[test]
fn a_slow_peer_blocks_sends_and_partial_writes_complete_whole_frames() {
    let (mut s, a) = tcp_server();
    let mut raw = TcpStream::connect(a).unwrap();
    assert!(wait_link(&mut [&mut s], true, Duration::from_secs(5)));
    // Nobody reads: sends must end up blocked (WouldBlock, and no room reported), never
    // silently lose frames. A frame the socket took part of is finished when there is room
    // again; keep going until that stalls.
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
                if turn(&mut s, false, true, Duration::from_millis(300)) == 0 {
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
    // The NIC model hears of link changes at its backend's events: the listening socket
    // reports the peer, the server accepts it in `ready`, and the link is up right then,
    // before the peer sends anything.
    let (mut s, a) = tcp_server();
    assert_quiet(&mut s, Duration::from_millis(100));
    let _raw = TcpStream::connect(a).unwrap();
    assert_eq!(
        turn(&mut s, true, false, Duration::from_secs(5)),
        1,
        "no event for the new peer"
    );
    assert!(s.link_up(), "accepted in ready");
    let mut buf = vec![0u8; MAX_FRAME];
    assert_eq!(s.recv(&mut buf).unwrap(), None, "no frame yet");
    assert_quiet(&mut s, Duration::from_millis(100));
}

/// QEMU's framing of `frames`.
fn wire(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut w = vec![];
    for f in frames {
        w.extend_from_slice(&(f.len() as u32).to_be_bytes());
        w.extend_from_slice(f);
    }
    w
}

#[test]
fn a_peer_that_hangs_up_while_the_guest_has_no_room_still_delivers() {
    let dir = TempDir::new("stream-hup");
    let path = dir.path().join("s.sock");
    for unix in [true, false] {
        let (mut s, mut peer): (StreamBackend, Box<dyn Write>) = if unix {
            let s = server(StreamAddr::Unix(path.clone()));
            let raw = std::os::unix::net::UnixStream::connect(&path).unwrap();
            (s, Box::new(raw))
        } else {
            let (s, a) = tcp_server();
            (s, Box::new(TcpStream::connect(a).unwrap()))
        };
        assert!(wait_link(&mut [&mut s], true, Duration::from_secs(5)));
        let frames: Vec<Vec<u8>> = (0..3).map(|i| frame(5, i, 200 + i as usize)).collect();
        let mut w = wire(&frames);
        w.extend_from_slice(&[0, 0, 1]); // the start of a frame that never comes
        peer.write_all(&w).unwrap();
        drop(peer);
        // The guest takes nothing (rx off): the hang-up alone is reported, and the backend
        // lets go of the connection (`turn` checks it is no longer watched).
        assert!(
            wait_link(&mut [&mut s], false, Duration::from_secs(5)),
            "unix {unix}: no link down"
        );
        for f in &frames {
            assert!(
                recv(&mut s) == *f,
                "unix {unix}: a frame sent before the hang-up"
            );
        }
        assert_quiet(&mut s, Duration::from_millis(100));
    }
}

#[test]
fn frames_left_after_a_burst_bring_the_loop_back() {
    // 100 frames in one read; the port takes at most 64 per event. The rest wait in the
    // backend with the socket drained: the backend must still have an event for them.
    let (mut s, a) = tcp_server();
    let mut raw = TcpStream::connect(a).unwrap();
    assert!(wait_link(&mut [&mut s], true, Duration::from_secs(5)));
    let frames: Vec<Vec<u8>> = (0..100).map(|i| frame(6, i, 60)).collect();
    raw.write_all(&wire(&frames)).unwrap();
    assert_eq!(turn(&mut s, true, false, Duration::from_secs(5)), 1);
    let mut buf = vec![0u8; MAX_FRAME];
    let mut got = vec![];
    for _ in 0..64 {
        let n = s.recv(&mut buf).unwrap().expect("a frame of the burst");
        got.push(buf[..n].to_vec());
    }
    // Whatever has not been read from the socket yet keeps it readable; what has been read
    // keeps the backlog readable. Either way: an event.
    while got.len() < frames.len() {
        assert_ne!(
            turn(&mut s, true, false, Duration::from_millis(500)),
            0,
            "{} frames wait and nothing says so",
            frames.len() - got.len()
        );
        while let Some(n) = s.recv(&mut buf).unwrap() {
            got.push(buf[..n].to_vec());
        }
    }
    assert!(got == frames, "frames lost or reordered");
    assert_quiet(&mut s, Duration::from_millis(100));
}

#[test]
fn a_tcp_client_reconnects_without_blocking() {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = client(
        StreamAddr::Inet(vec![addr]),
        Some(Duration::from_millis(100)),
    );
    assert!(!c.link_up(), "nobody listens yet");
    assert_idle(
        &mut c,
        Duration::from_millis(250),
        Some(Duration::from_millis(100)),
    );
    for round in 1..=2 {
        let mut s = server(StreamAddr::Inet(vec![addr]));
        assert!(
            wait_link(&mut [&mut c, &mut s], true, Duration::from_secs(5)),
            "round {round}: not reconnected"
        );
        exchange(&mut s, &mut c, round);
        drop(s);
        assert!(wait_link(&mut [&mut c], false, Duration::from_secs(5)));
    }
}

#[test]
fn a_peer_leaving_while_sends_are_blocked_unblocks_them() {
    // The frontend waits for room (tx); the connection goes away instead. It must still be
    // told it can send (the frames are then dropped and counted), or it waits for ever.
    let (mut s, a) = tcp_server();
    let raw = TcpStream::connect(a).unwrap();
    assert!(wait_link(&mut [&mut s], true, Duration::from_secs(5)));
    let f = frame(1, 1, 60_000);
    let mut n = 0;
    while s.send(&[IoSlice::new(&f)]).is_ok() {
        n += 1;
        assert!(n < 20_000, "never blocked");
    }
    drop(raw);
    let end = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        assert!(
            std::time::Instant::now() < end,
            "no room reported after the peer left"
        );
        turn(&mut s, false, true, Duration::from_millis(100));
        if !s.link_up() {
            break;
        }
    }
    assert_ne!(
        turn(&mut s, false, true, Duration::from_millis(500)),
        0,
        "room for a frontend waiting on a connection that is gone"
    );
    let d = s.dropped();
    s.send(&[IoSlice::new(&f)]).unwrap();
    assert_eq!(s.dropped(), d + 1);
    assert_quiet(&mut s, Duration::from_millis(100));
}
