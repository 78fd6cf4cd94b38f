//! The CPU the guest sees: KVM's supported CPUID, with per-vCPU topology, the hypervisor bit,
//! and on an emulating host none of the features its emulator cannot execute in kernel mode.
//!
//! On hardware KVM the guest gets what QEMU's `-cpu host` and Firecracker present besides:
//! the host's brand string (0x80000002-4), the TSC-deadline timer when KVM emulates it
//! (`KVM_CAP_TSC_DEADLINE_TIMER`: KVM_GET_SUPPORTED_CPUID leaves that bit to the VMM), the
//! host's cache and TLB leaves (2, 4, 0x80000005, 0x80000006, 0x8000001D) with their sharing
//! fields fitted to `-smp` (L1 and L2 a core's own, the last level a package's), AMD's core
//! count and APIC ID size (0x80000008) and topology extension (0x8000001E), and KVM's
//! signature leaf with the paravirtual features that need nothing from the VMM.
//!
//! On both kinds of host the topology is `-smp`'s: each vCPU's APIC ID has QEMU's layout
//! (threads, cores, dies and sockets in bit fields, [`Topology::apic_id`]), and leaves 1, 4,
//! 0xB and 0x1F describe it, so that the guest's `lscpu` shows the sockets, cores and threads
//! asked for.

use crate::config::Topology;
use crate::host::HostKind;
use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};
use kvm_ioctls::{Cap, Kvm};

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
    pub const TSC_DEADLINE: u32 = 1 << 24;
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
    // The rest of KVM_CPUID_FEATURES (linux/include/uapi/asm/kvm_para.h) that a guest uses
    // with no help from the VMM: KVM itself handles their MSRs and hypercalls.
    pub const KVM_FEATURE_CLOCKSOURCE: u32 = 1 << 0;
    pub const KVM_FEATURE_NOP_IO_DELAY: u32 = 1 << 1;
    pub const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;
    pub const KVM_FEATURE_STEAL_TIME: u32 = 1 << 5;
    pub const KVM_FEATURE_PV_EOI: u32 = 1 << 6;
    pub const KVM_FEATURE_PV_TLB_FLUSH: u32 = 1 << 9;
    pub const KVM_FEATURE_ASYNC_PF_VMEXIT: u32 = 1 << 10;
    pub const KVM_FEATURE_POLL_CONTROL: u32 = 1 << 12;
    pub const KVM_FEATURE_CLOCKSOURCE_STABLE_BIT: u32 = 1 << 24;
    // Left out: MSI_EXT_DEST_ID (15, the VMM's MSI routing would have to honour it),
    // HC_MAP_GPA_RANGE (16, a hypercall KVM hands to the VMM), MIGRATION_CONTROL (17).
    pub const KVM_FEATURES_KEPT: u32 = KVM_FEATURE_CLOCKSOURCE
        | KVM_FEATURE_NOP_IO_DELAY
        | KVM_FEATURE_CLOCKSOURCE2
        | KVM_FEATURE_ASYNC_PF
        | KVM_FEATURE_STEAL_TIME
        | KVM_FEATURE_PV_EOI
        | KVM_FEATURE_PV_UNHALT
        | KVM_FEATURE_PV_TLB_FLUSH
        | KVM_FEATURE_ASYNC_PF_VMEXIT
        | KVM_FEATURE_PV_SEND_IPI
        | KVM_FEATURE_POLL_CONTROL
        | KVM_FEATURE_PV_SCHED_YIELD
        | KVM_FEATURE_ASYNC_PF_INT
        | KVM_FEATURE_CLOCKSOURCE_STABLE_BIT;
    // CPUID.80000001h:ECX
    pub const TOPOEXT: u32 = 1 << 22;
}
use bits::*;

