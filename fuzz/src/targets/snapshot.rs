//! Snapshot files as `-incoming` reads them: a valid file (a machine that never ran) with its
//! header, state or length changed — with the checksums fixed up where that lets the reader get
//! further. Reading, checking the machine's shape and mapping RAM must end in an error or a
//! usable snapshot, never a panic, a hang or a huge allocation. (Device states inside a
//! snapshot are fuzzed by the device targets' own save/edit/restore operations.)

use super::pci::StateEdit;
use crate::harness::{op, Target};
use crate::rng::Rng;
use nicvm::snapshot::{self, Incoming};
use serde::{Deserialize, Serialize};
use std::sync::OnceLock;

const HEADER: usize = 4096;
const MEM_MIB: u64 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SnapOp {
    /// The state edited, its checksum (and the header's) fixed up.
    State(StateEdit),
    /// One header byte changed; `fix` recomputes the header checksum after.
    Header { at: u8, val: u8, fix: bool },
    /// The file cut to this many bytes.
    Truncate(u32),
    /// Any byte of the file.
    Byte { at: u32, val: u8 },
}

pub struct Snapshot;

/// The starting file: written by nicvm's own writer once per process.
fn base() -> &'static Vec<u8> {
    static BASE: OnceLock<Vec<u8>> = OnceLock::new();
    BASE.get_or_init(|| {
        let path = scratch("base");
        let ranges = [(vm_memory::GuestAddress(0), (MEM_MIB << 20) as usize)];
        let mem = vm_memory::GuestMemoryMmap::<()>::from_ranges(&ranges).unwrap();
        vm_memory::Bytes::write_slice(&mem, b"guest", vm_memory::GuestAddress(0x1000)).unwrap();
        snapshot::write(&path, &snapshot::sample_state(MEM_MIB, 1), &mem).unwrap();
        let b = std::fs::read(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        b
    })
}

fn scratch(what: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("nicvm-fuzz-snapshot-{what}-{}", std::process::id()))
}

fn fix_header_crc(f: &mut [u8]) {
    if f.len() >= 44 {
        let crc = crc32fast::hash(&f[0..40]);
        f[40..44].copy_from_slice(&crc.to_le_bytes());
    }
}

/// The state's place in the file, as the header says (clamped to the file).
fn state_range(f: &[u8]) -> Option<(usize, usize)> {
    let len = u64::from_le_bytes(f.get(12..20)?.try_into().ok()?) as usize;
    let end = HEADER.checked_add(len)?;
    (end <= f.len()).then_some((HEADER, end))
}

fn edit_state(f: &mut [u8], e: &StateEdit) {
    let Some((start, end)) = state_range(f) else {
        return;
    };
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&f[start..end]) else {
        return;
    };
    e.apply(&mut v);
    let json = serde_json::to_vec(&v).unwrap();
    // The RAM keeps its page-aligned place: a longer state only fits in the padding before it.
    let mem_offset = u64::from_le_bytes(f[24..32].try_into().unwrap()) as usize;
    if start + json.len() > mem_offset || mem_offset > f.len() {
        return;
    }
    f[start..start + json.len()].copy_from_slice(&json);
    f[start + json.len()..mem_offset].fill(0);
    f[12..20].copy_from_slice(&(json.len() as u64).to_le_bytes());
    let crc = crc32fast::hash(&json);
    f[20..24].copy_from_slice(&crc.to_le_bytes());
    fix_header_crc(f);
}

impl Target for Snapshot {
    const NAME: &'static str = "snapshot";
    const ABOUT: &'static str = "snapshot files: header, state and length as -incoming reads them";
    type Op = SnapOp;

    fn generate(rng: &mut Rng) -> Vec<SnapOp> {
        let len = base().len() as u32;
        (0..rng.range(1, 5))
            .map(|_| match rng.weighted(&[50, 20, 10, 20]) {
                0 => SnapOp::State(StateEdit::generate(rng)),
                1 => SnapOp::Header {
                    at: rng.below(48) as u8,
                    val: rng.value(1) as u8,
                    fix: rng.chance(80),
                },
                2 => SnapOp::Truncate(rng.below(len as u64 + 1) as u32),
                _ => SnapOp::Byte {
                    at: rng.below(len as u64) as u32,
                    val: rng.value(1) as u8,
                },
            })
            .collect()
    }

    fn execute(ops: &[SnapOp]) {
        let mut f = base().clone();
        for (i, o) in ops.iter().enumerate() {
            op(i);
            match o {
                SnapOp::State(e) => edit_state(&mut f, e),
                SnapOp::Header { at, val, fix } => {
                    if let Some(b) = f.get_mut(*at as usize) {
                        *b = *val;
                    }
                    if *fix {
                        fix_header_crc(&mut f);
                    }
                }
                SnapOp::Truncate(n) => f.truncate(*n as usize),
                SnapOp::Byte { at, val } => {
                    if let Some(b) = f.get_mut(*at as usize) {
                        *b = *val;
                    }
                }
            }
        }
        op(ops.len());
        let path = scratch("case");
        std::fs::write(&path, &f).unwrap();
        if let Ok(inc) = Incoming::open(&path) {
            let s = &inc.state.machine;
            let _ = inc.check_shape(&snapshot::MachineShape {
                host: s.host.clone(),
                mem_mib: MEM_MIB,
                cpus: 1,
                cpu: "host".into(),
                nics: s.nics.clone(),
            });
            if inc.check_size("hardware KVM", MEM_MIB, 1, "host").is_ok() {
                let ranges = [(vm_memory::GuestAddress(0), (MEM_MIB << 20) as usize)];
                if let Ok(mem) = inc.map_memory(&ranges) {
                    let mut b = [0u8; 5];
                    let _ =
                        vm_memory::Bytes::read_slice(&mem, &mut b, vm_memory::GuestAddress(0x1000));
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}
