//! The user network's address resolution as a guest sees it: a datagram from the host to a
//! guest slirp does not know the MAC of yet waits for the guest's answer to slirp's ARP
//! request, and goes out as soon as the answer is in.

mod common;

use common::{recv_within, send};
use net_backends::slirp::{HostFwd, SlirpBackend, SlirpOptions};
use net_backends::NetBackend;
use std::net::{Ipv4Addr, UdpSocket};
use std::time::{Duration, Instant};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
const ETH_ARP: [u8; 2] = [0x08, 0x06];
const ETH_IPV4: [u8; 2] = [0x08, 0x00];

/// The guest's ARP reply to slirp's request for GUEST_IP (`to`: the asker's MAC).
fn arp_reply(to: [u8; 6]) -> Vec<u8> {
    let mut f = to.to_vec();
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&ETH_ARP);
    f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&GUEST_IP.octets());
    f.extend_from_slice(&to);
    f.extend_from_slice(&HOST_IP.octets());
    f
}

#[test]
fn a_datagram_waiting_for_the_guests_arp_goes_when_the_answer_comes() {
    let port = common::free_port();
    let fwd: HostFwd = format!("udp:127.0.0.1:{port}-:7").parse().unwrap();
    let mut slirp = SlirpBackend::new(SlirpOptions {
        ipv6: false,
        hostfwd: vec![fwd],
        ..SlirpOptions::default()
    })
    .expect("slirp");
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    host.send_to(b"before the guest spoke", ("127.0.0.1", port))
        .unwrap();

    // slirp does not know where the guest is: it asks.
    let ask = recv_within(&mut slirp, Duration::from_secs(5)).expect("slirp's ARP request");
    assert_eq!(ask[12..14], ETH_ARP, "an ARP frame first: {ask:02x?}");
    assert_eq!(ask[20..22], [0, 1], "a request");
    assert_eq!(ask[38..42], GUEST_IP.octets(), "for the guest's address");
    let asker: [u8; 6] = ask[6..12].try_into().unwrap();

    send(&mut slirp as &mut dyn NetBackend, &arp_reply(asker));
    let answered = Instant::now();
    let frame = recv_within(&mut slirp, Duration::from_secs(3))
        .expect("the datagram, once the guest answered");
    let took = answered.elapsed();
    assert_eq!(frame[12..14], ETH_IPV4, "{frame:02x?}");
    assert_eq!(frame[..6], GUEST_MAC, "to the MAC the guest gave");
    assert!(frame.ends_with(b"before the guest spoke"), "{frame:02x?}");
    // Not held until slirp's next timer (up to a second, after which the datagram's wait
    // for an answer has expired and it is dropped): the answer sends it.
    assert!(
        took < Duration::from_millis(500),
        "sent {took:?} after the answer"
    );
}
