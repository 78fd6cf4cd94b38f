//! HMP, QEMU's human monitor: one command per line, answered in text, then the `(qemu)`
//! prompt. The commands QEMU users reach for with a network-only VM.

use super::{Client, Control};
use devices::lifecycle::ExitReason;
use devices::pci::BarKind;
use net_backends::slirp::HostFwd;
use net_backends::{UsernetAnswer, UsernetAsk};

/// A line may not be longer than this; a longer one is dropped with a message.
const MAX_LINE: usize = 4096;

/// An `info` subcommand.
struct Info {
    name: &'static str,
    /// Its line in `help`, after `info NAME -- `.
    help: &'static str,
    /// What it prints.
    show: fn(&Control) -> String,
}

/// Every `info` subcommand, in `help`'s order. `help`, `info` alone, `info` with an unknown
/// name and the subcommands themselves all come from this one list, so none can leave one out.
const INFO: &[Info] = &[
    Info {
        name: "network",
        help: "show the network state",
        show: info_network,
    },
    Info {
        name: "usernet",
        help: "show user network stack connection states",
        show: info_usernet,
    },
    Info {
        name: "pci",
        help: "show PCI info",
        show: info_pci,
    },
    Info {
        name: "status",
        help: "show the current VM status (running or paused, and why)",
        show: info_status,
    },
    Info {
        name: "migrate",
        help: "show migration status",
        show: info_migrate,
    },
    Info {
        name: "version",
        help: "show the version of QEMU (nicvm)",
        show: info_version,
    },
    Info {
        name: "name",
        help: "show the current VM name",
        show: info_name,
    },
];

/// `help`'s lines before the `info` subcommands' ...
const HELP_BEFORE_INFO: &str = "\
cont|c -- resume emulation
help|? -- show this help
";

/// ... and after them.
const HELP_AFTER_INFO: &str = "\
hostfwd_add [netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport -- redirect TCP or UDP connections from host to guest (requires -net user)
hostfwd_remove [netdev_id] [tcp|udp]:[hostaddr]:hostport -- remove host-to-guest TCP or UDP redirection
migrate [-d] uri -- migrate to URI (file:PATH: a snapshot for -incoming)
quit|q -- quit the emulator
set_link name on|off -- change the link status of a network adapter
stop -- stop emulation
system_powerdown -- send system power down event
system_reset -- reset the system
";

pub const PROMPT: &str = "(qemu) ";

pub fn greet(out: &mut Vec<u8>) {
    out.extend_from_slice(
        format!(
            "nicvm {} monitor - type 'help' for more information\r\n{PROMPT}",
            env!("CARGO_PKG_VERSION")
        )
        .as_bytes(),
    );
}

/// Runs every complete line of the client's input. A line over [`MAX_LINE`] bytes is refused
/// whole: none of it runs, also when it arrives in pieces.
pub(super) fn process(control: &Control, c: &mut Client) {
    // Lines wait while the client has not read its answers (see OUTPUT_PAUSE).
    while c.output.len() < super::OUTPUT_PAUSE {
        if control.exiting() {
            c.input.clear(); // after quit nothing runs, whenever it arrives
            return;
        }
        let Some(nl) = c.input.iter().position(|&b| b == b'\n') else {
            if c.input.len() > MAX_LINE {
                c.input.clear();
                if !c.skip_line {
                    c.skip_line = true;
                    too_long(c);
                }
            }
            break;
        };
        let line: Vec<u8> = c.input.drain(..=nl).collect();
        if std::mem::take(&mut c.skip_line) {
            continue; // the end of a line refused as too long
        }
        if nl > MAX_LINE {
            too_long(c);
            continue;
        }
        let line = String::from_utf8_lossy(&line[..nl]);
        let line = line.trim_end_matches('\r');
        let out = execute(control, line);
        c.output.extend_from_slice(crlf(&out).as_bytes());
        if !control.exiting() {
            c.output.extend_from_slice(PROMPT.as_bytes()); // none after quit
        }
    }
}

fn too_long(c: &mut Client) {
    c.output
        .extend_from_slice(format!("line too long\r\n{PROMPT}").as_bytes());
}

