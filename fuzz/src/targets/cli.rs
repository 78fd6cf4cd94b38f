//! The command line as a user (or a script gone wrong) types it: real options with mangled
//! values, QEMU keyval syntax with stray commas and repeated keys, random words and bytes that
//! are not UTF-8. Parsing (and everything checked before anything opens) must answer with an
//! error, never a panic.

use crate::harness::{op, Target};
use crate::rng::Rng;
use serde::{Deserialize, Serialize};
use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum CliOp {
    /// One whole command line, each argument as bytes.
    Parse(Vec<super::Bytes>),
}

pub struct Cli;

/// Options besides those that take a value (nicvm's own list, [`nicvm::cli::VALUE_OPTIONS`]):
/// flags, and forms QEMU users type or mistype.
const FLAGS: &[&str] = &[
    "-nographic",
    "-no-reboot",
    "-enable-kvm",
    "--version",
    "-h",
    "-daemonize",
    "-nodefaults",
    "-snapshot",
    "-S",
    "--m",
    "-",
];

const WORDS: &[&str] = &[
    "unix:/tmp/nicvm-fuzz.sock,server,nowait",
    "tcp::4444,server=on,wait=off",
    "tcp:127.0.0.1:4444,server=on",
    "socket,id=m,path=/tmp/m,server=on,wait=off",
    "chardev=m",
    "chardev:m",
    "mode=control",
    "mon:stdio",
    "pty",
    "help",
    "model=help",
    "vlan=0",
    "vlan=1",
    "dump",
    "sockets=2",
    "cores=0",
    "maxcpus=3",
    "q35,accel=kvm",
    "accel=tcg",
    "host,-arch-capabilities",
    "max,+avx512f,sse4_1=off",
    "host,tsc-deadline=maybe",
    "host,-bogus",
    "host,+mpx,enforce",
    "max,check=off,enforce=maybe,migratable=no",
    "file:/tmp/nicvm-fuzz.console",
    "-no-user-config",
    "vhost=on",
    "queues=2",
    "sndbuf=1k",
    "mrg_rxbuf=off",
    "vectors=2",
    "vectors=0",
    "mq=on",
    "ctrl_vq=off",
    "csum=off",
    "host_tso4=off",
    "guest_csum=no",
    "guest_ecn=maybe",
    "gso=on",
    "queues=17",
    "bus=pci.0",
    "romfile=",
    "disable-legacy=off",
    "user",
    "tap",
    "vde",
    "socket",
    "stream",
    "dgram",
    "bridge",
    "br=br0",
    "br=a/b",
    "helper=/usr/lib/qemu/qemu-bridge-helper",
    "helper=",
    "nic",
    "none",
    "e1000",
    "rtl8139",
    "virtio-net-pci",
    "filter-dump",
    "id=n0",
    "id=n1",
    "netdev=n0",
    "netdev=n1",
    "mac=52:54:00:12:34:56",
    "mac=+2:54:00:12:34:56",
    "mac=ff:ff:ff:ff:ff:ff",
    "addr=3",
    "addr=0x1f",
    "addr=20",
    "addr=3.1",
    "addr=0x3.0x0",
    "cplus=off",
    "hostfwd=tcp::2222-:22",
    "hostfwd=udp:127.0.0.1:1-:2",
    "guestfwd=tcp:10.0.2.100:80-cmd:true",
    "net=10.0.2.0/24",
    "net=10.0.2.0/33",
    "dhcpstart=10.0.2.15",
    "restrict=on",
    "restrict=y",
    "tftp-server-name=tftp.example",
    "ifname=tap0",
    "script=no",
    "downscript=no",
    "fd=3",
    "fd=99",
    "vnet_hdr=on",
    "sock=/tmp/x",
    "port=99999",
    "mode=0777",
    "listen=:1234",
    "connect=127.0.0.1:1",
    "mcast=230.0.0.1:1234",
    "udp=127.0.0.1:2",
    "localaddr=127.0.0.1:3",
    "addr.type=unix",
    "addr.path=/tmp/s",
    "server=on",
    "reconnect=1",
    "remote.type=inet",
    "remote.host=230.0.0.1",
    "remote.port=1",
    "local.type=unix",
    "file=/tmp/x.pcap",
    "maxlen=0",
    "model=e1000",
    "model=help",
    "help",
    "vlan=0",
    "name=x",
    "cpus=2",
    "sockets=2",
    "cores=0",
    "threads=99",
    "1G",
    "0",
    "-1",
    "99999999999999999999T",
    "stdio",
    "file:",
    "mon:stdio",
    "null",
    "tcp:1",
    "",
    ",",
    ",,",
    "=",
    "id=",
    "type=user",
    "queues=4",
    "vhost=on",
    "mq=on",
    "csum",
    "noipv6",
    "no",
    "host_mtu=9000",
    "fds=3:4",
    "romfile=",
    "bus=pci.0",
    "file:/nonexistent/snap",
    "file:",
    "defer",
    "tcp:0:4444",
    "console=NICVM-DHCP start",
    "console=",
    "file=/tmp/x.snap",
];

