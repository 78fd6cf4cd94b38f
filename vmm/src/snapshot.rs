//! Snapshots: a stopped guest written to one file (QMP `migrate` with `file:PATH`,
//! `-save-on`), and a new nicvm started from it (`-incoming file:PATH`).
//!
//! The file: a 4 KiB header (magic, format version, where the parts lie, a CRC-32 of the
//! header and one of the state), the state as JSON (machine shape, vCPUs, the in-kernel
//! irqchip/PIT/clock, every device), then guest RAM from a page boundary, its regions in
//! address order. RAM pages that are all zero are holes in the file (a guest that has booted
//! to its shell writes a few MiB of its 128), and a restore maps RAM from the file privately:
//! pages are read when the guest touches them and copied only when it writes them, so any
//! number of guests can start from one file. RAM is not checksummed (that would read it all
//! at every restore); the state is, and a state that does not parse, names another machine
//! shape or comes from another nicvm version is refused with one line, before a guest runs.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const MAGIC: &[u8; 8] = b"NICVMSNP";
/// Bumped whenever what the state means changes (2: the machine's `-cpu` switches).
const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: u64 = 4096;
const PAGE: u64 = 4096;
/// A state larger than this is not one nicvm wrote.
/// (A state holds about 13 KiB per vCPU and 20-70 KiB per NIC: 2 MiB with every slot an
/// e1000; parsing costs about 16 bytes of memory per byte of JSON.)
const MAX_STATE_LEN: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a nicvm snapshot", .0.display())]
    NotSnapshot(PathBuf),
    // `what` may quote the file (a field's name, a version string): shown escaped and cut.
    #[error("{}: damaged snapshot ({})", path.display(), shown(what, 400))]
    Damaged { path: PathBuf, what: String },
    #[error("{}: {}", path.display(), shown(what, 400))]
    Incompatible { path: PathBuf, what: String },
    #[error("{0}")]
    Save(String),
}

/// What the restoring command line must build the same way: RAM size, vCPUs, the CPU
/// features taken away with `-cpu`, and each NIC (model, MAC, slot) in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineShape {
    /// What kind of KVM ran it ("hardware KVM", "emulating KVM ..."): their vCPU states
    /// differ (an emulating host has MSRs of its own).
    pub host: String,
    pub mem_mib: u64,
    pub cpus: u8,
    /// `-cpu` as [`crate::cpuid::describe`] puts it: a guest that found AVX at boot must
    /// find it after a restore.
    pub cpu: String,
    pub nics: Vec<(String, String, u8)>,
}

/// One vCPU as KVM holds it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: Option<kvm_xcrs>,
    debug_regs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<(u32, u64)>,
    events: kvm_vcpu_events,
}

/// The VM-wide in-kernel devices.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
    clock: kvm_clock_data,
}

/// The emulated devices' states.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceStates {
    pub pci: devices::snapshot::State,
    pub serial: devices::snapshot::State,
    pub i8042: devices::snapshot::State,
    pub cmos: devices::snapshot::State,
}

/// Everything but RAM.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    /// The nicvm version that wrote it: another version's devices may mean other things.
    pub nicvm: String,
    pub machine: MachineShape,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: DeviceStates,
}

impl Clone for VcpuState {
    fn clone(&self) -> Self {
        VcpuState {
            // kvm_xsave is plain data but not Clone (its flexible array member).
            xsave: kvm_xsave {
                region: self.xsave.region,
                ..Default::default()
            },
            msrs: self.msrs.clone(),
            ..*self
        }
    }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

impl VcpuState {
    /// Reads a stopped vCPU (its thread, between KVM_RUNs). `msr_list` is what KVM says it
    /// saves and restores; MSRs this vCPU refuses to read are left out.
    pub fn capture(vcpu: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, String> {
        let mp_state = vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
        let regs = vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
        let sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
        let xsave = vcpu.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
        let xcrs = vcpu.get_xcrs().ok();
        let debug_regs = vcpu
            .get_debug_regs()
            .map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
        let lapic = vcpu.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
        let msrs = read_msrs(vcpu, msr_list)?;
        let events = vcpu
            .get_vcpu_events()
            .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            msrs,
            events,
        })
    }