/// `\n` line ends as `\r\n` (the console may be a raw terminal).
pub fn crlf(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// What `help` prints: a line for each command, each `info` subcommand among them.
fn help() -> String {
    let mut out = HELP_BEFORE_INFO.to_string();
    for i in INFO {
        out += &format!("info {} -- {}\n", i.name, i.help);
    }
    out + HELP_AFTER_INFO
}

/// What `info` without a subcommand prints: their names.
fn info_usage() -> String {
    let names: Vec<&str> = INFO.iter().map(|i| i.name).collect();
    format!("info {}\n", names.join("|"))
}

/// What `info WHAT` prints for a subcommand that does not exist: the names of those that do.
fn unknown_info(what: &str) -> String {
    let names: Vec<&str> = INFO.iter().map(|i| i.name).collect();
    format!("unknown info command '{what}' ({})\n", names.join(", "))
}

/// One command line; returns its output (lines ending in `\n`).
pub fn execute(control: &Control, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        [] => String::new(),
        ["help" | "?"] | ["help" | "?", _] => help(),
        ["info"] => info_usage(),
        ["info", what] => match INFO.iter().find(|i| i.name == *what) {
            Some(info) => (info.show)(control),
            None => unknown_info(what),
        },
        ["set_link", name, state] => {
            let up = match *state {
                "on" => true,
                "off" => false,
                s => return format!("set_link: '{s}' is not on or off\n"),
            };
            match control.set_link(name, up) {
                Ok(()) => String::new(),
                Err(e) => format!("{}\n", e.desc),
            }
        }
        ["set_link", ..] => "usage: set_link name on|off\n".into(),
        ["hostfwd_add", rule] => hostfwd_add(control, None, rule),
        ["hostfwd_add", id, rule] => hostfwd_add(control, Some(id), rule),
        ["hostfwd_remove", rule] => hostfwd_remove(control, None, rule),
        ["hostfwd_remove", id, rule] => hostfwd_remove(control, Some(id), rule),
        // As QEMU words a missing or an extra argument.
        [cmd @ ("hostfwd_add" | "hostfwd_remove")] => {
            format!("{cmd}: string expected\nTry \"help {cmd}\" for more information\n")
        }
        [cmd @ ("hostfwd_add" | "hostfwd_remove"), ..] => format!(
            "{cmd}: extraneous characters at the end of line\nTry \"help {cmd}\" for more information\n"
        ),
        ["migrate"] | ["migrate", "-d"] => "usage: migrate [-d] file:PATH\n".into(),
        ["migrate", uri] | ["migrate", "-d", uri] => match control.migrate(uri) {
            Ok(()) => String::new(),
            Err(e) => format!("Error: {}\n", e.desc),
        },
        ["migrate", ..] => "usage: migrate [-d] file:PATH\n".into(),
        ["stop"] => {
            control.stop();
            String::new()
        }
        ["cont" | "c"] => match control.cont() {
            Ok(()) => String::new(),
            Err(e) => format!("Error: {}\n", e.desc),
        },
        ["quit" | "q"] => {
            control.request_exit("host-qmp-quit", ExitReason::User("monitor quit".into()));
            String::new()
        }
        ["system_reset"] => {
            control.request_exit("host-qmp-system-reset", ExitReason::Reboot);
            String::new()
        }
        ["system_powerdown"] => "nicvm's machine has no ACPI power button, so the guest cannot \
             be asked to power down: the guest must power itself off (poweroff), or use quit\n"
            .into(),
        ["stop" | "cont" | "c" | "quit" | "q" | "system_reset" | "system_powerdown", ..] => {
            "extraneous characters at the end of line\n".into() // as QEMU: nothing done
        }
        [cmd, ..] => {
            // A name, not a whole line echoed back however long it is.
            let shown: String = cmd.chars().take(64).collect();
            let more = if shown.len() < cmd.len() { "..." } else { "" };
            format!("unknown command: '{shown}{more}'\n")
        }
    }
}

/// As QEMU words it: running, paused, or paused and why (prelaunch, postmigrate, shutdown).
fn info_status(control: &Control) -> String {
    let status = match control.status() {
        s @ ("running" | "paused") => s.to_string(),
        s => format!("paused ({s})"),
    };
    format!("VM status: {status}\n")
}

fn info_migrate(control: &Control) -> String {
    match control.query_migrate().get("status") {
        Some(st) => format!("Migration status: {}\n", st.as_str().unwrap_or("?")),
        None => String::new(),
    }
}

fn info_version(_: &Control) -> String {
    format!("8.2.0 (nicvm {})\n", env!("CARGO_PKG_VERSION"))
}

fn info_name(control: &Control) -> String {
    control
        .name
        .as_ref()
        .map(|n| format!("{n}\n"))
        .unwrap_or_default()
}

/// As QEMU prints it: each user network's sockets (its forwards among them, with the host
/// port each is bound to), under "Hub -1 (ID):" as QEMU names a -netdev's stack, in the order
/// QEMU made them.
fn info_usernet(control: &Control) -> String {
    let mut out = String::new();
    for netdev in &control.netdev_ids {
        let nic = control.nics.iter().find(|n| n.config.netdev == *netdev);
        if let Some(Ok(Ok(table))) = nic.and_then(|n| ask_usernet(n, UsernetAsk::Info)) {
            out.push_str(&format!("Hub -1 ({netdev}):\n{table}"));
        }
    }
    out
}

