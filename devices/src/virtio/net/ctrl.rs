//! virtio-net's control virtqueue (virtio 1.0, 5.1.6.5): the receive filter the driver sets
//! through it (RX mode, MAC tables, the primary MAC) and the number of queue pairs in use.
//!
//! A command is a descriptor chain: `u8 class, u8 command`, the command's data (all
//! device-readable), then one device-writable byte for the `ack`. What the bytes ask for is
//! decided here; [`super::VirtioNet`] walks the chains and applies the result.

use crate::net::{RxFilter, RxState};
use virtio_bindings::virtio_net as vnet;

/// Addresses each MAC table holds; a longer table sets its class's overflow flag (every
/// address of that class is accepted), as QEMU's does.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// The most command bytes (class, command, data) the device reads from one chain: a MAC table
/// with over a thousand addresses per class fits; a longer command is answered with an error.
pub const CTRL_MAX: usize = 16 * 1024;

pub const ACK_OK: u8 = vnet::VIRTIO_NET_OK as u8;
pub const ACK_ERR: u8 = vnet::VIRTIO_NET_ERR as u8;

/// The receive filter. After a reset the device is promiscuous (as QEMU's is) until a driver
/// that negotiated VIRTIO_NET_F_CTRL_RX says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RxMode {
    pub promisc: bool,
    pub allmulti: bool,
    pub alluni: bool,
    pub nomulti: bool,
    pub nouni: bool,
    pub nobcast: bool,
    pub uni_overflow: bool,
    pub multi_overflow: bool,
    pub uni: Vec<[u8; 6]>,
    pub multi: Vec<[u8; 6]>,
}

impl Default for RxMode {
    fn default() -> Self {
        RxMode {
            promisc: true,
            allmulti: false,
            alluni: false,
            nomulti: false,
            nouni: false,
            nobcast: false,
            uni_overflow: false,
            multi_overflow: false,
            uni: vec![],
            multi: vec![],
        }
    }
}

impl RxMode {
    /// Whether a frame for `dst` reaches the driver of a device whose address is `mac`.
    pub fn accepts(&self, mac: &[u8; 6], dst: &[u8]) -> bool {
        if self.promisc {
            return true;
        }
        let Ok(dst) = <[u8; 6]>::try_from(dst) else {
            return true; // shorter than an address: not ours to judge
        };
        if dst == [0xff; 6] {
            return !self.nobcast;
        }
        if dst[0] & 1 != 0 {
            if self.nomulti {
                return false;
            }
            return self.allmulti || self.multi_overflow || self.multi.contains(&dst);
        }
        if self.nouni {
            return false;
        }
        self.alluni || self.uni_overflow || dst == *mac || self.uni.contains(&dst)
    }

    /// The filter in QMP's shape.
    pub fn to_filter(&self, mac: [u8; 6]) -> RxFilter {
        let state = |all: bool, none: bool| {
            if none {
                RxState::None
            } else if all {
                RxState::All
            } else {
                RxState::Normal
            }
        };
        RxFilter {
            main_mac: mac,
            promiscuous: self.promisc,
            broadcast_allowed: !self.nobcast,
            unicast: state(self.alluni, self.nouni),
            multicast: state(self.allmulti, self.nomulti),
            vlan: RxState::All,
            unicast_overflow: self.uni_overflow,
            multicast_overflow: self.multi_overflow,
            unicast_table: self.uni.clone(),
            multicast_table: self.multi.clone(),
            vlan_table: vec![],
        }
    }

    /// Checks a restored filter (tables within their size).
    pub fn check(&self) -> Result<(), String> {
        if self.uni.len() > MAC_TABLE_ENTRIES || self.multi.len() > MAC_TABLE_ENTRIES {
            return Err(format!(
                "MAC tables of {} and {} entries (at most {MAC_TABLE_ENTRIES})",
                self.uni.len(),
                self.multi.len()
            ));
        }
        Ok(())
    }
}

/// What a well-formed command asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// One of the RX mode switches: VIRTIO_NET_CTRL_RX_PROMISC .. _NOBCAST, on or off.
    RxMode { which: u8, on: bool },
    /// VIRTIO_NET_CTRL_MAC_TABLE_SET: `None` for a table longer than [`MAC_TABLE_ENTRIES`].
    MacTables { uni: MacTable, multi: MacTable },
    /// VIRTIO_NET_CTRL_MAC_ADDR_SET.
    MacAddr([u8; 6]),
    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET.
    QueuePairs(u16),
}

