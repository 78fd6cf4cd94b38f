//! nicvm as a library: the command line, the VM's assembly and its run loop. The `nicvm`
//! binary is a thin shell around it; the fuzzer drives the command-line parser through it.

pub mod boot;
pub mod cli;
pub mod config;
pub mod console;
pub mod cpuid;
pub mod daemon;
pub mod host;
pub mod io_thread;
pub mod irqchip;
pub mod json;
pub mod keyval;
pub mod layout;
pub mod lazy_kernel;
pub mod monitor;
pub mod mptable;
pub mod netdev;
pub mod open;
pub mod peerless;
pub mod qemu_compat;
pub mod ram_lease;
pub mod serial_io;
pub mod signals;
pub mod snapshot;
pub mod stderr;
pub mod vcpu;
pub mod vm;
