//! Datagram backends talking to each other through the kernel: Unix, UDP unicast and UDP
//! multicast on the loopback interface.

mod common;

use common::*;
use net_backends::dgram::{DgramBackend, DgramOptions};
use net_backends::NetBackend;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

#[test]
fn unix_dgram_pair_and_a_peer_that_comes_and_goes() {
    let dir = TempDir::new("dgram-unix");
    let pa = dir.path().join("a.sock");
    let pb = dir.path().join("b.sock");
    let mut a = DgramBackend::new(&DgramOptions::Unix {
        local: pa.clone(),
        remote: pb.clone(),
    })
    .unwrap();
    assert!(a.link_up(), "connectionless: always up");
    // Nobody at b yet: the frame is lost, and counted.
    send(&mut a, &frame(1, 1, 60));
    assert_eq!(a.dropped(), 1);
    let mut b = DgramBackend::new(&DgramOptions::Unix {
        local: pb.clone(),
        remote: pa.clone(),
    })
    .unwrap();
    exchange(&mut a, &mut b, 1);
    // A burst larger than the kernel's datagram queue: back-pressure, not loss.
    let frames: Vec<Vec<u8>> = (0..200).map(|i| frame(1, 1000 + i, 1514)).collect();
    let reader = {
        let n = frames.len();
        std::thread::spawn(move || {
            let mut got = vec![];
            while got.len() < n {
                got.push(recv(&mut b));
            }
            (b, got)
        })
    };
    for f in &frames {
        send(&mut a, f);
    }
    let (b, got) = reader.join().unwrap();
    assert!(got == frames, "burst arrived damaged, reordered or short");
    assert_eq!(a.dropped(), 1);

    // b goes away and comes back at the same path: a recovers.
    drop(b);
    assert!(!pb.exists(), "b removed its socket file");
    send(&mut a, &frame(1, 2, 60));
    assert_eq!(a.dropped(), 2);
    assert_quiet(&mut a, Duration::from_millis(200));
    let mut b = DgramBackend::new(&DgramOptions::Unix {
        local: pb.clone(),
        remote: pa.clone(),
    })
    .unwrap();
    exchange(&mut a, &mut b, 2);
}

#[test]
fn udp_unicast_pair_on_loopback() {
    let (pa, pb) = (free_port(), free_port());
    let la: SocketAddr = format!("127.0.0.1:{pa}").parse().unwrap();
    let lb: SocketAddr = format!("127.0.0.1:{pb}").parse().unwrap();
    let mut a = DgramBackend::new(&DgramOptions::Udp {
        local: la,
        remote: lb,
    })
    .unwrap();
    let mut b = DgramBackend::new(&DgramOptions::Udp {
        local: lb,
        remote: la,
    })
    .unwrap();
    assert_eq!(a.local_addr(), Some(la));
    exchange(&mut a, &mut b, 1);
}

#[test]
fn udp_multicast_pair_on_loopback() {
    let port = free_port();
    let group = SocketAddrV4::new(Ipv4Addr::new(239, 255, 77, 13), port);
    let open = || {
        DgramBackend::new(&DgramOptions::Mcast {
            group,
            localaddr: Some(Ipv4Addr::LOCALHOST),
        })
    };
    let mut a = match open() {
        Ok(a) => a,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("multicast on lo: {e}");
            }
            eprintln!("!!!!!!!!!! SKIPPED: multicast on lo is not available here: {e} !!!!!!!!!!");
            return;
        }
    };
    let mut b = open().unwrap();
    for (i, len) in [60usize, 1514, 9000].into_iter().enumerate() {
        let f = frame(1, i as u32, len);
        send(&mut a, &f);
        // Every member sees every frame, the sender's own included.
        assert!(recv(&mut b) == f, "a -> b, {len} bytes");
        assert!(recv(&mut a) == f, "a sees its own frame");
        let f = frame(2, i as u32, len);
        send(&mut b, &f);
        assert!(recv(&mut a) == f, "b -> a, {len} bytes");
        assert!(recv(&mut b) == f);
    }
}