/// Keys of QEMU's JSON options (libvirt's `-netdev`/`-device`/`-object` lines).
const JSON_KEYS: &[&str] = &[
    "type",
    "driver",
    "qom-type",
    "id",
    "netdev",
    "fd",
    "fds",
    "vhost",
    "vhostfd",
    "vhostfds",
    "hostfwd",
    "dnssearch",
    "mq",
    "vectors",
    "mac",
    "addr",
    "bus",
    "ifname",
    "queues",
    "file",
];

const JSON_VALUES: &[&str] = &[
    "\"user\"",
    "\"tap\"",
    "\"e1000\"",
    "\"virtio-net-pci\"",
    "\"filter-dump\"",
    "\"n0\"",
    "\"5:6\"",
    "true",
    "false",
    "null",
    "6",
    "-1",
    "1e999",
    "18446744073709551616",
    "[]",
    "[{\"str\":\"tcp::1-:2\"}]",
    "[1]",
    "{}",
    "\"\\u0000\"",
    "\"a,b\"",
    "'it\\'s'",
    "\"a'b\"",
];

/// A JSON object of those keys and values, sometimes single-quoted (QEMU's parser takes
/// both), sometimes with more after it, sometimes cut short.
fn json(rng: &mut Rng) -> Vec<u8> {
    let members: Vec<String> = (0..rng.below(6))
        .map(|_| format!("\"{}\":{}", rng.pick(JSON_KEYS), rng.pick(JSON_VALUES)))
        .collect();
    let mut s = format!("{{{}}}", members.join(","));
    if rng.chance(30) {
        s = s.replace('"', "'");
    }
    if rng.chance(10) {
        s += rng.pick(&[" ", "\n{}", "x", "'", "\\'"]);
    }
    let mut s = s.into_bytes();
    if rng.chance(20) {
        s.truncate(rng.usize(s.len() + 1));
    }
    s
}

fn arg(rng: &mut Rng) -> Vec<u8> {
    match rng.below(14) {
        12 | 13 => json(rng),
        0 => rng.bytes_below(24),
        1 => {
            let mut s = rng.pick(WORDS).as_bytes().to_vec();
            s.insert(rng.usize(s.len() + 1), 0x80 | rng.below(128) as u8);
            s
        }
        2..=6 => {
            let n = rng.range(1, 5);
            let parts: Vec<&str> = (0..n).map(|_| rng.pick(WORDS)).collect();
            parts.join(",").into_bytes()
        }
        _ => rng.pick(WORDS).as_bytes().to_vec(),
    }
}

impl Target for Cli {
    const NAME: &'static str = "cli";
    const ABOUT: &'static str = "the command line: options, keyval syntax, non-UTF-8 arguments";
    type Op = CliOp;

    fn generate(rng: &mut Rng) -> Vec<CliOp> {
        (0..rng.range(1, 20))
            .map(|_| {
                let mut args = vec![];
                if rng.chance(80) {
                    args.push(b"-kernel".to_vec());
                    args.push(b"/nonexistent/vmlinux".to_vec());
                }
                for _ in 0..rng.below(12) {
                    if rng.chance(60) {
                        let options = if rng.chance(80) {
                            nicvm::cli::VALUE_OPTIONS
                        } else {
                            FLAGS
                        };
                        args.push(rng.pick(options).as_bytes().to_vec());
                    }
                    args.push(arg(rng));
                }
                CliOp::Parse(args.into_iter().map(super::Bytes).collect())
            })
            .collect()
    }

    fn execute(ops: &[CliOp]) {
        for (i, o) in ops.iter().enumerate() {
            op(i);
            let CliOp::Parse(args) = o;
            let args: Vec<OsString> = args
                .iter()
                .map(|a| OsString::from_vec(a.0.clone()))
                .collect();
            if let Err(e) = nicvm::cli::parse(args) {
                let msg = e.to_string();
                if msg.chars().any(char::is_control) {
                    eprintln!("error: {msg:?}");
                    panic!("a CLI error with a line break or another control character");
                }
            }
        }
    }
}