/// Asks a NIC's backend, if it is a user network (None if not); Err if it does not answer.
fn ask_usernet(n: &super::NicEntry, ask: UsernetAsk) -> Option<Result<UsernetAnswer, String>> {
    // Asked under the NIC's lock, waited for without it (a vCPU may want the NIC meanwhile):
    // the slirp thread answers at once when woken; a second at most.
    let asked = n.control.lock().unwrap().usernet(ask)?;
    Some(
        asked
            .recv_timeout(std::time::Duration::from_secs(1))
            .map_err(|_| "the user network did not answer".into()),
    )
}

/// The NIC of the user network `-netdev` `id` names, or of the first there is in QEMU's order;
/// Err, in QEMU's words, when there is none.
fn usernet_nic<'a>(control: &'a Control, id: Option<&str>) -> Result<&'a super::NicEntry, String> {
    if let Some(id) = id {
        if !control.netdev_ids.iter().any(|n| n == id) {
            return Err(format!("unrecognized netdev id '{id}'"));
        }
    }
    let netdevs = control
        .netdev_ids
        .iter()
        .filter(|n| id.is_none_or(|id| *n == id));
    for netdev in netdevs {
        let nic = control
            .nics
            .iter()
            .enumerate()
            .find(|(_, n)| n.config.netdev == *netdev);
        if let Some((i, n)) = nic {
            if control.backends[i].starts_with("user") {
                return Ok(n);
            }
        }
    }
    Err(match id {
        Some(_) => "invalid device specified".into(),
        None => "user mode network stack not in use".into(),
    })
}

/// What a user network answered: Ok(Ok) done, Ok(Err) refused with its reason, Err no answer.
fn ask_nic(nic: &super::NicEntry, ask: UsernetAsk) -> Result<UsernetAnswer, String> {
    ask_usernet(nic, ask).unwrap_or_else(|| Err("invalid device specified".into()))
}

/// `hostfwd_add [netdev_id] RULE`: a forward as `hostfwd=` takes it, added while the guest
/// runs. Silent when it worked; as QEMU, the netdev is looked up before the rule is read.
fn hostfwd_add(control: &Control, id: Option<&str>, rule: &str) -> String {
    let nic = match usernet_nic(control, id) {
        Ok(n) => n,
        Err(e) => return format!("{e}\n"),
    };
    let fwd = match rule.parse::<HostFwd>() {
        Ok(f) => f,
        // QEMU's words.
        Err(_) => {
            let why = HostFwd::syntax_error(rule).unwrap_or("Bad forwarding rule");
            return format!("Invalid host forwarding rule '{rule}' ({why})\n");
        }
    };
    match ask_nic(nic, UsernetAsk::AddHostFwd(fwd)) {
        Ok(Ok(_)) => String::new(),
        Ok(Err(e)) => format!("Could not set up host forwarding rule '{rule}': {e}\n"),
        Err(e) => format!("{e}\n"),
    }
}

/// `hostfwd_remove [netdev_id] [tcp|udp]:[hostaddr]:hostport`: says whether a forward was
/// there to remove, in QEMU's words.
fn hostfwd_remove(control: &Control, id: Option<&str>, rule: &str) -> String {
    let nic = match usernet_nic(control, id) {
        Ok(n) => n,
        Err(e) => return format!("{e}\n"),
    };
    let not_found = format!("host forwarding rule for {rule} not found\n");
    let (udp, addr, port) = match parse_forward_source(rule) {
        Some((udp, addr, Ok(port))) => (udp, addr, port),
        // A number, but no port: no forward has it.
        Some((_, _, Err(()))) => return not_found,
        None => return "invalid format\n".into(),
    };
    match ask_nic(nic, UsernetAsk::RemoveHostFwd { udp, addr, port }) {
        Ok(Ok(_)) => format!("host forwarding rule for {rule} removed\n"),
        Ok(Err(_)) => not_found,
        Err(e) => format!("{e}\n"),
    }
}

/// `[tcp|udp]:[hostaddr]:hostport`: (UDP, the address, 0.0.0.0 for any, and the port, or
/// Err for a number that is not one).
fn parse_forward_source(s: &str) -> Option<(bool, std::net::Ipv4Addr, Result<u16, ()>)> {
    let (proto, rest) = s.split_once(':')?;
    let udp = match proto {
        "" | "tcp" => false,
        "udp" => true,
        _ => return None,
    };
    let (addr, port) = rest.split_once(':')?;
    let addr = match addr {
        "" => std::net::Ipv4Addr::UNSPECIFIED,
        a => a.parse().ok()?,
    };
    let port = port.parse::<i64>().ok()?;
    Some((udp, addr, u16::try_from(port).map_err(|_| ())))
}

