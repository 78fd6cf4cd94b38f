"""What this machine offers a bench: the kind of KVM host (every number is labelled with it:
on a host whose KVM emulates guest kernel code the guest's CPU bounds everything), the guest
image, and whether the vde column can run."""
import os
import shutil
import subprocess

from . import ROOT


def host_label(nicvm):
    """The KVM host kind as `nicvm --version` names it."""
    out = subprocess.run([nicvm, "--version"], capture_output=True, text=True).stdout
    kind = out.split("host: ", 1)[-1].splitlines()[0].strip() if "host: " in out else "unknown"
    return kind


def guest_dir(given):
    """The guest image directory: the one given, else NICVM_GUEST_DIR, else what
    scripts/setup builds (or finds in its cache)."""
    if given:
        return given
    if os.environ.get("NICVM_GUEST_DIR"):
        return os.environ["NICVM_GUEST_DIR"]
    out = subprocess.run([os.path.join(ROOT, "scripts/setup")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return out.strip().splitlines()[-1]


def vde_problem(nicvm):
    """Why the vde column cannot run here, or None."""
    r = subprocess.run([nicvm, "-netdev", "vde,id=v,sock=/nonexistent/nicvm-bench-probe",
                        "-device", "e1000,netdev=v", "-kernel", "/dev/null"],
                       capture_output=True, text=True, timeout=30,
                       env=dict(os.environ, NICVM_LOG="error"))
    msg = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    if "not available" in msg or "unknown" in msg or "unsupported" in msg:
        return f"nicvm: {msg.removeprefix('nicvm: ')}"
    if not shutil.which("vde_switch"):
        return "vde_switch is not installed"
    return None