/// What the driver negotiated that commands depend on, and the device's queue pairs.
#[derive(Debug, Clone, Copy)]
pub struct Negotiated {
    pub ctrl_rx: bool,
    pub ctrl_rx_extra: bool,
    pub ctrl_mac_addr: bool,
    pub mq: bool,
    pub max_pairs: u16,
}

/// Decodes one command (`bytes` = class, command, data); `None` is answered VIRTIO_NET_ERR:
/// unknown or not negotiated, or data of the wrong length or value.
pub fn decode(bytes: &[u8], n: &Negotiated) -> Option<Command> {
    let (&class, rest) = bytes.split_first()?;
    let (&cmd, data) = rest.split_first()?;
    match class as u32 {
        vnet::VIRTIO_NET_CTRL_RX if n.ctrl_rx => {
            let extra = matches!(
                cmd as u32,
                vnet::VIRTIO_NET_CTRL_RX_ALLUNI
                    | vnet::VIRTIO_NET_CTRL_RX_NOMULTI
                    | vnet::VIRTIO_NET_CTRL_RX_NOUNI
                    | vnet::VIRTIO_NET_CTRL_RX_NOBCAST
            );
            let basic = matches!(
                cmd as u32,
                vnet::VIRTIO_NET_CTRL_RX_PROMISC | vnet::VIRTIO_NET_CTRL_RX_ALLMULTI
            );
            match data {
                [on] if basic || (extra && n.ctrl_rx_extra) => Some(Command::RxMode {
                    which: cmd,
                    on: *on != 0,
                }),
                _ => None,
            }
        }
        vnet::VIRTIO_NET_CTRL_MAC => match cmd as u32 {
            vnet::VIRTIO_NET_CTRL_MAC_TABLE_SET if n.ctrl_rx => {
                let (uni, rest) = mac_table(data)?;
                let (multi, rest) = mac_table(rest)?;
                rest.is_empty().then_some(Command::MacTables { uni, multi })
            }
            vnet::VIRTIO_NET_CTRL_MAC_ADDR_SET if n.ctrl_mac_addr => {
                let mac: [u8; 6] = data.try_into().ok()?;
                Some(Command::MacAddr(mac))
            }
            _ => None,
        },
        vnet::VIRTIO_NET_CTRL_MQ if n.mq => match (cmd as u32, data) {
            (vnet::VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, [lo, hi]) => {
                let pairs = u16::from_le_bytes([*lo, *hi]);
                (1..=n.max_pairs)
                    .contains(&pairs)
                    .then_some(Command::QueuePairs(pairs))
            }
            _ => None,
        },
        _ => None,
    }
}

/// A MAC table as a command gives it: `None` when longer than the device keeps.
type MacTable = Option<Vec<[u8; 6]>>;

/// One `struct virtio_net_ctrl_mac` (le32 entries, then 6 bytes each) from the front of
/// `data`: the table and what follows it.
fn mac_table(data: &[u8]) -> Option<(MacTable, &[u8])> {
    let (n, rest) = data.split_first_chunk::<4>()?;
    let n = u32::from_le_bytes(*n) as usize;
    let len = n.checked_mul(6)?;
    let (macs, rest) = rest.split_at_checked(len)?;
    let table = (n <= MAC_TABLE_ENTRIES).then(|| {
        macs.chunks_exact(6)
            .map(|m| m.try_into().expect("chunks of 6"))
            .collect()
    });
    Some((table, rest))
}