/// As QEMU lists its net clients: the netdevs no NIC uses (made first), then each NIC with
/// ` \ ` and its netdev; each client's filters after its line.
fn info_network(control: &Control) -> String {
    let filters = |netdev: &str| {
        let lines: Vec<&str> = control
            .filters
            .iter()
            .filter(|(n, _)| n == netdev)
            .map(|(_, line)| line.as_str())
            .collect();
        if lines.is_empty() {
            String::new()
        } else {
            format!("filters:\n{}\n", lines.join("\n"))
        }
    };
    let mut out = String::new();
    for (id, desc) in &control.unused_netdevs {
        out.push_str(&format!("{id}: index=0,type={desc}\n{}", filters(id)));
    }
    for (i, n) in control.nics.iter().enumerate() {
        let up = n.control.lock().unwrap().link_up();
        out.push_str(&format!(
            "{}: index=0,type=nic,model={},macaddr={}{}\n \\ {}: index=0,type={}{}\n",
            control.nic_name(i),
            n.config.model.name(),
            n.config.mac,
            if up { "" } else { ",link=down" },
            n.config.netdev,
            control.backends[i],
            if up { "" } else { ",link=down" },
        ));
        out.push_str(&filters(&n.config.netdev));
    }
    out
}

/// One BAR as QEMU's `info pci` shows it: where it starts and its last byte (a guest may have
/// put it anywhere, the top of the address space included).
fn bar_line(bar: usize, kind: BarKind, addr: u64, size: u64) -> String {
    let last = addr.saturating_add(size.saturating_sub(1));
    match kind {
        BarKind::Io => format!("      BAR{bar}: I/O at {addr:#06x} [{last:#06x}].\n"),
        BarKind::Mem32 => {
            format!("      BAR{bar}: 32 bit memory at {addr:#010x} [{last:#010x}].\n")
        }
        BarKind::Mem64 => {
            format!("      BAR{bar}: 64 bit memory at {addr:#010x} [{last:#010x}].\n")
        }
    }
}

fn info_pci(control: &Control) -> String {
    let mut out = String::new();
    for n in control.nics_by_slot() {
        let ctl = n.control.lock().unwrap();
        let (vendor, device, ..) = ctl.pci_ids();
        out.push_str(&format!(
            "  Bus  0, device {:>3}, function 0:\n    Ethernet controller: PCI device {vendor:04x}:{device:04x}\n      PCI subsystem {}\n      IRQ {}, pin A\n",
            n.slot,
            n.config.model.name(),
            ctl.irq()
        ));
        for (bar, kind, addr, size) in ctl.bars() {
            out.push_str(&bar_line(bar, kind, addr, size));
        }
        out.push_str(&format!(
            "      id \"{}\"\n",
            n.config.id.as_deref().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `info` alone and `info` with an unknown name list every subcommand `help` documents
    /// (they left out migrate, and the second usernet too).
    #[test]
    fn info_lists_every_subcommand_help_documents() {
        let help = help();
        let documented: Vec<&str> = help
            .lines()
            .filter_map(|l| l.strip_prefix("info "))
            .map(|l| l.split_whitespace().next().unwrap())
            .collect();
        assert_eq!(
            documented,
            ["network", "usernet", "pci", "status", "migrate", "version", "name"]
        );
        assert_eq!(
            info_usage(),
            "info network|usernet|pci|status|migrate|version|name\n"
        );
        assert_eq!(
            unknown_info("nope"),
            "unknown info command 'nope' (network, usernet, pci, status, migrate, version, name)\n"
        );
    }

    #[test]
    fn a_bar_left_at_the_top_of_the_address_space_shows_its_last_byte() {
        // Where a guest leaves a 64-bit BAR after sizing it (all ones written to both halves).
        assert_eq!(
            bar_line(4, BarKind::Mem64, 0xffff_ffff_ffff_c000, 0x4000),
            "      BAR4: 64 bit memory at 0xffffffffffffc000 [0xffffffffffffffff].\n"
        );
        assert_eq!(
            bar_line(0, BarKind::Io, 0xc000, 0x100),
            "      BAR0: I/O at 0xc000 [0xc0ff].\n"
        );
        assert_eq!(
            bar_line(1, BarKind::Mem32, 0xfebf_1000, 0x1000),
            "      BAR1: 32 bit memory at 0xfebf1000 [0xfebf1fff].\n"
        );
    }
}
