//! The fuzz targets and their registry.

pub mod backends;
pub mod cli;
pub mod frames;
pub mod legacy;
pub mod nic;
pub mod offload;
pub mod pci;
pub mod snapshot;

use crate::harness::{self, Campaign, Target};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::Path;
use std::time::Duration;

/// Bytes that serialise as a hex string (frames are large; a JSON array of numbers is not).
#[derive(Clone, PartialEq, Eq)]
pub struct Bytes(pub Vec<u8>);

impl std::fmt::Debug for Bytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.len() <= 64 {
            write!(f, "[{}]", hex(&self.0))
        } else {
            write!(f, "[{} bytes: {}..]", self.0.len(), hex(&self.0[..48]))
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Serialize for Bytes {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd hex length"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()
            .map(Bytes)
            .map_err(serde::de::Error::custom)
    }
}

pub struct Entry {
    pub name: &'static str,
    pub about: &'static str,
    pub campaign: fn(Campaign) -> !,
    pub replay: fn(&Path, Duration, bool) -> !,
    pub describe: fn(&serde_json::Value) -> Vec<String>,
}

fn describe<T: Target>(v: &serde_json::Value) -> Vec<String> {
    match serde_json::from_value::<Vec<T::Op>>(v.clone()) {
        Ok(ops) => ops
            .iter()
            .enumerate()
            .map(|(i, o)| format!("{i:4}: {o:?}"))
            .collect(),
        Err(e) => vec![format!("(not {} operations: {e})", T::NAME)],
    }
}

macro_rules! entry {
    ($t:ty) => {
        Entry {
            name: <$t as Target>::NAME,
            about: <$t as Target>::ABOUT,
            campaign: harness::campaign::<$t>,
            replay: harness::replay::<$t>,
            describe: describe::<$t>,
        }
    };
}

pub static ALL: &[Entry] = &[
    entry!(nic::Rtl8139CplusTarget),
    entry!(nic::Rtl8139NormalTarget),
    entry!(nic::E1000Target),
    entry!(nic::VirtioNetTarget),
    entry!(pci::Pci),
    entry!(legacy::Legacy),
    entry!(offload::Offload),
    entry!(backends::Backends),
    entry!(cli::Cli),
    entry!(snapshot::Snapshot),
];
