//! The user network's DHCP as a guest sees it: what `-netdev user`'s naming options put in
//! libslirp's offer (the client's host name, the domain, the TFTP server's name, the boot
//! file), read out of the frame slirp sends back to a guest's DHCPDISCOVER.

mod common;

use common::{recv_within, send};
use net_backends::slirp::{SlirpBackend, SlirpOptions};
use net_backends::NetBackend;
use std::time::Duration;

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
/// Where the BOOTP message starts in a frame: Ethernet, IPv4 without options, UDP.
const BOOTP: usize = 14 + 20 + 8;
/// Where a BOOTP message's options start (after its fixed part and the magic cookie).
const OPTIONS: usize = 236 + 4;

/// A DHCPDISCOVER from a guest that has no address yet, as a frame.
fn discover() -> Vec<u8> {
    let mut bootp = vec![0u8; 236];
    bootp[0] = 1; // BOOTREQUEST
    bootp[1] = 1; // Ethernet
    bootp[2] = 6;
    bootp[4..8].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    bootp[28..34].copy_from_slice(&GUEST_MAC);
    bootp.extend_from_slice(&[99, 130, 83, 99]); // the magic cookie
    bootp.extend_from_slice(&[53, 1, 1]); // DHCPDISCOVER
    bootp.extend_from_slice(&[55, 4, 1, 3, 12, 15]); // asks for these
    bootp.push(255);

    let udp_len = (8 + bootp.len()) as u16;
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&GUEST_MAC);
    f.extend_from_slice(&[0x08, 0x00]);
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255]);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let sum = !(sum as u16);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&68u16.to_be_bytes());
    f.extend_from_slice(&67u16.to_be_bytes());
    f.extend_from_slice(&udp_len.to_be_bytes());
    f.extend_from_slice(&[0, 0]); // no UDP checksum
    f.extend_from_slice(&bootp);
    f
}

/// The options of a DHCP reply frame, each code with its bytes.
fn options(reply: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = vec![];
    let mut at = BOOTP + OPTIONS;
    while let Some(&code) = reply.get(at) {
        match code {
            0 => at += 1,
            255 => break,
            _ => {
                let len = usize::from(reply[at + 1]);
                out.push((code, reply[at + 2..at + 2 + len].to_vec()));
                at += 2 + len;
            }
        }
    }
    out
}

/// slirp's answer to a DHCPDISCOVER (its DHCPOFFER), from a user network with `opts`.
fn offer(opts: SlirpOptions) -> Vec<u8> {
    let mut slirp = SlirpBackend::new(SlirpOptions {
        ipv6: false,
        ..opts
    })
    .expect("slirp");
    send(&mut slirp as &mut dyn NetBackend, &discover());
    let reply = recv_within(&mut slirp, Duration::from_secs(5)).expect("a DHCP offer");
    assert_eq!(
        reply[BOOTP + 28..BOOTP + 34],
        GUEST_MAC,
        "for the guest: {reply:02x?}"
    );
    assert_eq!(reply[BOOTP + 236..BOOTP + 240], [99, 130, 83, 99]);
    assert_eq!(reply[BOOTP + 16..BOOTP + 20], [10, 0, 2, 15], "yiaddr");
    reply
}

#[test]
fn the_offer_carries_the_names_the_options_give() {
    let reply = offer(SlirpOptions {
        hostname: Some("guest-one".into()),
        domainname: Some("example.test".into()),
        tftp_server_name: Some("tftp.example.test".into()),
        bootfile: Some("pxelinux.0".into()),
        ..SlirpOptions::default()
    });
    let opts = options(&reply);
    let get = |code: u8| {
        opts.iter()
            .find(|(c, _)| *c == code)
            .map(|(_, v)| v.as_slice())
    };
    assert_eq!(get(53), Some(&[2u8][..]), "a DHCPOFFER");
    assert_eq!(get(12), Some(&b"guest-one"[..]), "host name: {opts:?}");
    assert_eq!(get(15), Some(&b"example.test"[..]), "domain: {opts:?}");
    assert_eq!(
        get(66),
        Some(&b"tftp.example.test"[..]),
        "TFTP server: {opts:?}"
    );
    // The boot file goes in BOOTP's own `file` field, NUL-padded.
    let file = &reply[BOOTP + 108..BOOTP + 236];
    assert!(file.starts_with(b"pxelinux.0\0"), "{file:02x?}");
}

#[test]
fn without_the_options_the_offer_names_nothing() {
    let reply = offer(SlirpOptions::default());
    let codes: Vec<u8> = options(&reply).iter().map(|(c, _)| *c).collect();
    for code in [12, 15, 66] {
        assert!(!codes.contains(&code), "option {code} in {codes:?}");
    }
    assert!(reply[BOOTP + 108..BOOTP + 236].iter().all(|&b| b == 0));
}