impl RxMode {
    /// Applies an RX mode switch or MAC tables (other commands are the device's).
    pub fn apply(&mut self, c: &Command) {
        match c {
            Command::RxMode { which, on } => {
                let flag = match *which as u32 {
                    vnet::VIRTIO_NET_CTRL_RX_PROMISC => &mut self.promisc,
                    vnet::VIRTIO_NET_CTRL_RX_ALLMULTI => &mut self.allmulti,
                    vnet::VIRTIO_NET_CTRL_RX_ALLUNI => &mut self.alluni,
                    vnet::VIRTIO_NET_CTRL_RX_NOMULTI => &mut self.nomulti,
                    vnet::VIRTIO_NET_CTRL_RX_NOUNI => &mut self.nouni,
                    _ => &mut self.nobcast,
                };
                *flag = *on;
            }
            Command::MacTables { uni, multi } => {
                self.uni_overflow = uni.is_none();
                self.uni = uni.clone().unwrap_or_default();
                self.multi_overflow = multi.is_none();
                self.multi = multi.clone().unwrap_or_default();
            }
            Command::MacAddr(_) | Command::QueuePairs(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Negotiated = Negotiated {
        ctrl_rx: true,
        ctrl_rx_extra: true,
        ctrl_mac_addr: true,
        mq: true,
        max_pairs: 4,
    };

    fn table(macs: &[[u8; 6]]) -> Vec<u8> {
        let mut v = (macs.len() as u32).to_le_bytes().to_vec();
        for m in macs {
            v.extend_from_slice(m);
        }
        v
    }

    #[test]
    fn commands_decode_only_as_negotiated_and_well_formed() {
        assert_eq!(
            decode(&[0, 0, 0], &ALL),
            Some(Command::RxMode {
                which: 0,
                on: false
            })
        );
        assert_eq!(decode(&[0, 0], &ALL), None, "no data");
        assert_eq!(decode(&[0, 0, 1, 1], &ALL), None, "two bytes");
        assert_eq!(decode(&[0, 6, 1], &ALL), None, "no such switch");
        let basic = Negotiated {
            ctrl_rx_extra: false,
            ..ALL
        };
        assert_eq!(decode(&[0, 5, 1], &basic), None, "NOBCAST needs RX_EXTRA");
        assert_eq!(decode(&[4, 0, 2, 0], &ALL), Some(Command::QueuePairs(2)));
        assert_eq!(
            decode(&[4, 0, 5, 0], &ALL),
            None,
            "more pairs than the device"
        );
        assert_eq!(decode(&[4, 0, 0, 0], &ALL), None, "zero pairs");
        let one = Negotiated { mq: false, ..ALL };
        assert_eq!(decode(&[4, 0, 1, 0], &one), None, "MQ not negotiated");
        assert_eq!(
            decode(&[1, 1, 2, 0, 0, 0, 0, 9], &ALL),
            Some(Command::MacAddr([2, 0, 0, 0, 0, 9]))
        );
        assert_eq!(decode(&[1, 1, 2, 0, 0], &ALL), None);
        assert_eq!(decode(&[7, 0], &ALL), None, "unknown class");
    }

    #[test]
    fn mac_tables_decode_exactly_and_overflow_past_the_limit() {
        let a = [0x52, 0x54, 0, 0, 0, 1];
        let m = [0x01, 0, 0x5e, 0, 0, 1];
        let mut cmd = vec![1, 0];
        cmd.extend(table(&[a]));
        cmd.extend(table(&[m]));
        assert_eq!(
            decode(&cmd, &ALL),
            Some(Command::MacTables {
                uni: Some(vec![a]),
                multi: Some(vec![m])
            })
        );
        cmd.push(0);
        assert_eq!(decode(&cmd, &ALL), None, "trailing byte");
        let mut big = vec![1, 0];
        big.extend(table(&vec![m; MAC_TABLE_ENTRIES + 1]));
        big.extend(table(&[]));
        assert_eq!(
            decode(&big, &ALL),
            Some(Command::MacTables {
                uni: None,
                multi: Some(vec![])
            })
        );
        let mut lying = vec![1, 0];
        lying.extend(u32::MAX.to_le_bytes());
        assert_eq!(decode(&lying, &ALL), None, "count past the data");
    }

    #[test]
    fn the_filter_follows_the_mode() {
        let mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        let other = [0x52, 0x54, 0, 0, 0, 2];
        let group = [0x01, 0, 0x5e, 0, 0, 1];
        let mut m = RxMode::default();
        assert!(m.accepts(&mac, &other), "promiscuous after a reset");
        m.apply(&Command::RxMode {
            which: 0,
            on: false,
        });
        assert!(m.accepts(&mac, &mac));
        assert!(!m.accepts(&mac, &other));
        assert!(m.accepts(&mac, &[0xff; 6]));
        assert!(!m.accepts(&mac, &group));
        m.apply(&Command::MacTables {
            uni: Some(vec![other]),
            multi: Some(vec![group]),
        });
        assert!(m.accepts(&mac, &other));
        assert!(m.accepts(&mac, &group));
        m.apply(&Command::RxMode { which: 5, on: true });
        assert!(!m.accepts(&mac, &[0xff; 6]), "NOBCAST");
        m.apply(&Command::RxMode { which: 3, on: true });
        assert!(!m.accepts(&mac, &group), "NOMULTI wins over the table");
        m.apply(&Command::RxMode { which: 4, on: true });
        assert!(!m.accepts(&mac, &mac), "NOUNI");
        m.apply(&Command::MacTables {
            uni: None,
            multi: None,
        });
        m.apply(&Command::RxMode {
            which: 4,
            on: false,
        });
        assert!(m.accepts(&mac, &other), "unicast overflow accepts all");
        let f = m.to_filter(mac);
        assert!(f.unicast_overflow && f.multicast_overflow && !f.broadcast_allowed);
        assert_eq!(f.multicast, RxState::None);
    }
}