    /// Puts the state into a vCPU that has its CPUID set and has not run: first the
    /// registers (no guest memory needed), then, once guest RAM is registered with KVM,
    /// [`VcpuState::apply_msrs_and_events`].
    pub fn apply_registers(&self, vcpu: &VcpuFd) -> Result<(), String> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm_err("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        // SAFETY: a whole kvm_xsave (its legacy 4 KiB form), whatever a snapshot file put in
        // it: KVM_SET_XSAVE reads no more than that struct, since nicvm never asks for the
        // dynamic XSAVE features (ARCH_REQ_XCOMP_GUEST_PERM) that would make it read beyond.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(x).map_err(kvm_err("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(kvm_err("KVM_SET_LAPIC"))?;
        Ok(())
    }

    pub fn apply_msrs_and_events(&self, vcpu: &VcpuFd) -> Result<(), String> {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = self
            .msrs
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSRs: {e:?}"))?;
        let set = vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(format!(
                "KVM_SET_MSRS: MSR {:#x} refused",
                entries[set].index
            ));
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads `list` in one KVM_GET_MSRS, dropping each MSR the vCPU refuses (KVM stops at the
/// first) and reading the rest again.
fn read_msrs(vcpu: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let mut want: Vec<u32> = list.to_vec();
    let mut out = Vec::with_capacity(want.len());
    while !want.is_empty() {
        let entries: Vec<kvm_bindings::kvm_msr_entry> = want
            .iter()
            .map(|&index| kvm_bindings::kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSRs: {e:?}"))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        // want[n] could not be read: skip it.
        want.drain(..(n + 1).min(want.len()));
    }
    Ok(out)
}

impl VmState {
    pub fn capture(vm: &VmFd) -> Result<VmState, String> {
        let chip = |id| -> Result<kvm_irqchip, String> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            Ok(c)
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
        })
    }

    pub fn apply(&self, vm: &VmFd) -> Result<(), String> {
        for (c, id) in [
            (&self.pic_master, KVM_IRQCHIP_PIC_MASTER),
            (&self.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
            (&self.ioapic, KVM_IRQCHIP_IOAPIC),
        ] {
            if c.chip_id != id {
                return Err(format!("irqchip {id}: saved as chip {}", c.chip_id));
            }
            vm.set_irqchip(c).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(kvm_err("KVM_SET_PIT2"))?;
        // The guest's clock goes on from where it stood (only the clock value is given: the
        // flags KVM reported are about the host it was read on).
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

/// A vCPU's state (or why it could not be read) and the wake generation it was read for.
type Published = (u64, Result<VcpuState, String>);

/// The vCPUs' states as each vCPU thread reads its own when it stops for a pause.
#[derive(Default)]
pub struct VcpuStates {
    slots: Mutex<Vec<Option<Published>>>,
    changed: Condvar,
}

impl VcpuStates {
    pub fn new(n: usize) -> VcpuStates {
        VcpuStates {
            slots: Mutex::new(vec![None; n]),
            changed: Condvar::new(),
        }
    }

    /// Forgets every state (a saver is about to ask for fresh ones).
    pub fn clear(&self) {
        self.slots
            .lock()
            .unwrap()
            .iter_mut()
            .for_each(|s| *s = None);
    }

    /// vCPU `id`'s state read for wake `generation` (None: it runs again).
    pub fn publish(&self, id: usize, generation: u64, state: Option<Result<VcpuState, String>>) {
        let state = state.map(|s| (generation, s));
        let mut s = self.slots.lock().unwrap();
        if let Some(slot) = s.get_mut(id) {
            *slot = state;
        }
        self.changed.notify_all();
    }

    /// Every vCPU's state once each has published one read for wake `generation` or later
    /// (one read before it, when the vCPU parked, may predate what the saver locked), or an
    /// error after `timeout`.
    pub fn collect(
        &self,
        generation: u64,
        timeout: std::time::Duration,
    ) -> Result<Vec<VcpuState>, String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.slots.lock().unwrap();
        loop {
            if s.iter()
                .all(|x| x.as_ref().is_some_and(|(g, _)| *g >= generation))
            {
                return s
                    .iter()
                    .enumerate()
                    .map(|(i, x)| match &x.as_ref().expect("all published").1 {
                        Ok(v) => Ok(v.clone()),
                        Err(e) => Err(format!("vCPU {i}: {e}")),
                    })
                    .collect();
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                return Err("the vCPUs did not stop".into());
            }
            s = self.changed.wait_timeout(s, deadline - now).unwrap().0;
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Header {
    state_len: u64,
    state_crc: u32,
    mem_offset: u64,
    mem_len: u64,
}

impl Header {
    fn encode(&self) -> Vec<u8> {
        let mut h = vec![0u8; HEADER_LEN as usize];
        h[0..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..20].copy_from_slice(&self.state_len.to_le_bytes());
        h[20..24].copy_from_slice(&self.state_crc.to_le_bytes());
        h[24..32].copy_from_slice(&self.mem_offset.to_le_bytes());
        h[32..40].copy_from_slice(&self.mem_len.to_le_bytes());
        let crc = crc32fast::hash(&h[0..40]);
        h[40..44].copy_from_slice(&crc.to_le_bytes());
        h
    }

    fn decode(h: &[u8], path: &Path, file_len: u64) -> Result<Header, SnapshotError> {
        let damaged = |what: &str| SnapshotError::Damaged {
            path: path.into(),
            what: what.into(),
        };
        if h.len() < HEADER_LEN as usize || &h[0..8] != MAGIC {
            return Err(SnapshotError::NotSnapshot(path.into()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().unwrap());
        if crc32fast::hash(&h[0..40]) != u32_at(40) {
            return Err(damaged("header checksum"));
        }
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(SnapshotError::Incompatible {
                path: path.into(),
                what: format!(
                    "snapshot format {version}, this nicvm reads format {FORMAT_VERSION}"
                ),
            });
        }
        let hd = Header {
            state_len: u64_at(12),
            state_crc: u32_at(20),
            mem_offset: u64_at(24),
            mem_len: u64_at(32),
        };
        let state_end = HEADER_LEN.checked_add(hd.state_len);
        let mem_end = hd.mem_offset.checked_add(hd.mem_len);
        match (state_end, mem_end) {
            (Some(se), Some(me))
                if hd.state_len <= MAX_STATE_LEN
                    && se <= hd.mem_offset
                    && hd.mem_offset.is_multiple_of(PAGE)
                    && hd.mem_len.is_multiple_of(PAGE)
                    && me <= file_len => {}
            _ => return Err(damaged("parts out of place or file cut short")),
        }
        Ok(hd)
    }
}

/// Writes `state` and the guest RAM `mem` to `path` (replaced if it exists; written under a
/// temporary name beside it and renamed, so a reader never sees half a snapshot).
pub fn write(path: &Path, state: &State, mem: &GuestMemoryMmap) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.into(),
        source,
    };
    let target = destination(path).map_err(io)?;
    let path = target.as_path();
    let json = serde_json::to_vec(state).map_err(|e| SnapshotError::Save(e.to_string()))?;
    let state_len = json.len() as u64;
    let mem_offset = (HEADER_LEN + state_len).div_ceil(PAGE) * PAGE;
    let mem_len: u64 = mem.iter().map(|r| r.len()).sum();
    let header = Header {
        state_len,
        state_crc: crc32fast::hash(&json),
        mem_offset,
        mem_len,
    };
    remove_stale_temps(path);
    let (tmp, mut f) = create_temp(path).map_err(io)?;
    let result = (|| {
        f.write_all(&header.encode())?;
        f.write_all(&json)?;
        let mut at = mem_offset;
        for region in mem.iter() {
            write_region(&f, region, at)?;
            at += region.len();
        }
        f.set_len(mem_offset + mem_len)?;
        // On disk before it has the name: a crash never leaves a snapshot with holes there.
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// A new file beside `path` (a dot name with the pid and a clock-derived suffix), created
/// exclusively: never one that exists, nor through a symlink planted there; readable by its
/// owner only (it holds guest RAM).
fn create_temp(path: &Path) -> std::io::Result<(PathBuf, File)> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("not a file name"))?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let mut last = std::io::Error::other("no free temporary name");
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(
            ".nicvm-{}-{nanos:08x}{attempt}",
            std::process::id()
        ));
        let tmp = dir.map_or_else(|| PathBuf::from(&tmp_name), |d| d.join(&tmp_name));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((tmp, f)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Where a snapshot for `path` goes, written beside it and renamed over it: `path`, or the
/// file a symlink there names (followed as an open would: the link stays, the file it names
/// is replaced). Anything there but a regular file is refused: a device (`/dev/null`), a FIFO
/// or a socket would be replaced by the snapshot, not written into.
fn destination(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    // As the kernel's limit on the links one path may pass through.
    for _ in 0..40 {
        let m = match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            r => r?,
        };
        if m.is_file() {
            return Ok(p);
        }
        if m.is_dir() {
            return Err(std::io::Error::from_raw_os_error(libc::EISDIR));
        }
        if !m.file_type().is_symlink() {
            return Err(std::io::Error::other(
                "not a regular file (a snapshot is a file of its own: it is not written into \
                 a device, FIFO or socket)",
            ));
        }
        let link = std::fs::read_link(&p)?;
        p = match p.parent() {
            Some(dir) if link.is_relative() => dir.join(link),
            _ => link,
        };
    }
    Err(std::io::Error::from_raw_os_error(libc::ELOOP))
}

/// Removes what saves to `path` by nicvm processes that no longer exist left of their
/// temporary files (see [`create_temp`]: a nicvm killed while writing, by SIGKILL say, leaves
/// its partial file, as large as guest RAM).
fn remove_stale_temps(path: &Path) {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty());
    let prefix = format!(".{name}.nicvm-");
    let Ok(entries) = std::fs::read_dir(dir.unwrap_or(Path::new("."))) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<libc::pid_t>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only asks whether the process exists.
        let gone = pid > 0
            && unsafe { libc::kill(pid, 0) } != 0
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && e.file_type().is_ok_and(|t| t.is_file()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Whether a snapshot can be written to `path` (a regular file or nothing there, through any
/// symlinks, in a directory that takes a new file): checked when nicvm starts, before the
/// guest runs.
pub fn check_writable(path: &Path) -> Result<(), SnapshotError> {
    let io = |source| SnapshotError::Io {
        path: path.into(),
        source,
    };
    let (tmp, _) = create_temp(&destination(path).map_err(io)?).map_err(io)?;
    let _ = std::fs::remove_file(tmp);
    Ok(())
}

/// Writes one RAM region at `at`, leaving all-zero chunks as holes.
fn write_region(f: &File, region: &vm_memory::GuestRegionMmap, at: u64) -> std::io::Result<()> {
    const CHUNK: usize = 64 << 10;
    let len = region.len() as usize;
    let host = region.as_ptr();
    let mut off = 0;
    while off < len {
        let n = CHUNK.min(len - off);
        // SAFETY: [off, off + n) lies inside the region's mapping, which lives as long as
        // `region`; the vCPUs are stopped and the devices locked, so nothing writes it now
        // (the kernel loader may still be filling in pages: a page not yet there is waited
        // for when read, and arrives whole, never to change under the slice).
        let chunk = unsafe { std::slice::from_raw_parts(host.add(off), n) };
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, at + off as u64)?;
        }
        off += n;
    }
    Ok(())
}

/// A snapshot file whose header was read and checked: its RAM can be mapped (and registered
/// with KVM, which takes milliseconds) while its state is read.
pub struct IncomingHeader {
    path: PathBuf,
    file: File,
    header: Header,
}

impl IncomingHeader {
    pub fn open(path: &Path) -> Result<IncomingHeader, SnapshotError> {
        let io = |source| SnapshotError::Io {
            path: path.into(),
            source,
        };
        let mut file = crate::open::regular_file(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut h = vec![0u8; HEADER_LEN as usize];
        let got = read_up_to(&mut file, &mut h).map_err(io)?;
        h.truncate(got);
        let header = Header::decode(&h, path, file_len)?;
        Ok(IncomingHeader {
            path: path.into(),
            file,
            header,
        })
    }

    /// A read lease on the file, which tells when another process wants to write it (see
    /// [`crate::ram_lease`]); None where none can be had.
    pub fn lease(&self) -> Option<crate::ram_lease::RamLease> {
        crate::ram_lease::RamLease::take(&self.file, self.path.clone())
    }

    /// Guest RAM mapped privately from the file (copy-on-write), in the regions `ranges`.
    pub fn map_memory(
        &self,
        ranges: &[(vm_memory::GuestAddress, usize)],
    ) -> Result<GuestMemoryMmap, SnapshotError> {
        let total: u64 = ranges.iter().map(|r| r.1 as u64).sum();
        if total != self.header.mem_len {
            return Err(SnapshotError::Damaged {
                path: self.path.clone(),
                what: format!(
                    "{} bytes of RAM for a {total}-byte machine",
                    self.header.mem_len
                ),
            });
        }
        let mut regions = vec![];
        let mut at = self.header.mem_offset;
        for &(base, size) in ranges {
            let fd = self.file.try_clone().map_err(|source| SnapshotError::Io {
                path: self.path.clone(),
                source,
            })?;
            let region = vm_memory::mmap::MmapRegionBuilder::new(size)
                .with_file_offset(vm_memory::FileOffset::new(fd, at))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| SnapshotError::Save(format!("mapping guest RAM: {e}")))?;
            regions.push(
                vm_memory::GuestRegionMmap::new(region, base)
                    .ok_or_else(|| SnapshotError::Save("guest RAM regions overlap".into()))?,
            );
            at += size as u64;
        }
        GuestMemoryMmap::from_regions(regions)
            .map_err(|e| SnapshotError::Save(format!("guest RAM: {e}")))
    }

    /// Reads and checks the state.
    pub fn read(mut self) -> Result<Incoming, SnapshotError> {
        let path = self.path.clone();
        let io = |source| SnapshotError::Io {
            path: path.clone(),
            source,
        };
        let mut json = vec![0u8; self.header.state_len as usize];
        self.file.seek(SeekFrom::Start(HEADER_LEN)).map_err(io)?;
        self.file.read_exact(&mut json).map_err(io)?;
        if crc32fast::hash(&json) != self.header.state_crc {
            return Err(SnapshotError::Damaged {
                path,
                what: "state checksum".into(),
            });
        }
        let state: State = serde_json::from_slice(&json).map_err(|e| SnapshotError::Damaged {
            path: path.clone(),
            what: format!("state: {e}"),
        })?;
        if state.nicvm != env!("CARGO_PKG_VERSION") {
            return Err(SnapshotError::Incompatible {
                path,
                what: format!(
                    "written by nicvm {}, this is nicvm {}",
                    state.nicvm,
                    env!("CARGO_PKG_VERSION")
                ),
            });
        }
        Ok(Incoming { head: self, state })
    }
}

/// A snapshot file opened for restoring, its state read and checked.
pub struct Incoming {
    head: IncomingHeader,
    pub state: State,
}

impl Incoming {
    pub fn open(path: &Path) -> Result<Incoming, SnapshotError> {
        IncomingHeader::open(path)?.read()
    }

    pub fn path(&self) -> &Path {
        &self.head.path
    }

    pub fn map_memory(
        &self,
        ranges: &[(vm_memory::GuestAddress, usize)],
    ) -> Result<GuestMemoryMmap, SnapshotError> {
        self.head.map_memory(ranges)
    }

    /// Refuses host kind, RAM size, vCPU count or `-cpu` switches other than saved (before
    /// anything of the VM is built; NICs are checked once they are).
    pub fn check_size(
        &self,
        host: &str,
        mem_mib: u64,
        cpus: u8,
        cpu: &str,
    ) -> Result<(), SnapshotError> {
        self.check_shape(&MachineShape {
            host: host.into(),
            mem_mib,
            cpus,
            cpu: cpu.into(),
            nics: self.state.machine.nics.clone(),
        })
    }

    /// Refuses a machine other than the one saved, naming what differs.
    pub fn check_shape(&self, here: &MachineShape) -> Result<(), SnapshotError> {
        let saved = &self.state.machine;
        // What the file says is shown escaped and cut short: it may be anything.
        let shown = |s: &str| shown(s, 120);
        let what = if saved.host != here.host {
            format!(
                "saved on {}, this host has {}",
                shown(&saved.host),
                here.host
            )
        } else if saved.mem_mib != here.mem_mib {
            format!(
                "saved with -m {}M, restoring with -m {}M",
                saved.mem_mib, here.mem_mib
            )
        } else if saved.cpus != here.cpus {
            format!(
                "saved with -smp {}, restoring with -smp {}",
                saved.cpus, here.cpus
            )
        } else if saved.cpu != here.cpu {
            format!(
                "saved with -cpu {}, restoring with -cpu {} (give the same -cpu switches)",
                shown(&saved.cpu),
                here.cpu
            )
        } else if saved.nics != here.nics {
            let list = |n: &[(String, String, u8)]| {
                n.iter()
                    .map(|(m, mac, slot)| format!("{m} {mac} in slot {slot}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            format!(
                "saved with NICs [{}], restoring with [{}] (give the same -device/-nic \
                 options, and the same -M, -vga none and -nodefaults: they choose the slots)",
                shown(&list(&saved.nics)),
                list(&here.nics)
            )
        } else if self.state.vcpus.len() != saved.cpus as usize {
            return Err(SnapshotError::Damaged {
                path: self.head.path.clone(),
                what: "vCPU count".into(),
            });
        } else {
            return Ok(());
        };
        Err(SnapshotError::Incompatible {
            path: self.head.path.clone(),
            what,
        })
    }
}

/// `s` as a message may show text from a file: control characters escaped, and cut after
/// `max` characters.
fn shown(s: &str, max: usize) -> String {
    let mut e = String::new();
    for c in s.chars() {
        if c.is_control() {
            e.extend(c.escape_default());
        } else {
            e.push(c);
        }
    }
    match e.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &e[..i]),
        None => e,
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..])? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

/// Parses and checks a snapshot file's header and state, as `-incoming` does, without any
/// VM: for the fuzzer and tests.
pub fn check_file(path: &Path) -> Result<(), SnapshotError> {
    Incoming::open(path).map(|_| ())
}

/// What a snapshot is taken of: shared with the monitor (QMP `migrate`) and the `-save-on`
/// watcher.
pub struct Saver {
    pub vm: std::sync::Arc<VmFd>,
    pub mem: GuestMemoryMmap,
    pub root: std::sync::Arc<devices::pci::PciRoot>,
    pub serial: std::sync::Arc<Mutex<devices::legacy::Serial>>,
    pub i8042: std::sync::Arc<Mutex<devices::legacy::I8042>>,
    pub cmos: std::sync::Arc<Mutex<devices::legacy::Cmos>>,
    pub pause: std::sync::Arc<crate::vcpu::PauseStates>,
    pub lifecycle: std::sync::Arc<devices::lifecycle::Lifecycle>,
    pub shape: MachineShape,
    /// Held while a snapshot is written, and while guest RAM leaves its snapshot file (see
    /// [`crate::ram_lease`]): one at a time, and no `stop` or `cont` meanwhile.
    pub saving: Mutex<()>,
}

/// How long a save waits for the serial port (see [`Saver::save`]).
const SERIAL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The lock of `m`, waited for `within` at most.
fn lock_within<T>(
    m: &Mutex<T>,
    within: std::time::Duration,
) -> Option<std::sync::MutexGuard<'_, T>> {
    let t0 = std::time::Instant::now();
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => return Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) if t0.elapsed() >= within => return None,
            Err(std::sync::TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
        }
    }
}

impl Saver {
    /// Writes the snapshot of a paused guest (its vCPUs parked) to `path`. Every device is
    /// locked first, so that nothing writes guest RAM or raises an interrupt any more; only
    /// then are the vCPUs (each on its own thread), the irqchip, PIT and clock read, then the
    /// devices, then RAM written.
    pub fn save(&self, path: &Path) -> Result<(), SnapshotError> {
        self.save_holding(&self.saving.lock().unwrap(), path)
    }

    /// [`Saver::save`] with [`Saver::saving`] already held (by a caller that stopped the
    /// vCPUs while holding it).
    pub fn save_holding(
        &self,
        _one_at_a_time: &std::sync::MutexGuard<'_, ()>,
        path: &Path,
    ) -> Result<(), SnapshotError> {
        let t0 = std::time::Instant::now();
        // A vCPU writing the guest's console to a stdout nobody reads holds the serial port
        // until it can: the save gives up rather than hang the monitor with it.
        let serial = lock_within(&self.serial, SERIAL_WAIT).ok_or_else(|| {
            SnapshotError::Save(format!(
                "the serial port's output has been blocked for {} s (its reader is not \
                 reading); try again once it reads",
                SERIAL_WAIT.as_secs()
            ))
        })?;
        let i8042 = self.i8042.lock().unwrap();
        let cmos = self.cmos.lock().unwrap();
        let r = self.root.with_devices_locked(|pci| {
            self.pause.states.clear();
            let generation = self.lifecycle.wake_parked();
            let vcpus = self
                .pause
                .states
                .collect(generation, std::time::Duration::from_secs(2))
                .map_err(SnapshotError::Save)?;
            let vm = VmState::capture(&self.vm).map_err(SnapshotError::Save)?;
            let state = State {
                nicvm: env!("CARGO_PKG_VERSION").into(),
                machine: self.shape.clone(),
                vcpus,
                vm,
                devices: DeviceStates {
                    pci,
                    serial: serial.save(),
                    i8042: i8042.save(),
                    cmos: cmos.save(),
                },
            };
            write(path, &state, &self.mem)
        });
        log::debug!(
            "snapshot written to {} in {:.1} ms",
            path.display(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        r
    }
}

/// A state as a snapshot of a machine that never ran would hold (KVM structures zeroed, no
/// devices): for the fuzzer's starting files and tests, never restored into a guest.
#[doc(hidden)]
pub fn sample_state(mem_mib: u64, cpus: u8) -> State {
    let vcpu = VcpuState {
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Some(Default::default()),
        debug_regs: Default::default(),
        lapic: Default::default(),
        msrs: vec![(0x10, 1), (0xc000_0080, 0x500)],
        events: Default::default(),
    };
    let chip = |chip_id| kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    State {
        nicvm: env!("CARGO_PKG_VERSION").into(),
        machine: MachineShape {
            host: "hardware KVM".into(),
            mem_mib,
            cpus,
            cpu: "host".into(),
            nics: vec![("e1000".into(), "52:54:00:12:34:56".into(), 3)],
        },
        vcpus: (0..cpus).map(|_| vcpu.clone()).collect(),
        vm: VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER),
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE),
            ioapic: chip(KVM_IRQCHIP_IOAPIC),
            pit: Default::default(),
            clock: Default::default(),
        },
        devices: DeviceStates {
            pci: serde_json::json!({"config_address": 0, "slots": []}),
            serial: serde_json::Value::Null,
            i8042: serde_json::json!({}),
            cmos: serde_json::json!({"index": 0}),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    /// A state a vCPU read when it parked, before the saver locked the devices and woke it,
    /// is not taken: only one read for that wake or a later one (a review found the first
    /// kind taken, and an interrupt raised in between lost on restore).
    #[test]
    fn a_vcpu_state_from_before_the_wake_is_not_taken() {
        let states = VcpuStates::new(1);
        states.publish(0, 1, Some(Err("read on parking".into())));
        let short = std::time::Duration::from_millis(50);
        let err = |r: Result<Vec<VcpuState>, String>| r.err().expect("an error");
        assert_eq!(err(states.collect(2, short)), "the vCPUs did not stop");
        states.publish(0, 2, Some(Err("read for the wake".into())));
        assert_eq!(err(states.collect(2, short)), "vCPU 0: read for the wake");
    }

    /// -save-on's check at start: a directory is refused then (a review found it accepted,
    /// and the save failing after the guest had booted), a new file in one is not.
    #[test]
    fn a_directory_is_no_place_to_save_to() {
        let dir = std::env::temp_dir().join(format!("nicvm-snap-dir-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let e = check_writable(&dir).unwrap_err().to_string();
        let ok = check_writable(&dir.join("s"));
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.ends_with("Is a directory (os error 21)"), "{e}");
        assert!(ok.is_ok(), "{ok:?}");
    }

    /// A snapshot replaces a file; what is not one is refused, and a symlink is followed (a
    /// try-out saw `migrate file:/dev/null` replace the device with a 128 MiB file, a FIFO
    /// replaced under its reader, and a symlink replaced, its file left as it was).
    #[test]
    fn a_snapshot_replaces_files_only_through_symlinks_too() {
        let dir = std::env::temp_dir().join(format!("nicvm-snap-dest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let ranges = [(vm_memory::GuestAddress(0), 1 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        // Not /dev/null itself: were this to fail, the host would lose it.
        let sock = dir.join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        for p in [&sock, &fifo] {
            let e = check_writable(p).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
            let e = write(p, &sample_state(1, 1), &mem).unwrap_err().to_string();
            assert!(e.contains("not a regular file"), "{e}");
        }
        assert!(std::fs::metadata(&sock).unwrap().file_type().is_socket());
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo());
        // A link to a file, through a relative link to a link; and one to nothing yet.
        std::fs::write(dir.join("real"), b"old").unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("abs")).unwrap();
        std::os::unix::fs::symlink("abs", dir.join("rel")).unwrap();
        std::os::unix::fs::symlink(dir.join("new"), dir.join("dangling")).unwrap();
        for (link, file) in [("rel", "real"), ("dangling", "new")] {
            check_writable(&dir.join(link)).unwrap();
            write(&dir.join(link), &sample_state(1, 1), &mem).unwrap();
            assert!(std::fs::symlink_metadata(dir.join(link))
                .unwrap()
                .file_type()
                .is_symlink());
            Incoming::open(&dir.join(file)).unwrap();
        }
        std::os::unix::fs::symlink("loop", dir.join("loop")).unwrap();
        let e = check_writable(&dir.join("loop")).unwrap_err().to_string();
        assert!(e.contains("os error 40"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A save removes the temporary files saves to the same path left when their nicvm died
    /// (a try-out's SIGKILL during a migrate left 29 MB), not those of a live one or others.
    #[test]
    fn a_save_removes_what_dead_saves_left() {
        let dir = std::env::temp_dir().join(format!("nicvm-snap-stale-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // A pid no process has: above the kernel's largest.
        let dead = ".s.nicvm-4194305-0000abcd0";
        let live = format!(".s.nicvm-{}-0000abcd0", std::process::id());
        for f in [dead, &live, ".t.nicvm-4194305-0000abcd0", "other"] {
            std::fs::write(dir.join(f), b"x").unwrap();
        }
        let mem = GuestMemoryMmap::from_ranges(&[(vm_memory::GuestAddress(0), 1 << 20)]).unwrap();
        write(&dir.join("s"), &sample_state(1, 1), &mem).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            left,
            [live.as_str(), ".t.nicvm-4194305-0000abcd0", "other", "s"]
        );
    }

    #[test]
    fn a_written_snapshot_reads_back_with_holes_for_zero_pages() {
        let dir = std::env::temp_dir().join(format!("nicvm-snap-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let ranges = [(vm_memory::GuestAddress(0), 1 << 20)];
        let mem = GuestMemoryMmap::from_ranges(&ranges).unwrap();
        vm_memory::Bytes::write_slice(&mem, b"guest bytes", vm_memory::GuestAddress(0x5000))
            .unwrap();
        write(&path, &sample_state(1, 2), &mem).unwrap();
        let inc = Incoming::open(&path).unwrap();
        let hw = "hardware KVM";
        inc.check_size(hw, 1, 2, "host").unwrap();
        let e = |host, m, c| inc.check_size(host, m, c, "host").unwrap_err().to_string();
        assert!(e(hw, 2, 2).contains("-m 1M"));
        assert!(e(hw, 1, 1).contains("-smp 2"));
        let cpu = inc
            .check_size(hw, 1, 2, &crate::cpuid::describe(&[("avx", false)]))
            .unwrap_err()
            .to_string();
        assert!(
            cpu.contains("saved with -cpu host, restoring with -cpu host,-avx"),
            "{cpu}"
        );
        // Any message quoting the file too (a field's name in a parse error, a version).
        let quoted = SnapshotError::Damaged {
            path: "f".into(),
            what: format!("unknown field `{}`", "\x1b]0;x\x07".repeat(10_000)),
        }
        .to_string();
        assert!(!quoted.contains('\x1b') && quoted.len() < 600, "{quoted}");
        // What the file says is shown escaped and cut short.
        let mut odd = Incoming::open(&path).unwrap();
        odd.state.machine.host = "\x1b[2J".repeat(1000);
        let shown = odd.check_size(hw, 1, 2, "host").unwrap_err().to_string();
        assert!(
            !shown.contains('\x1b') && shown.contains("\\u{1b}[2J"),
            "{shown}"
        );
        assert!(shown.len() < 400 && shown.contains("..."), "{shown}");
        let other = e("emulating KVM", 1, 2);
        assert!(
            other.contains("saved on hardware KVM, this host has emulating KVM"),
            "{other}"
        );
        let restored = inc.map_memory(&ranges).unwrap();
        let mut b = [0u8; 11];
        vm_memory::Bytes::read_slice(&restored, &mut b, vm_memory::GuestAddress(0x5000)).unwrap();
        assert_eq!(&b, b"guest bytes");
        // Private: a write to the restored RAM leaves the file as it was.
        vm_memory::Bytes::write_slice(&restored, b"CHANGED", vm_memory::GuestAddress(0x5000))
            .unwrap();
        let again = Incoming::open(&path).unwrap().map_memory(&ranges).unwrap();
        vm_memory::Bytes::read_slice(&again, &mut b, vm_memory::GuestAddress(0x5000)).unwrap();
        assert_eq!(&b, b"guest bytes");
        // Only the page that holds something takes room on disk (the rest are holes).
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(
            blocks < 512 << 10,
            "{blocks} bytes on disk for 1 MiB of mostly zero RAM"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn header_round_trip_and_damage() {
        let hd = Header {
            state_len: 100,
            state_crc: 7,
            mem_offset: 8192,
            mem_len: 4096,
        };
        let bytes = hd.encode();
        let p = Path::new("x");
        assert_eq!(Header::decode(&bytes, p, 12288).unwrap(), hd);
        // Cut short, a flipped bit, another format, not a snapshot at all.
        assert!(Header::decode(&bytes, p, 12287).is_err());
        let mut b = bytes.clone();
        b[13] ^= 1;
        assert!(matches!(
            Header::decode(&b, p, 1 << 30),
            Err(SnapshotError::Damaged { .. })
        ));
        let mut b = bytes.clone();
        b[8] = 9;
        let crc = crc32fast::hash(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        let e = Header::decode(&b, p, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("snapshot format 9"), "{e}");
        assert!(matches!(
            Header::decode(&[0u8; 4096], p, 4096),
            Err(SnapshotError::NotSnapshot(_))
        ));
        // Parts that overlap or overflow.
        let bad = Header {
            state_len: u64::MAX - 10,
            ..hd
        };
        assert!(Header::decode(&bad.encode(), p, u64::MAX).is_err());
        let bad = Header {
            mem_offset: 4096,
            ..hd
        };
        assert!(Header::decode(&bad.encode(), p, 1 << 30).is_err());
    }
}
