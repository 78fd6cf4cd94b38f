//! vCPU set-up (registers for the chosen entry, CPUID, LAPIC) and the run loop that dispatches
//! port and MMIO exits to the buses and turns fatal exits into an exit reason.

use crate::boot::{Entry, EntryMode};
use crate::layout::*;
use devices::bus::Bus;
use devices::lifecycle::{ExitReason, Lifecycle};
use kvm_bindings::{kvm_fpu, kvm_segment, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::sync::Arc;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub struct Buses {
    pub pio: Bus,
    pub mmio: Bus,
}

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

fn segment(entry: u64, selector: u16) -> kvm_segment {
    let flag = |shift: u64, bits: u64| ((entry >> shift) & bits) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let l = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            if flag(55, 1) == 1 {
                (l << 12) | 0xfff
            } else {
                l
            }
        },
        selector,
        type_: flag(40, 0xf),
        present: flag(47, 1),
        dpl: flag(45, 3),
        db: flag(54, 1),
        s: flag(44, 1),
        l: flag(53, 1),
        g: flag(55, 1),
        avl: flag(52, 1),
        unusable: (flag(47, 1) == 0) as u8,
        padding: 0,
    }
}

/// Registers for the boot vCPU. Application processors wait for INIT/SIPI in KVM.
/// A vCPU that could not be set up: the step and what KVM (or guest memory) said.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("vCPU set-up: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("vCPU set-up: writing the GDT: {0}")]
    Gdt(vm_memory::GuestMemoryError),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SetupError {
    move |e| SetupError::Kvm(what, e)
}

pub fn setup_boot_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    entry: Entry,
) -> Result<(), SetupError> {
    let long = entry.mode == EntryMode::Linux64;
    let code = if long {
        gdt_entry(0xa09b, 0, 0xfffff)
    } else {
        gdt_entry(0xc09b, 0, 0xfffff)
    };
    let gdt = [
        0,
        code,
        gdt_entry(0xc093, 0, 0xfffff),
        gdt_entry(0x808b, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_START + i as u64 * 8))
            .map_err(SetupError::Gdt)?;
    }
    let mut s = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let cs = segment(gdt[1], 0x08);
    let ds = segment(gdt[2], 0x10);
    s.cs = cs;
    s.ds = ds;
    s.es = ds;
    s.fs = ds;
    s.gs = ds;
    s.ss = ds;
    s.tr = segment(gdt[3], 0x18);
    s.gdt.base = GDT_START;
    s.gdt.limit = (gdt.len() * 8 - 1) as u16;
    s.idt.base = 0;
    s.idt.limit = 0;
    if long {
        s.cr3 = PML4_START;
        s.cr4 |= X86_CR4_PAE;
        s.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
        s.efer |= EFER_LME | EFER_LMA;
    } else {
        s.cr0 = X86_CR0_PE | X86_CR0_ET;
        s.cr4 = 0;
        s.efer = 0;
    }
    vcpu.set_sregs(&s).map_err(kvm("KVM_SET_SREGS"))?;

    let mut r = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    r.rflags = 2;
    r.rip = entry.rip;
    if long {
        r.rsi = ZERO_PAGE_START;
        r.rsp = 0x8ff0;
        r.rbp = 0x8ff0;
    } else {
        r.rbx = PVH_INFO_START;
    }
    vcpu.set_regs(&r).map_err(kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
    Ok(())
}