fn apply(e: &mut kvm_cpuid_entry2, cpu: u8, topo: &Topology, host: HostKind) {
    let emulating = host == HostKind::Emulating;
    match (e.function, e.index) {
        (1, _) => {
            // Initial APIC ID, logical processors per package, CLFLUSH size kept.
            let per_package = topo.per_package();
            e.ebx = (e.ebx & 0xffff) | per_package << 16 | (topo.apic_id(cpu) & 0xff) << 24;
            e.ecx |= HYPERVISOR;
            if per_package > 1 {
                e.edx |= HTT;
            } else {
                e.edx &= !HTT;
            }
            if emulating {
                e.ecx &= !(FMA | CX16 | PCID | MOVBE | POPCNT | XSAVE | OSXSAVE | AVX | F16C);
            }
        }
        (4, _) if e.eax & 0x1f != 0 => e.eax = fit_cache(e.eax, true, topo),
        (7, 0) if emulating => {
            e.ebx &= !(FSGSBASE | AVX2 | ERMS | INVPCID | AVX512F | SMAP | 0xfc0e_0000);
            e.ecx = 0;
            e.edx &= !FSRM;
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

/// What the hardware-KVM table takes from the machine nicvm runs on.
#[derive(Clone, Copy)]
pub struct HostCpu {
    /// `KVM_CHECK_EXTENSION(KVM_CAP_TSC_DEADLINE_TIMER)`: KVM's LAPIC emulates the
    /// TSC-deadline mode, which KVM_GET_SUPPORTED_CPUID does not report itself.
    pub tsc_deadline: bool,
    /// This machine's CPUID: (leaf, subleaf) -> [eax, ebx, ecx, edx].
    pub cpuid: fn(u32, u32) -> [u32; 4],
}

impl HostCpu {
    pub fn probe(kvm: &Kvm) -> HostCpu {
        HostCpu {
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            cpuid: native_cpuid,
        }
    }
}

// `__cpuid_count` is safe from Rust 1.87 on, unsafe before (rust-version is 1.80).
#[allow(unused_unsafe)]
fn native_cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    // SAFETY: every x86-64 CPU has the CPUID instruction; it only reads identification
    // registers (an unknown leaf returns defined data, never faults).
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, subleaf) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// `-cpu host,...`'s switches: a feature's QEMU name, and whether it is to be there.
pub type FeatureSwitches = Vec<(&'static str, bool)>;

/// What a feature switched on but not there to give comes to, as QEMU's `-cpu` has it:
/// by default (`check`) a warning and the guest goes without; `check=off` says nothing;
/// `enforce` refuses to start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Missing {
    Quiet,
    #[default]
    Warn,
    Refuse,
}

/// A CPU feature `-cpu host,-NAME` takes away (or `+NAME` insists on), by QEMU's name:
/// CPUID leaf, subleaf, register (0 EAX .. 3 EDX) and bit.
pub struct Feature {
    pub name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: usize,
    bit: u32,
}

const fn f(name: &'static str, leaf: u32, subleaf: u32, reg: usize, bit: u32) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// The features `-cpu` takes, as QEMU names them (`sse4.1`, `sse4_1` and `sse4-1` alike).
pub const FEATURES: &[Feature] = &[
    f("pni", 1, 0, 2, 0),
    f("pclmulqdq", 1, 0, 2, 1),
    f("vmx", 1, 0, 2, 5),
    f("ssse3", 1, 0, 2, 9),
    f("fma", 1, 0, 2, 12),
    f("cx16", 1, 0, 2, 13),
    f("pdcm", 1, 0, 2, 15),
    f("pcid", 1, 0, 2, 17),
    f("sse4.1", 1, 0, 2, 19),
    f("sse4.2", 1, 0, 2, 20),
    f("x2apic", 1, 0, 2, 21),
    f("movbe", 1, 0, 2, 22),
    f("popcnt", 1, 0, 2, 23),
    f("tsc-deadline", 1, 0, 2, 24),
    f("aes", 1, 0, 2, 25),
    f("xsave", 1, 0, 2, 26),
    f("avx", 1, 0, 2, 28),
    f("f16c", 1, 0, 2, 29),
    f("rdrand", 1, 0, 2, 30),
    f("fsgsbase", 7, 0, 1, 0),
    f("bmi1", 7, 0, 1, 3),
    f("hle", 7, 0, 1, 4),
    f("avx2", 7, 0, 1, 5),
    f("smep", 7, 0, 1, 7),
    f("bmi2", 7, 0, 1, 8),
    f("erms", 7, 0, 1, 9),
    f("invpcid", 7, 0, 1, 10),
    f("rtm", 7, 0, 1, 11),
    f("mpx", 7, 0, 1, 14),
    f("avx512f", 7, 0, 1, 16),
    f("avx512dq", 7, 0, 1, 17),
    f("rdseed", 7, 0, 1, 18),
    f("adx", 7, 0, 1, 19),
    f("smap", 7, 0, 1, 20),
    f("clflushopt", 7, 0, 1, 23),
    f("clwb", 7, 0, 1, 24),
    f("avx512cd", 7, 0, 1, 28),
    f("sha-ni", 7, 0, 1, 29),
    f("avx512bw", 7, 0, 1, 30),
    f("avx512vl", 7, 0, 1, 31),
    f("umip", 7, 0, 2, 2),
    f("pku", 7, 0, 2, 3),
    f("waitpkg", 7, 0, 2, 5),
    f("vaes", 7, 0, 2, 9),
    f("vpclmulqdq", 7, 0, 2, 10),
    f("la57", 7, 0, 2, 16),
    f("rdpid", 7, 0, 2, 22),
    f("fsrm", 7, 0, 3, 4),
    f("md-clear", 7, 0, 3, 10),
    f("spec-ctrl", 7, 0, 3, 26),
    f("stibp", 7, 0, 3, 27),
    f("arch-capabilities", 7, 0, 3, 29),
    f("ssbd", 7, 0, 3, 31),
    f("lahf-lm", 0x8000_0001, 0, 2, 0),
    f("svm", 0x8000_0001, 0, 2, 2),
    f("abm", 0x8000_0001, 0, 2, 5),
    f("sse4a", 0x8000_0001, 0, 2, 6),
    f("3dnowprefetch", 0x8000_0001, 0, 2, 8),
    f("topoext", 0x8000_0001, 0, 2, 22),
    f("pdpe1gb", 0x8000_0001, 0, 3, 26),
    f("rdtscp", 0x8000_0001, 0, 3, 27),
    f("invtsc", 0x8000_0007, 0, 3, 8),
];

/// The feature QEMU calls `name`, in any of its spellings (`sse4.1`, `sse4_1`, `sse4-1`).
pub fn feature(name: &str) -> Option<&'static Feature> {
    let norm = |n: &str| -> String {
        n.chars()
            .map(|c| if c == '_' || c == '.' { '-' } else { c })
            .collect()
    };
    let want = match norm(name).as_str() {
        "sse3" => "pni".to_string(),
        n => n.to_string(),
    };
    FEATURES.iter().find(|f| norm(f.name) == want)
}

/// `-cpu host,...`'s switches applied to a vCPU's table: a feature switched off is cleared; one
/// switched on must be there already (nicvm cannot give the guest what KVM does not): what
/// is not comes to `missing` (an error, or a warning returned with the table, or nothing).
pub fn set_features(
    table: CpuId,
    switches: &[(&'static str, bool)],
    missing: Missing,
) -> Result<(CpuId, Vec<String>), String> {
    let mut entries: Vec<kvm_cpuid_entry2> = table.as_slice().to_vec();
    let mut warnings = vec![];
    let mut absent = |what: String| match missing {
        Missing::Refuse => Err(format!("{what} (enforce)")),
        Missing::Warn => {
            warnings.push(format!("{what}; the guest goes without it"));
            Ok(())
        }
        Missing::Quiet => Ok(()),
    };
    if let Some((name, _)) = switches.iter().find(|(n, _)| feature(n).is_none()) {
        return Err(format!("'{name}' is not a CPU feature nicvm knows"));
    }
    for (f, on) in effective(switches) {
        let missing = || {
            format!(
                "'{}' is not there to give the guest (KVM does not offer it here, or nicvm \
                 leaves it out on an emulating host)",
                f.name
            )
        };
        let e = entries
            .iter_mut()
            .find(|e| e.function == f.leaf && e.index == f.subleaf);
        let Some(e) = e else {
            if on {
                absent(missing())?;
            }
            continue;
        };
        let r = match f.reg {
            0 => &mut e.eax,
            1 => &mut e.ebx,
            2 => &mut e.ecx,
            _ => &mut e.edx,
        };
        if on && *r & (1 << f.bit) == 0 {
            absent(missing())?;
        }
        if !on {
            *r &= !(1 << f.bit);
        }
    }
    let table = CpuId::from_entries(&entries).expect("CPUID table fits");
    Ok((table, warnings))
}

/// The `-cpu` option as far as it shapes the guest's CPUID: `host`, then each feature the
/// switches take away (the last switch of a feature wins), in the table's order. A snapshot
/// records it; a restore must build the same.
pub fn describe(switches: &[(&'static str, bool)]) -> String {
    let mut s = String::from("host");
    for (f, on) in effective(switches) {
        if !on {
            s.push_str(",-");
            s.push_str(f.name);
        }
    }
    s
}

/// Each known feature `switches` name, once, with its last switch, in the table's order.
fn effective<'a>(
    switches: &'a [(&'static str, bool)],
) -> impl Iterator<Item = (&'static Feature, bool)> + 'a {
    FEATURES.iter().filter_map(move |f| {
        let last = switches
            .iter()
            .rev()
            .find(|(n, _)| feature(n).is_some_and(|g| g.name == f.name));
        last.map(|&(_, on)| (f, on))
    })
}

/// A cache descriptor (leaf 4 or 0x8000001D EAX) with its sharing fitted to `topo`: L1 and
/// L2 are a core's own (its threads share them), the last level is the package's. Leaf 4
/// also says how many cores a package has. Both counts are in APIC IDs, as the guest
/// derives its IDs from them.
fn fit_cache(eax: u32, leaf4: bool, topo: &Topology) -> u32 {
    let (t, c, d) = topo.id_bits();
    let level = (eax >> 5) & 7;
    let sharing: u32 = if level >= 3 { 1 << (t + c + d) } else { 1 << t };
    let cores = if leaf4 {
        ((1u32 << (c + d)) - 1) << 26
    } else {
        0
    };
    (eax & 0x3fff) | (sharing - 1) << 14 | cores
}

/// Leaves 0xB and 0x1F, where KVM's table has them, made anew: a level per subleaf (its
/// type, the APIC ID shift to the next level, its logical CPUs), the end subleaf, and vCPU
/// `cpu`'s x2APIC ID in each. 0x1F gives dies a level of their own when there are several.
fn topology_leaves(entries: &mut Vec<kvm_cpuid_entry2>, cpu: u8, topo: &Topology) {
    const SMT: u32 = 1;
    const CORE: u32 = 2;
    const DIE: u32 = 5;
    let (t, c, d) = topo.id_bits();
    let threads = u32::from(topo.threads.max(1));
    for function in [0xb, 0x1f] {
        if !entries.iter().any(|e| e.function == function) {
            continue;
        }
        entries.retain(|e| e.function != function);
        let mut levels = vec![(SMT, t, threads)];
        if function == 0x1f && topo.dies > 1 {
            levels.push((CORE, t + c, threads * u32::from(topo.cores.max(1))));
            levels.push((DIE, t + c + d, topo.per_package()));
        } else {
            levels.push((CORE, t + c + d, topo.per_package()));
        }
        levels.push((0, 0, 0));
        for (index, (kind, shift, n)) in (0u32..).zip(levels) {
            entries.push(kvm_cpuid_entry2 {
                function,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                eax: shift,
                ebx: n,
                ecx: kind << 8 | index,
                edx: topo.apic_id(cpu),
                ..Default::default()
            });
        }
    }
}

/// Why a guest cannot see `topo`'s threads in `table`, if it cannot: Linux reads an AMD
/// CPU's threads from the topology extension (0x8000001E) only, so without TOPOEXT it takes
/// every thread for a core. QEMU warns of the same.
pub fn threads_unseen(table: &CpuId, topo: &Topology) -> Option<String> {
    let entries = table.as_slice();
    let topoext = entries
        .iter()
        .any(|e| e.function == 0x8000_0001 && e.ecx & TOPOEXT != 0);
    (is_amd(entries) && !topoext && topo.threads > 1).then(|| {
        format!(
            "this AMD CPU has no topology extension (topoext): the guest sees the {} threads \
             of each core as cores (as in QEMU)",
            topo.threads
        )
    })
}

/// The CPUID table for vCPU `cpu` of the machine `topo` describes.
pub fn for_vcpu(
    supported: &CpuId,
    cpu: u8,
    topo: &Topology,
    host: HostKind,
    host_cpu: &HostCpu,
) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = supported
        .as_slice()
        .iter()
        .copied()
        .filter(|e| !(host == HostKind::Emulating && e.function == 0xd))
        .collect();
    for e in entries.iter_mut() {
        apply(e, cpu, topo, host);
    }
    topology_leaves(&mut entries, cpu, topo);
    match host {
        HostKind::Emulating => {
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
        HostKind::Hardware => hardware(&mut entries, cpu, topo, host_cpu),
    }
    CpuId::from_entries(&entries).expect("CPUID table fits")
}

fn find(
    entries: &mut [kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
}

/// Sets (or adds) leaf `function`.`index` to `regs`.
fn set(entries: &mut Vec<kvm_cpuid_entry2>, function: u32, index: u32, flags: u32, regs: [u32; 4]) {
    let [eax, ebx, ecx, edx] = regs;
    match find(entries, function, index) {
        Some(e) => (e.eax, e.ebx, e.ecx, e.edx) = (eax, ebx, ecx, edx),
        None => entries.push(kvm_cpuid_entry2 {
            function,
            index,
            flags,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }),
    }
}

/// Replaces every subleaf of a cache leaf (4, 0x8000001D) with the host's, up to and including
/// the first one whose cache type (EAX[4:0]) says "no more caches".
fn host_subleaves(entries: &mut Vec<kvm_cpuid_entry2>, function: u32, host_cpu: &HostCpu) {
    entries.retain(|e| e.function != function);
    for index in 0..16 {
        let regs = (host_cpu.cpuid)(function, index);
        set(
            entries,
            function,
            index,
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            regs,
        );
        if regs[0] & 0x1f == 0 {
            break;
        }
    }
}

fn hardware(entries: &mut Vec<kvm_cpuid_entry2>, cpu: u8, topo: &Topology, host_cpu: &HostCpu) {
    let host = |f: u32, i: u32| (host_cpu.cpuid)(f, i);
    let max =
        |entries: &mut Vec<kvm_cpuid_entry2>, f: u32| find(entries, f, 0).map_or(0, |e| e.eax);
    let (host_max, host_ext_max) = (host(0, 0)[0], host(0x8000_0000, 0)[0]);
    let guest_max = max(entries, 0);
    let amd = is_amd(entries);
    let (t, c, d) = topo.id_bits();

    // The brand string: the guest's /proc/cpuinfo "model name".
    if host_ext_max >= 0x8000_0004 {
        if find(entries, 0x8000_0000, 0).is_none() {
            set(entries, 0x8000_0000, 0, 0, host(0x8000_0000, 0));
        }
        let e = find(entries, 0x8000_0000, 0).expect("just set");
        e.eax = e.eax.max(0x8000_0004);
        for f in 0x8000_0002..=0x8000_0004 {
            set(entries, f, 0, 0, host(f, 0));
        }
    }
    let guest_ext_max = max(entries, 0x8000_0000);

    // Caches and TLBs as the host has them.
    if guest_max >= 2 && host_max >= 2 {
        set(entries, 2, 0, 0, host(2, 0));
    }
    if guest_max >= 4 && host_max >= 4 {
        host_subleaves(entries, 4, host_cpu);
    }
    for f in [0x8000_0005, 0x8000_0006] {
        if guest_ext_max >= f && host_ext_max >= f {
            set(entries, f, 0, 0, host(f, 0));
        }
    }
    let topoext = find(entries, 0x8000_0001, 0).is_some_and(|e| e.ecx & TOPOEXT != 0);
    if topoext && guest_ext_max >= 0x8000_001d && host_ext_max >= 0x8000_001d {
        host_subleaves(entries, 0x8000_001d, host_cpu);
    }

    for e in entries.iter_mut() {
        match e.function {
            1 if host_cpu.tsc_deadline => e.ecx |= TSC_DEADLINE,
            // The host's caches, shared as `topo` arranges the vCPUs.
            4 | 0x8000_001d if e.eax & 0x1f != 0 => {
                e.eax = fit_cache(e.eax, e.function == 4, topo);
            }
            // AMD: NC (logical CPUs of a package - 1) and the APIC ID bits below the package.
            0x8000_0008 if amd => {
                e.ecx = (e.ecx & !0xf0ff) | (t + c + d) << 12 | (topo.per_package() - 1);
            }
            // AMD topology extension: extended APIC ID; a compute unit is a core (its
            // threads, and its number within the package); one node.
            0x8000_001e => {
                let (_, die, core, _) = topo.ids(cpu);
                e.eax = topo.apic_id(cpu);
                e.ebx = (u32::from(topo.threads.max(1)) - 1) << 8
                    | (die * u32::from(topo.cores.max(1)) + core);
                e.ecx = 0;
                e.edx = 0;
            }
            0x4000_0000 => e.eax = e.eax.max(0x4000_0001),
            0x4000_0001 => {
                e.eax &= KVM_FEATURES_KEPT;
                e.edx = 0;
            }
            _ => {}
        }
    }
}

/// Whether leaf 0's vendor is AMD's (or Hygon's, which follows AMD's leaves).
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| {
        let v = [e.ebx, e.edx, e.ecx];
        e.function == 0 && (v == words(b"AuthenticAMD") || v == words(b"HygonGenuine"))
    })
}

/// A 12-byte CPUID string as the three registers that hold it.
fn words(s: &[u8; 12]) -> [u32; 3] {
    let w = |i: usize| u32::from_le_bytes(s[i * 4..i * 4 + 4].try_into().unwrap());
    [w(0), w(1), w(2)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_what_the_switches_take_away() {
        assert_eq!(describe(&[]), "host");
        assert_eq!(describe(&[("x2apic", true)]), "host");
        // In the table's order, each once, the last switch winning; QEMU's spellings too.
        assert_eq!(
            describe(&[
                ("movbe", false),
                ("sse4_1", false),
                ("pcid", false),
                ("pcid", true)
            ]),
            "host,-sse4.1,-movbe"
        );
    }

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        let [eax, ebx, ecx, edx] = regs;
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn table() -> CpuId {
        let e = |function, index, ecx, edx, ebx| entry(function, index, [0, ebx, ecx, edx]);
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

    const NO_HOST: HostCpu = HostCpu {
        tsc_deadline: false,
        cpuid: |_, _| [0; 4],
    };

    /// `-cpu host,-NAME` clears the bit; `+NAME` asks for one that must be there.
    #[test]
    fn cpu_feature_switches() {
        let t = for_vcpu(
            &table(),
            0,
            &Topology::cores(1),
            HostKind::Hardware,
            &NO_HOST,
        );
        let has = |t: &CpuId, name: &str| {
            let f = feature(name).unwrap();
            let e = t
                .as_slice()
                .iter()
                .find(|e| e.function == f.leaf && e.index == f.subleaf)
                .copied();
            e.is_some_and(|e| [e.eax, e.ebx, e.ecx, e.edx][f.reg] & (1 << f.bit) != 0)
        };
        assert!(has(&t, "xsave") && has(&t, "popcnt"));
        let (off, warnings) = set_features(t.clone(), &[("xsave", false)], Missing::Warn).unwrap();
        assert!(
            !has(&off, "xsave") && has(&off, "popcnt"),
            "only xsave cleared"
        );
        assert!(warnings.is_empty());
        let (_, warnings) = set_features(t.clone(), &[("popcnt", true)], Missing::Refuse).unwrap();
        assert!(warnings.is_empty());
        // Switched on but not there: refused with enforce, a warning by default (QEMU's
        // check), nothing with check=off; the guest goes without it either way.
        let e = set_features(off.clone(), &[("xsave", true)], Missing::Refuse).unwrap_err();
        assert!(
            e.contains("'xsave' is not there") && e.ends_with("(enforce)"),
            "{e}"
        );
        let (warned, w) = set_features(off.clone(), &[("xsave", true)], Missing::Warn).unwrap();
        assert!(!has(&warned, "xsave"));
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("'xsave' is not there"), "{w:?}");
        let (_, w) = set_features(off, &[("xsave", true)], Missing::Quiet).unwrap();
        assert!(w.is_empty());
        assert_eq!(feature("sse4-1").unwrap().name, "sse4.1");
        assert_eq!(feature("sse4_2").unwrap().name, "sse4.2");
        assert!(feature("bogus").is_none());
    }

    #[test]
    fn emulating_host_hides_what_its_emulator_cannot_run() {
        let c = for_vcpu(
            &table(),
            1,
            &Topology::cores(2),
            HostKind::Emulating,
            &NO_HOST,
        );
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
        let c = for_vcpu(
            &table(),
            0,
            &Topology::cores(1),
            HostKind::Hardware,
            &NO_HOST,
        );
        let l1 = find(&c, 1).unwrap();
        assert_ne!(l1.ecx & POPCNT, 0);
        assert_eq!(l1.edx & HTT, 0, "one CPU: no HTT");
        assert!(find(&c, 0xd).is_some());
        assert!(find(&c, NICVM_EMULATED_LEAF).is_none());
    }

    // ---- a KVM table and a host as found on an AMD machine, and what each vCPU gets ----

    const BRAND: &[u8; 48] = b"AMD EPYC 7B13 64-Core Processor\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

    /// Cache descriptor (leaf 4 / 0x8000001D EAX): type, level, and sharing bits the table
    /// must rewrite (the host's own: 2 threads per core, 64 cores).
    fn cache(kind: u32, level: u32) -> u32 {
        kind | level << 5 | 1 << 8 | 1 << 14 | 63 << 26
    }

    fn amd_host(leaf: u32, sub: u32) -> [u32; 4] {
        let brand = |i: usize| u32::from_le_bytes(BRAND[i * 4..i * 4 + 4].try_into().unwrap());
        let [b, d, c] = words(b"AuthenticAMD");
        let caches = [cache(1, 1), cache(2, 1), cache(3, 2), cache(3, 3)];
        match (leaf, sub) {
            (0, _) => [0x10, b, c, d],
            (2, _) => [0x0000_0001, 0, 0, 0x00ff_0000],
            (4, s) | (0x8000_001d, s) => match caches.get(s as usize) {
                Some(&eax) => [eax, 0x01c0_003f, 0x3f + s, 0],
                None => [0; 4],
            },
            (0x8000_0000, _) => [0x8000_0021, b, c, d],
            (f @ 0x8000_0002..=0x8000_0004, _) => {
                let i = (f - 0x8000_0002) as usize * 4;
                [brand(i), brand(i + 1), brand(i + 2), brand(i + 3)]
            }
            (0x8000_0005, _) => [0xff40_ff40, 0xff40_ff40, 0x2004_0140, 0x2004_0140],
            (0x8000_0006, _) => [0x2600_2200, 0x4200_4200, 0x0200_6140, 0x0100_9140],
            _ => [0; 4],
        }
    }

    /// What KVM_GET_SUPPORTED_CPUID gave on such a host: no brand string, no TSC-deadline
    /// bit, zeroed AMD cache leaves, its own view of leaf 4, all of KVM's PV features.
    fn kvm_amd_table() -> CpuId {
        let [b, d, c] = words(b"AuthenticAMD");
        let [kb, kc, kd] = words(b"KVMKVMKVM\0\0\0");
        CpuId::from_entries(&[
            entry(0, 0, [0x10, b, c, d]),
            entry(1, 0, [0x00a0_0f11, 0x0800, POPCNT | 1 << 21, HTT | 1]),
            entry(4, 0, [cache(1, 1), 0, 0, 0]),
            entry(0xb, 0, [0, 0, 0, 0]),
            entry(0xb, 1, [0, 0, 0, 0]),
            entry(0x4000_0000, 0, [0x4000_0001, kb, kc, kd]),
            entry(0x4000_0001, 0, [0x0103_ffff, 0, 0, 1]),
            entry(0x8000_0000, 0, [0x8000_0021, b, c, d]),
            entry(0x8000_0001, 0, [0, 0, TOPOEXT | 1, RDTSCP]),
            entry(0x8000_0005, 0, [0; 4]),
            entry(0x8000_0006, 0, [0; 4]),
            entry(0x8000_0008, 0, [0x3030, 0, 0x7f, 0]),
            entry(0x8000_001e, 0, [0, 0x100, 0, 0]),
        ])
        .unwrap()
    }

    #[derive(Debug, Clone, Copy)]
    enum R {
        A,
        B,
        C,
        D,
    }

    fn reg(e: &kvm_cpuid_entry2, r: R) -> u32 {
        match r {
            R::A => e.eax,
            R::B => e.ebx,
            R::C => e.ecx,
            R::D => e.edx,
        }
    }

    /// (why, host kind, cpus, vcpu, KVM_CAP_TSC_DEADLINE_TIMER, leaf, subleaf, register, mask,
    /// expected value; None: the leaf must be absent)
    type Row = (
        &'static str,
        HostKind,
        u8,
        u8,
        bool,
        u32,
        u32,
        R,
        u32,
        Option<u32>,
    );

    #[test]
    fn the_cpu_each_kind_of_host_presents() {
        use HostKind::{Emulating as Emu, Hardware as Hw};
        // bits 0, 1, 3-7, 9-14 and 24 of kvm_para.h; not 2 (MMU_OP), 15-17.
        let pv_kept = 0x0100_7efb;
        #[rustfmt::skip]
        let rows: &[Row] = &[
            ("tsc-deadline when KVM has it",      Hw,  1, 0, true,  1, 0, R::C, TSC_DEADLINE, Some(TSC_DEADLINE)),
            ("no tsc-deadline when it has not",   Hw,  1, 0, false, 1, 0, R::C, TSC_DEADLINE, Some(0)),
            ("emulating host: no tsc-deadline",   Emu, 1, 0, true,  1, 0, R::C, TSC_DEADLINE, Some(0)),
            ("x2apic kept",                       Hw,  1, 0, true,  1, 0, R::C, 1 << 21, Some(1 << 21)),
            ("hypervisor bit",                    Hw,  1, 0, true,  1, 0, R::C, HYPERVISOR, Some(HYPERVISOR)),
            ("APIC ID of vCPU 3",                 Hw,  4, 3, true,  1, 0, R::B, 0xff00_0000, Some(3 << 24)),
            ("4 logical CPUs",                    Hw,  4, 3, true,  1, 0, R::B, 0x00ff_0000, Some(4 << 16)),
            ("brand string, first word",          Hw,  1, 0, true,  0x8000_0002, 0, R::A, !0, Some(u32::from_le_bytes(*b"AMD "))),
            ("brand string, last word",           Hw,  1, 0, true,  0x8000_0003, 0, R::D, !0, Some(u32::from_le_bytes(*b"sor\0"))),
            ("brand string, NUL padding",         Hw,  1, 0, true,  0x8000_0004, 0, R::A, !0, Some(0)),
            ("emulating host: KVM's leaves only", Emu, 1, 0, true,  0x8000_0002, 0, R::A, !0, None),
            ("L1d/L1i TLB and cache from host",   Hw,  1, 0, true,  0x8000_0005, 0, R::C, !0, Some(0x2004_0140)),
            ("L2/L3 from host",                   Hw,  1, 0, true,  0x8000_0006, 0, R::D, !0, Some(0x0100_9140)),
            ("leaf 2 from host",                  Hw,  1, 0, true,  2, 0, R::D, !0, Some(0x00ff_0000)),
            ("leaf 4: host's L2 geometry",        Hw,  2, 0, true,  4, 2, R::C, !0, Some(0x41)),
            ("leaf 4: L1d a core's own",          Hw,  2, 0, true,  4, 0, R::A, 0xfff << 14, Some(0)),
            ("leaf 4: L3 shared by 2",            Hw,  2, 0, true,  4, 3, R::A, 0xfff << 14, Some(1 << 14)),
            ("leaf 4: L3 shared by 3 (4 IDs)",    Hw,  3, 0, true,  4, 3, R::A, 0xfff << 14, Some(3 << 14)),
            ("leaf 4: 2 cores per package",       Hw,  2, 0, true,  4, 1, R::A, 0x3f << 26, Some(1 << 26)),
            ("leaf 4: type and level kept",       Hw,  2, 0, true,  4, 3, R::A, 0xff, Some(cache(3, 3) & 0xff)),
            ("leaf 4: the end subleaf",           Hw,  2, 0, true,  4, 4, R::A, !0, Some(0)),
            ("0x8000001D: L2 a core's own",       Hw,  2, 1, true,  0x8000_001d, 2, R::A, 0xfc00_0000 | 0xfff << 14, Some(0)),
            ("0x8000001D: L3 shared by 2",        Hw,  2, 1, true,  0x8000_001d, 3, R::A, 0xfff << 14, Some(1 << 14)),
            ("AMD NC: 2 cores",                   Hw,  2, 0, true,  0x8000_0008, 0, R::C, 0xff, Some(1)),
            ("AMD APIC ID size: 1 bit",           Hw,  2, 0, true,  0x8000_0008, 0, R::C, 0xf000, Some(1 << 12)),
            ("AMD NC: 1 core",                    Hw,  1, 0, true,  0x8000_0008, 0, R::C, 0xf0ff, Some(0)),
            ("0x8000001E: extended APIC ID",      Hw,  2, 1, true,  0x8000_001e, 0, R::A, !0, Some(1)),
            ("0x8000001E: one thread per unit",   Hw,  2, 1, true,  0x8000_001e, 0, R::B, !0, Some(1)),
            ("0xB: 2 logical at core level",      Hw,  2, 1, true,  0xb, 1, R::B, 0xffff, Some(2)),
            ("0xB: x2APIC ID",                    Hw,  2, 1, true,  0xb, 0, R::D, !0, Some(1)),
            ("KVM signature",                     Hw,  1, 0, true,  0x4000_0000, 0, R::B, !0, Some(u32::from_le_bytes(*b"KVMK"))),
            ("KVM features: kvm-clock, PV EOI, ...", Hw, 1, 0, true, 0x4000_0001, 0, R::A, !0, Some(pv_kept)),
            ("KVM hints: none",                   Hw,  1, 0, true,  0x4000_0001, 0, R::D, !0, Some(0)),
            ("emulating: no hypercall features",  Emu, 1, 0, true,  0x4000_0001, 0, R::A, !0, Some(0x0103_ffff & !0x6890)),
            ("emulating: no rdtscp",              Emu, 1, 0, true,  0x8000_0001, 0, R::D, RDTSCP, Some(0)),
            ("emulating: no popcnt",              Emu, 1, 0, true,  1, 0, R::C, POPCNT, Some(0)),
            ("hardware: popcnt",                  Hw,  1, 0, true,  1, 0, R::C, POPCNT, Some(POPCNT)),
            ("emulating: marker leaf",            Emu, 1, 0, true,  NICVM_EMULATED_LEAF, 0, R::B, !0, Some(u32::from_le_bytes(*b"Nicv"))),
            ("hardware: no marker leaf",          Hw,  1, 0, true,  NICVM_EMULATED_LEAF, 0, R::B, !0, None),
        ];
        for &(why, kind, cpus, vcpu, tsc_deadline, leaf, sub, r, mask, want) in rows {
            let host = HostCpu {
                tsc_deadline,
                cpuid: amd_host,
            };
            let c = for_vcpu(&kvm_amd_table(), vcpu, &Topology::cores(cpus), kind, &host);
            let e = c
                .as_slice()
                .iter()
                .find(|e| e.function == leaf && e.index == sub);
            match (e, want) {
                (None, None) => {}
                (Some(e), None) => panic!("{why}: leaf {leaf:#x}.{sub} should be absent: {e:x?}"),
                (None, Some(_)) => panic!("{why}: leaf {leaf:#x}.{sub} missing"),
                (Some(e), Some(v)) => assert_eq!(
                    reg(e, r) & mask,
                    v,
                    "{why}: leaf {leaf:#x}.{sub} {r:?} = {:#010x}",
                    reg(e, r)
                ),
            }
        }
    }

    /// `-smp` shapes as the guest reads them: APIC IDs with QEMU's bit fields (sparse for
    /// three cores), leaf 1's count per package, 0xB's shifts and counts, leaf 4's cores and
    /// sharing, 0x1F's die level, AMD's compute units.
    #[test]
    fn smp_topology_reaches_the_guest() {
        let host = HostCpu {
            tsc_deadline: true,
            cpuid: amd_host,
        };
        let topo = |sockets, dies, cores, threads| Topology {
            sockets,
            dies,
            cores,
            threads,
        };
        let leaf = |c: &CpuId, f: u32, i: u32| {
            let e = c
                .as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .unwrap_or_else(|| panic!("leaf {f:#x}.{i}"));
            [e.eax, e.ebx, e.ecx, e.edx]
        };
        for kind in [HostKind::Hardware, HostKind::Emulating] {
            // Two sockets of three cores: APIC IDs 0-2 and 4-6.
            let t = topo(2, 1, 3, 1);
            let ids: Vec<u32> = (0..6).map(|i| t.apic_id(i)).collect();
            assert_eq!(ids, [0, 1, 2, 4, 5, 6]);
            let c = for_vcpu(&kvm_amd_table(), 3, &t, kind, &host);
            let l1 = leaf(&c, 1, 0);
            assert_eq!(l1[1] >> 24, 4, "{kind:?}: vCPU 3's APIC ID");
            assert_eq!((l1[1] >> 16) & 0xff, 3, "3 logical CPUs per package");
            assert_ne!(l1[3] & HTT, 0);
            assert_eq!(leaf(&c, 0xb, 0), [0, 1, SMT_LEVEL, 4], "{kind:?}");
            assert_eq!(leaf(&c, 0xb, 1), [2, 3, CORE_LEVEL | 1, 4], "{kind:?}");
            assert_eq!(leaf(&c, 0xb, 2), [0, 0, 2, 4], "{kind:?}: the end");
            assert_eq!(leaf(&c, 4, 0)[0] >> 26, 3, "{kind:?}: 4 core IDs a package");
            assert_eq!((leaf(&c, 4, 0)[0] >> 14) & 0xfff, 0, "L1 a core's own");

            // One socket, two cores of two threads: siblings 0-1 and 2-3.
            let t = topo(1, 1, 2, 2);
            let c = for_vcpu(&kvm_amd_table(), 3, &t, kind, &host);
            assert_eq!(leaf(&c, 1, 0)[1] >> 24, 3);
            assert_eq!(leaf(&c, 0xb, 0), [1, 2, SMT_LEVEL, 3], "{kind:?}");
            assert_eq!(leaf(&c, 0xb, 1), [2, 4, CORE_LEVEL | 1, 3], "{kind:?}");
            assert_eq!(
                (leaf(&c, 4, 0)[0] >> 14) & 0xfff,
                1,
                "L1 shared by 2 threads"
            );
            assert_eq!(leaf(&c, 4, 0)[0] >> 26, 1, "2 cores a package");
            if kind == HostKind::Hardware {
                assert_eq!((leaf(&c, 4, 3)[0] >> 14) & 0xfff, 3, "L3 the package's");
                assert_eq!(
                    leaf(&c, 0x8000_001e, 0)[..2],
                    [3, 1 << 8 | 1],
                    "core 1, 2 threads"
                );
                assert_eq!(leaf(&c, 0x8000_0008, 0)[2] & 0xf0ff, 2 << 12 | 3);
            }
        }

        // Two dies of two cores: 0x1F has a die level, 0xB counts the package.
        let mut table: Vec<kvm_cpuid_entry2> = kvm_amd_table().as_slice().to_vec();
        table.push(entry(0x1f, 0, [0; 4]));
        let t = topo(1, 2, 2, 1);
        let c = for_vcpu(
            &CpuId::from_entries(&table).unwrap(),
            2,
            &t,
            HostKind::Hardware,
            &host,
        );
        assert_eq!(t.apic_id(2), 2, "die 1, core 0");
        assert_eq!(leaf(&c, 0x1f, 0), [0, 1, SMT_LEVEL, 2]);
        assert_eq!(leaf(&c, 0x1f, 1), [1, 2, CORE_LEVEL | 1, 2]);
        assert_eq!(leaf(&c, 0x1f, 2), [2, 4, 5 << 8 | 2, 2]);
        assert_eq!(leaf(&c, 0x1f, 3), [0, 0, 3, 2]);
        assert_eq!(leaf(&c, 0xb, 1), [2, 4, CORE_LEVEL | 1, 2]);
    }

    const SMT_LEVEL: u32 = 1 << 8;
    const CORE_LEVEL: u32 = 2 << 8;

    #[test]
    fn threads_an_amd_cpu_without_topoext_cannot_show() {
        let two_threads = Topology {
            threads: 2,
            ..Topology::default()
        };
        let c = for_vcpu(
            &kvm_amd_table(),
            0,
            &two_threads,
            HostKind::Hardware,
            &NO_HOST,
        );
        assert_eq!(threads_unseen(&c, &two_threads), None, "TOPOEXT there");
        let mut t: Vec<kvm_cpuid_entry2> = c.as_slice().to_vec();
        t.iter_mut()
            .filter(|e| e.function == 0x8000_0001)
            .for_each(|e| e.ecx &= !TOPOEXT);
        let c = CpuId::from_entries(&t).unwrap();
        assert!(threads_unseen(&c, &two_threads).is_some_and(|w| w.contains("2 threads")));
        assert_eq!(
            threads_unseen(&c, &Topology::cores(2)),
            None,
            "no threads asked"
        );
        let intel = for_vcpu(&table(), 0, &two_threads, HostKind::Hardware, &NO_HOST);
        assert_eq!(threads_unseen(&intel, &two_threads), None);
    }

    #[test]
    fn hardware_cache_subleaves_are_index_significant() {
        let host = HostCpu {
            tsc_deadline: true,
            cpuid: amd_host,
        };
        let c = for_vcpu(
            &kvm_amd_table(),
            0,
            &Topology::cores(2),
            HostKind::Hardware,
            &host,
        );
        let l4: Vec<_> = c.as_slice().iter().filter(|e| e.function == 4).collect();
        assert_eq!(
            l4.len(),
            5,
            "4 caches and the end marker, KVM's own subleaf gone"
        );
        assert!(l4
            .iter()
            .all(|e| e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));
        let brand: Vec<u8> = (0x8000_0002..=0x8000_0004)
            .flat_map(|f| {
                let e = find(&c, f).unwrap();
                [e.eax, e.ebx, e.ecx, e.edx]
            })
            .flat_map(u32::to_le_bytes)
            .collect();
        assert_eq!(&brand[..], &BRAND[..]);
    }
}
