//! The CPU the guest sees: KVM's supported CPUID, with per-vCPU topology, the hypervisor bit,
//! and on an emulating host none of the features its emulator cannot execute in kernel mode.

use crate::host::HostKind;
use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// nicvm's marker leaf on emulating hosts; the project's guest kernel keys its fixups on it.
pub const NICVM_EMULATED_LEAF: u32 = 0x4000_0100;
pub const NICVM_EMULATED_SIG: &[u8; 12] = b"NicvmEmulate";

mod bits {
    // CPUID.1:ECX
    pub const FMA: u32 = 1 << 12;
    pub const CX16: u32 = 1 << 13;
    pub const PCID: u32 = 1 << 17;
    pub const MOVBE: u32 = 1 << 22;
    pub const POPCNT: u32 = 1 << 23;
    pub const XSAVE: u32 = 1 << 26;
    pub const OSXSAVE: u32 = 1 << 27;
    pub const AVX: u32 = 1 << 28;
    pub const F16C: u32 = 1 << 29;
    pub const HYPERVISOR: u32 = 1 << 31;
    // CPUID.1:EDX
    pub const HTT: u32 = 1 << 28;
    // CPUID.7.0:EBX
    pub const FSGSBASE: u32 = 1 << 0;
    pub const AVX2: u32 = 1 << 5;
    pub const ERMS: u32 = 1 << 9;
    pub const INVPCID: u32 = 1 << 10;
    pub const AVX512F: u32 = 1 << 16;
    pub const SMAP: u32 = 1 << 20;
    // CPUID.7.0:EDX
    pub const FSRM: u32 = 1 << 4;
    // CPUID.80000001h:EDX
    pub const RDTSCP: u32 = 1 << 27;
    // KVM_CPUID_FEATURES (0x40000001):EAX, the hypercall-based ones
    pub const KVM_FEATURE_ASYNC_PF: u32 = 1 << 4;
    pub const KVM_FEATURE_PV_UNHALT: u32 = 1 << 7;
    pub const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;
    pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 1 << 13;
    pub const KVM_FEATURE_ASYNC_PF_INT: u32 = 1 << 14;
}
use bits::*;

fn apply(e: &mut kvm_cpuid_entry2, cpu: u8, cpus: u8, host: HostKind) {
    let emulating = host == HostKind::Emulating;
    match (e.function, e.index) {
        (1, _) => {
            // Initial APIC ID, logical processor count, CLFLUSH size kept.
            e.ebx = (e.ebx & 0xffff) | (cpus as u32) << 16 | (cpu as u32) << 24;
            e.ecx |= HYPERVISOR;
            if cpus > 1 {
                e.edx |= HTT;
            } else {
                e.edx &= !HTT;
            }
            if emulating {
                e.ecx &= !(FMA | CX16 | PCID | MOVBE | POPCNT | XSAVE | OSXSAVE | AVX | F16C);
            }
        }
        (4, _) => {
            // Cores per package - 1 in bits 31:26; caches shared by everything.
            e.eax = (e.eax & 0x3ff) | ((cpus as u32 - 1) << 26) | ((cpus as u32 - 1) << 14);
        }
        (7, 0) if emulating => {
            e.ebx &= !(FSGSBASE | AVX2 | ERMS | INVPCID | AVX512F | SMAP | 0xfc0e_0000);
            e.ecx = 0;
            e.edx &= !FSRM;
        }
        (0xb, _) | (0x1f, _) => {
            e.edx = cpu as u32;
            let shift = (cpus as u32).next_power_of_two().trailing_zeros();
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = 1 << 8;
                }
                1 => {
                    e.eax = shift;
                    e.ebx = cpus as u32;
                    e.ecx = 2 << 8 | 1;
                }
                i => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = i;
                }
            }
        }
        (0x4000_0001, _) if emulating => {
            e.eax &= !(KVM_FEATURE_ASYNC_PF
                | KVM_FEATURE_PV_UNHALT
                | KVM_FEATURE_PV_SEND_IPI
                | KVM_FEATURE_PV_SCHED_YIELD
                | KVM_FEATURE_ASYNC_PF_INT);
        }
        (0x8000_0001, _) if emulating => e.edx &= !RDTSCP,
        _ => {}
    }
}

/// The CPUID table for vCPU `cpu` of `cpus`.
pub fn for_vcpu(supported: &CpuId, cpu: u8, cpus: u8, host: HostKind) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        .filter(|e| !(host == HostKind::Emulating && e.function == 0xd))
        .collect();
    for e in entries.iter_mut() {
        apply(e, cpu, cpus, host);
    }
    if host == HostKind::Emulating {
        let sig = NICVM_EMULATED_SIG;
        let word = |i: usize| u32::from_le_bytes(sig[i * 4..i * 4 + 4].try_into().unwrap());
        entries.push(kvm_cpuid_entry2 {
            function: NICVM_EMULATED_LEAF,
            eax: NICVM_EMULATED_LEAF,
            ebx: word(0),
            ecx: word(1),
            edx: word(2),
            ..Default::default()
        });
    }
    CpuId::from_entries(&entries).expect("CPUID table fits")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> CpuId {
        let e = |function, index, ecx, edx, ebx| kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        CpuId::from_entries(&[
            e(1, 0, POPCNT | XSAVE | 1, HTT | 1, 0x0800),
            e(7, 0, 0, FSRM, FSGSBASE | ERMS | SMAP | 1 << 3),
            e(0xd, 0, 0, 0, 0),
            e(0x8000_0001, 0, 0, RDTSCP | 1 << 11, 0),
            e(0x4000_0001, 0, 0, 0, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32) -> Option<kvm_cpuid_entry2> {
        c.as_slice().iter().copied().find(|e| e.function == f)
    }

    #[test]
    fn emulating_host_hides_what_its_emulator_cannot_run() {
        let c = for_vcpu(&table(), 1, 2, HostKind::Emulating);
        let l1 = find(&c, 1).unwrap();
        assert_eq!(l1.ecx & (POPCNT | XSAVE), 0);
        assert_eq!(l1.ecx & 1, 1, "other features kept");
        assert_ne!(l1.ecx & HYPERVISOR, 0);
        assert_eq!(l1.ebx >> 24, 1, "APIC ID");
        assert_eq!((l1.ebx >> 16) & 0xff, 2);
        let l7 = find(&c, 7).unwrap();
        assert_eq!(l7.ebx, 1 << 3, "only BMI1 left");
        assert_eq!(l7.edx & FSRM, 0);
        assert!(find(&c, 0xd).is_none());
        assert_eq!(find(&c, 0x8000_0001).unwrap().edx, 1 << 11);
        let sig = find(&c, NICVM_EMULATED_LEAF).unwrap();
        assert_eq!(&sig.ebx.to_le_bytes(), b"Nicv");
    }

    #[test]
    fn hardware_host_keeps_features() {
        let c = for_vcpu(&table(), 0, 1, HostKind::Hardware);
        let l1 = find(&c, 1).unwrap();
        assert_ne!(l1.ecx & POPCNT, 0);
        assert_eq!(l1.edx & HTT, 0, "one CPU: no HTT");
        assert!(find(&c, 0xd).is_some());
        assert!(find(&c, NICVM_EMULATED_LEAF).is_none());
    }
}