/// CPUID and local interrupts (LINT0 = ExtINT, LINT1 = NMI), for every vCPU.
pub fn setup_vcpu_common(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), SetupError> {
    vcpu.set_cpuid2(cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const APIC_MODE_EXTINT: u32 = 0x7;
    const APIC_MODE_NMI: u32 = 0x4;
    let set_mode = |regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32| {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *x as std::os::raw::c_char;
        }
    };
    set_mode(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    set_mode(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

/// Translates a guest virtual address with the vCPU's page tables (4-level or none).
fn translate(vcpu: &VcpuFd, mem: &GuestMemoryMmap, va: u64) -> Option<u64> {
    let s = vcpu.get_sregs().ok()?;
    if s.cr0 & X86_CR0_PG == 0 {
        return Some(va);
    }
    let mut table = s.cr3 & 0x000f_ffff_ffff_f000;
    for level in (0..4).rev() {
        let idx = (va >> (12 + 9 * level)) & 0x1ff;
        let e: u64 = mem.read_obj(GuestAddress(table + idx * 8)).ok()?;
        if e & 1 == 0 {
            return None;
        }
        let addr = e & 0x000f_ffff_ffff_f000;
        if level > 0 && e & 0x80 != 0 {
            let size = 1u64 << (12 + 9 * level);
            return Some((addr & !(size - 1)) | (va & (size - 1)));
        }
        if level == 0 {
            return Some(addr | (va & 0xfff));
        }
        table = addr;
    }
    None
}

fn describe_fault(vcpu: &VcpuFd, mem: &GuestMemoryMmap) -> String {
    let Ok(r) = vcpu.get_regs() else {
        return "registers unavailable".into();
    };
    let insn = instruction_bytes(r.rip, mem, |va| translate(vcpu, mem, va));
    format!("RIP {:#x}, instruction bytes: {insn}", r.rip)
}

/// The bytes of the (at most 15-byte) instruction at `rip`, as far as they can be read, in
/// hex; `translate` takes a guest virtual address to a physical one. A RIP at the top of the
/// address space wraps to 0, as the CPU's fetch would.
fn instruction_bytes(
    rip: u64,
    mem: &GuestMemoryMmap,
    translate: impl Fn(u64) -> Option<u64>,
) -> String {
    let mut bytes = vec![];
    for i in 0..15 {
        match translate(rip.wrapping_add(i))
            .and_then(|pa| mem.read_obj::<u8>(GuestAddress(pa)).ok())
        {
            Some(b) => bytes.push(format!("{b:02x}")),
            None => break,
        }
    }
    if bytes.is_empty() {
        "unreadable".to_string()
    } else {
        bytes.join(" ")
    }
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// The signal that kicks a vCPU thread out of KVM_RUN: its handler does nothing, and it is
/// installed without SA_RESTART, so KVM_RUN returns EINTR and the loop looks at the
/// lifecycle.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int) {}

fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut r = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction with a plain handler, an empty mask and no flags is
        // valid; the handler is async-signal-safe (it does nothing).
        r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
    });
    r
}

/// Stops the VM's `cpus` vCPUs: returns once every one is parked (true), or after a second
/// or when the VM is ending (false). Threads not started yet, or started and not yet in
/// `pthreads`, are waited for too: one running guest code unkicked could stay in KVM_RUN.
pub fn pause_all(
    lifecycle: &Lifecycle,
    pthreads: &std::sync::Mutex<Vec<libc::pthread_t>>,
    cpus: usize,
) -> bool {
    lifecycle.set_paused(true);
    let t0 = std::time::Instant::now();
    loop {
        let vcpus = pthreads.lock().unwrap();
        if lifecycle.parked() >= cpus {
            return true;
        }
        if t0.elapsed() > std::time::Duration::from_secs(1) || lifecycle.exit_requested() {
            return false;
        }
        kick(&vcpus);
        drop(vcpus);
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Kicks the vCPU threads `pthreads` out of KVM_RUN (to see a pause).
pub fn kick(pthreads: &[libc::pthread_t]) {
    for &t in pthreads {
        // SAFETY: the threads are alive (they are only joined after the monitor that kicks
        // them has stopped); the kick signal has its handler.
        unsafe { libc::pthread_kill(t, kick_signal()) };
    }
}

/// Where paused vCPUs leave their state (for a snapshot), and which MSRs it includes.
pub struct PauseStates {
    pub states: crate::snapshot::VcpuStates,
    pub msrs: Vec<u32>,
}

/// A running vCPU; [`VcpuThread::stop`] ends and joins it.
pub struct VcpuThread {
    thread: std::thread::JoinHandle<()>,
    pthread: libc::pthread_t,
}

impl VcpuThread {
    pub fn spawn(
        id: u8,
        vcpu: VcpuFd,
        mem: GuestMemoryMmap,
        buses: Arc<Buses>,
        lifecycle: Arc<Lifecycle>,
        pause: Arc<PauseStates>,
    ) -> std::io::Result<VcpuThread> {
        install_kick_handler()?;
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || run(id, vcpu, mem, buses, lifecycle, pause))?;
        let pthread = std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread);
        Ok(VcpuThread { thread, pthread })
    }

    pub fn pthread(&self) -> libc::pthread_t {
        self.pthread
    }

    /// Kicks the thread out of KVM_RUN until it sees the exit request, then joins it. The
    /// lifecycle must already say the VM is ending.
    pub fn stop(self) {
        let t0 = std::time::Instant::now();
        while !self.thread.is_finished() {
            if t0.elapsed() > std::time::Duration::from_secs(5) {
                // Stuck outside KVM_RUN (a console write nobody reads): left to the process
                // exit rather than hanging nicvm's teardown.
                log::warn!("a vCPU thread did not stop within 5 s; not waiting for it");
                return;
            }
            // SAFETY: the thread has not been joined, so its pthread_t is valid; the kick
            // signal has its handler.
            unsafe { libc::pthread_kill(self.pthread, kick_signal()) };
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let _ = self.thread.join();
    }
}

/// The data area of a port exit, as pointer and length: kvm_run's `io.size` must be read
/// before a slice of it is made again.
enum PortData {
    In(*mut u8, usize),
    Out(*const u8, usize),
}

/// A port exit: the `count` items of `size` bytes of an IN/OUT (one) or of a string
/// instruction (`rep ins`/`outs`: up to a page of them), each its own access to `port`.
fn port_exit(vcpu: &mut VcpuFd, pio: &Bus, port: u16, data: PortData) {
    // SAFETY: the exit just returned was KVM_EXIT_IO, so `io` is the union member KVM
    // filled in.
    let size = unsafe { vcpu.get_kvm_run().__bindgen_anon_1.io.size } as usize;
    // The pointer and length are the data area of that exit, inside this vCPU's kvm_run
    // mapping (which lives as long as `vcpu`) and outside the kvm_run struct itself (KVM puts
    // it at the page after); the borrow of the struct above has ended and nothing else
    // refers to the area until the next run.
    match data {
        PortData::In(p, len) => {
            // SAFETY: as said above; an IN's area is KVM's to read back, ours to write.
            let data = unsafe { std::slice::from_raw_parts_mut(p, len) };
            pio.read_port(port as u64, size, data);
        }
        PortData::Out(p, len) => {
            // SAFETY: as said above; an OUT's area is only read.
            let data = unsafe { std::slice::from_raw_parts(p, len) };
            pio.write_port(port as u64, size, data);
        }
    }
}

/// Most port or MMIO exits one instruction may still need once paused (a `rep ins` is done
/// a page at a time).
const MAX_PENDING_IO: usize = 4096;

/// Completes the instruction of the last port/MMIO exit before the vCPU parks: an IN's
/// value goes into its register, and a string or split access its remaining parts, on
/// KVM_RUNs that immediate_exit ends before the guest runs again. The state read after it
/// is whole (a snapshot may be taken of it).
fn finish_pending_io(vcpu: &mut VcpuFd, buses: &Buses) {
    vcpu.set_kvm_immediate_exit(1);
    for _ in 0..MAX_PENDING_IO {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                let data = PortData::In(data.as_mut_ptr(), data.len());
                port_exit(vcpu, &buses.pio, port, data);
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let data = PortData::Out(data.as_ptr(), data.len());
                port_exit(vcpu, &buses.pio, port, data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                buses.mmio.read(addr, data);
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
            }
            // EINTR: nothing left pending.
            _ => break,
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

/// Runs until the guest stops or another thread asked to stop. Never returns an error: fatal
/// guest behaviour becomes the VM's exit reason.
fn run(
    id: u8,
    mut vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    buses: Arc<Buses>,
    lifecycle: Arc<Lifecycle>,
    pause: Arc<PauseStates>,
) {
    while !lifecycle.exit_requested() {
        if lifecycle.paused() {
            finish_pending_io(&mut vcpu, &buses);
            // Parked; the saver asks for the state (once devices are stopped), as often as
            // it needs it.
            lifecycle.wait_while_paused_doing(|generation| {
                let state = crate::snapshot::VcpuState::capture(&vcpu, &pause.msrs);
                pause.states.publish(id as usize, generation, Some(state));
            });
            pause.states.publish(id as usize, 0, None);
            continue;
        }
        let reason = match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                let data = PortData::In(data.as_mut_ptr(), data.len());
                port_exit(&mut vcpu, &buses.pio, port, data);
                None
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                let data = PortData::Out(data.as_ptr(), data.len());
                port_exit(&mut vcpu, &buses.pio, port, data);
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                buses.mmio.read(addr, data);
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                buses.mmio.write(addr, data);
                None
            }
            Ok(VcpuExit::Hlt) | Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => None,
            Ok(VcpuExit::Shutdown) => Some(ExitReason::GuestCrash(format!(
                "vCPU {id}: triple fault ({})",
                describe_fault(&vcpu, &mem)
            ))),
            Ok(VcpuExit::SystemEvent(kind, _)) => Some(match kind {
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_CRASH => ExitReason::GuestPanic,
                k => ExitReason::GuestCrash(format!("vCPU {id}: system event {k}")),
            }),
            Ok(VcpuExit::InternalError) => {
                let run = vcpu.get_kvm_run();
                // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the
                // union member KVM filled in.
                let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
                let what = if suberror == 1 {
                    "emulation failure"
                } else {
                    "internal error"
                };
                Some(ExitReason::GuestCrash(format!(
                    "vCPU {id}: KVM {what} (suberror {suberror}) at {}",
                    describe_fault(&vcpu, &mem)
                )))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::GuestCrash(format!(
                "vCPU {id}: KVM entry failed (hardware reason {reason:#x} on host CPU {cpu})"
            ))),
            Ok(other) => Some(ExitReason::GuestCrash(format!(
                "vCPU {id}: unexpected exit {other:?}"
            ))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(ExitReason::Error(format!("vCPU {id}: KVM_RUN: {e}"))),
        };
        match reason {
            // The guest's own power-off or reset: held under -no-shutdown.
            Some(r @ (ExitReason::PowerOff | ExitReason::Reboot)) => lifecycle.guest_shutdown(r),
            Some(r) => lifecycle.request_exit(r),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A guest that faults with RIP two bytes below the top of the address space, on a page it
    /// mapped: the description reads on across the wrap instead of overflowing (which panicked
    /// the vCPU thread in builds with overflow checks).
    #[test]
    fn an_instruction_at_the_top_of_the_address_space_is_read_across_the_wrap() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_slice(&[0xaa, 0xbb], GuestAddress(0xffe)).unwrap();
        mem.write_slice(&[0x0f, 0x0b], GuestAddress(0)).unwrap();
        // Every page maps to the one page of RAM.
        let bytes = instruction_bytes(u64::MAX - 1, &mem, |va| Some(va & 0xfff));
        assert!(bytes.starts_with("aa bb 0f 0b "), "{bytes}");
        assert_eq!(bytes.split(' ').count(), 15);
        assert_eq!(instruction_bytes(0x5000, &mem, |_| None), "unreadable");
    }
}
