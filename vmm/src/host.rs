//! What kind of KVM host this is. On `kvm_pvm` hosts KVM runs guest kernel code through its
//! instruction emulator: slow, and unable to execute some instructions (see DESIGN.md).

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKind {
    /// VMX/SVM hardware virtualization.
    Hardware,
    /// KVM without hardware virtualization (PVM): guest kernel code is emulated.
    Emulating,
}

impl HostKind {
    pub fn detect() -> HostKind {
        if Path::new("/sys/module/kvm_pvm").exists() {
            return HostKind::Emulating;
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let hw = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
        if hw || !Path::new("/sys/module/kvm").exists() {
            HostKind::Hardware
        } else {
            HostKind::Emulating
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HostKind::Hardware => "hardware KVM",
            HostKind::Emulating => {
                "emulating KVM (kvm_pvm: guest kernel code runs in KVM's instruction emulator)"
            }
        }
    }
}
