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

/// Every `info` subcommand, in the order QEMU lists them (by name). `help`, `help info`,
/// `info` alone and the subcommands themselves all come from this one list, so none can
/// leave one out.
const INFO: &[Info] = &[
    Info {
        name: "migrate",
        help: "show migration status",
        show: info_migrate,
    },
    Info {
        name: "name",
        help: "show the current VM name",
        show: info_name,
    },
    Info {
        name: "network",
        help: "show the network state",
        show: info_network,
    },
    Info {
        name: "pci",
        help: "show PCI info",
        show: info_pci,
    },
    Info {
        name: "status",
        help: "show the current VM status (running|paused)",
        show: info_status,
    },
    Info {
        name: "usernet",
        help: "show user network stack connection states",
        show: info_usernet,
    },
    Info {
        name: "version",
        help: "show the version of QEMU (nicvm's)",
        show: info_version,
    },
];

/// A command as `help` shows it: its names (`stop|s`), its arguments, what it does.
struct Command {
    names: &'static str,
    args: &'static str,
    help: &'static str,
}

/// Every command, in the order QEMU's `help` lists them (by names).
const COMMANDS: &[Command] = &[
    Command {
        names: "cont|c",
        args: "",
        help: "resume emulation",
    },
    Command {
        names: "help|?",
        args: "[cmd]",
        help: "show the help",
    },
    Command {
        names: "hostfwd_add",
        args: "[netdev_id] [tcp|udp]:[hostaddr]:hostport-[guestaddr]:guestport",
        help: "redirect TCP or UDP connections from host to guest (requires -net user)",
    },
    Command {
        names: "hostfwd_remove",
        args: "[netdev_id] [tcp|udp]:[hostaddr]:hostport",
        help: "remove host-to-guest TCP or UDP redirection",
    },
    Command {
        names: "info",
        args: "[subcommand]",
        help: "show various information about the system state",
    },
    Command {
        names: "migrate",
        args: "[-d] uri",
        help: "migrate to URI (file:PATH: a snapshot for -incoming)",
    },
    Command {
        names: "quit|q",
        args: "",
        help: "quit the emulator",
    },
    Command {
        names: "set_link",
        args: "name on|off",
        help: "change the link status of a network adapter",
    },
    Command {
        names: "stop|s",
        args: "",
        help: "stop emulation",
    },
    Command {
        names: "system_powerdown",
        args: "",
        help: "send system power down event",
    },
    Command {
        names: "system_reset",
        args: "",
        help: "reset the system",
    },
];

/// The command one of whose names is `name`.
fn command(name: &str) -> Option<&'static Command> {
    COMMANDS
        .iter()
        .find(|c| c.names.split('|').any(|n| n == name))
}

/// A `help` line as QEMU prints one: `NAMES ARGS -- HELP` (two spaces when there are no
/// arguments).
fn help_line(names: &str, args: &str, help: &str) -> String {
    format!("{names} {args} -- {help}\n")
}

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
        // A line ended with CR LF just before: its LF came in this read.
        if let Some(&first) = c.input.first() {
            if std::mem::take(&mut c.after_cr) && first == b'\n' {
                c.input.remove(0);
            }
        }
        // A line ends at LF, CR LF, or a CR alone, as QEMU's readline takes Enter (a raw
        // terminal, or telnet in character mode, sends CR, or CR NUL, which telnet's
        // reading has made CR).
        let Some(nl) = c.input.iter().position(|&b| b == b'\n' || b == b'\r') else {
            if c.input.len() > MAX_LINE {
                c.input.clear();
                if !c.skip_line {
                    c.skip_line = true;
                    too_long(c);
                }
            }
            break;
        };
        let mut line: Vec<u8> = c.input.drain(..=nl).collect();
        if line[nl] == b'\r' {
            match c.input.first() {
                Some(b'\n') => line.push(c.input.remove(0)),
                Some(_) => {}
                None => c.after_cr = true,
            }
        }
        if std::mem::take(&mut c.skip_line) {
            continue; // the end of a line refused as too long
        }
        if nl > MAX_LINE {
            too_long(c);
            continue;
        }
        let line = typed(&String::from_utf8_lossy(&line[..nl]));
        let out = execute(control, &line);
        c.output.extend_from_slice(crlf(&out).as_bytes());
        if !control.exiting() {
            c.output.extend_from_slice(PROMPT.as_bytes()); // none after quit
        }
    }
}

/// A line as QEMU's readline makes it of the keys a client sent: backspace and DEL take
/// back the character before them, a tab is a space (QEMU's completes; the command reads it
/// as a word's end), an escape sequence (an arrow key: `ESC [ A`, `ESC O A`) and other
/// control characters are ignored.
fn typed(raw: &str) -> String {
    let mut line = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // CSI: parameters, then a final byte from @ to ~; SS3: one byte.
            match chars.next() {
                Some('[') => while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {},
                Some('O') => {
                    chars.next();
                }
                _ => {}
            }
            continue;
        }
        match ch {
            '\u{8}' | '\u{7f}' => {
                line.pop();
            }
            '\t' => line.push(' '),
            c if c.is_control() => {}
            c => line.push(c),
        }
    }
    line
}

fn too_long(c: &mut Client) {
    c.output
        .extend_from_slice(format!("line too long\r\n{PROMPT}").as_bytes());
}

/// `\n` line ends as `\r\n` (the console may be a raw terminal).
pub fn crlf(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\n', "\r\n")
}

/// What `help` prints: a line for each command.
fn help() -> String {
    COMMANDS
        .iter()
        .map(|c| help_line(c.names, c.args, c.help))
        .collect()
}

/// What `help info` and `info` alone print: a line for each `info` subcommand.
fn info_help() -> String {
    INFO.iter()
        .map(|i| help_line(&format!("info {}", i.name), "", i.help))
        .collect()
}

/// `help WORDS`: that command's line (`help info NAME`: that subcommand's).
fn help_for(words: &[String]) -> String {
    match words {
        [] => help(),
        [info] if info == "info" => info_help(),
        [info, name, ..] if info == "info" => match INFO.iter().find(|i| i.name == name) {
            Some(i) => help_line(&format!("info {}", i.name), "", i.help),
            None => format!("unknown command: 'info {}'\n", shown(name)),
        },
        [name, ..] => match command(name) {
            Some(c) => help_line(c.names, c.args, c.help),
            None => format!("unknown command: '{}'\n", shown(name)),
        },
    }
}

/// A word the user typed, as an error names it: not echoed back whole however long it is.
fn shown(word: &str) -> String {
    let head: String = word.chars().take(64).collect();
    let more = if head.len() < word.len() { "..." } else { "" };
    format!("{head}{more}")
}

/// QEMU's answer to a command line it cannot read: the reason, then where to look.
fn misread(why: &str, typed: &str) -> String {
    format!("{why}\nTry \"help {typed}\" for more information\n")
}

/// The arguments after a command's name, as QEMU's monitor reads string arguments: words
/// between white space, or "double-quoted" (with `\n`, `\r`, `\\`, `\'`, `\"` escapes; single
/// quotes are not special). None for a quote left open.
fn arguments(rest: &str) -> Option<Vec<String>> {
    let mut words = vec![];
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let Some(first) = chars.next() else {
            return Some(words);
        };
        let mut word = String::new();
        if first == '"' {
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => word.push(match chars.next()? {
                        'n' => '\n',
                        'r' => '\r',
                        c @ ('\\' | '\'' | '"') => c,
                        // QEMU's "unsupported escape code": no string.
                        _ => return None,
                    }),
                    c => word.push(c),
                }
            }
        } else {
            word.push(first);
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                word.push(c);
            }
        }
        words.push(word);
    }
}

/// One command line; returns its output (lines ending in `\n`).
pub fn execute(control: &Control, line: &str) -> String {
    let line = line.trim_start();
    let (name, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
    if name.is_empty() {
        return String::new();
    }
    let Some(cmd) = command(name) else {
        return format!("unknown command: '{}'\n", shown(name));
    };
    let Some(args) = arguments(rest) else {
        return misread(&format!("{}: string expected", cmd.names), name);
    };
    // A command given more words than it takes does nothing, as in QEMU.
    let extra = |typed: &str| {
        misread(
            &format!("{}: extraneous characters at the end of line", cmd.names),
            typed,
        )
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match (cmd.names, args.as_slice()) {
        ("help|?", words) => {
            let words: Vec<String> = words.iter().map(|w| w.to_string()).collect();
            help_for(&words)
        }
        ("info", []) => info_help(),
        ("info", [what, more @ ..]) => match INFO.iter().find(|i| i.name == *what) {
            Some(info) if more.is_empty() => (info.show)(control),
            Some(info) => misread(
                &format!("{}: extraneous characters at the end of line", info.name),
                &format!("info {}", info.name),
            ),
            None => format!("unknown command: 'info {}'\n", shown(what)),
        },
        ("set_link", []) => misread("set_link: string expected", name),
        ("set_link", [_]) => misread("Expected 'on' or 'off'", name),
        ("set_link", [nic, state]) => {
            let up = match *state {
                "on" => true,
                "off" => false,
                _ => return misread("Expected 'on' or 'off'", name),
            };
            match control.set_link(nic, up) {
                Ok(()) => String::new(),
                Err(e) => format!("Error: {}\n", e.desc),
            }
        }
        ("hostfwd_add", [rule]) => hostfwd_add(control, None, rule),
        ("hostfwd_add", [id, rule]) => hostfwd_add(control, Some(id), rule),
        ("hostfwd_remove", [rule]) => hostfwd_remove(control, None, rule),
        ("hostfwd_remove", [id, rule]) => hostfwd_remove(control, Some(id), rule),
        ("hostfwd_add" | "hostfwd_remove", []) => {
            misread(&format!("{name}: string expected"), name)
        }
        ("migrate", [] | ["-d"]) => "usage: migrate [-d] file:PATH\n".into(),
        ("migrate", [uri] | ["-d", uri]) => match control.migrate(uri) {
            Ok(()) => String::new(),
            Err(e) => format!("Error: {}\n", e.desc),
        },
        ("migrate", _) => "usage: migrate [-d] file:PATH\n".into(),
        ("stop|s", []) => {
            control.stop();
            String::new()
        }
        ("cont|c", []) => match control.cont() {
            Ok(()) => String::new(),
            Err(e) => format!("Error: {}\n", e.desc),
        },
        ("quit|q", []) => {
            control.request_exit("host-qmp-quit", ExitReason::User("monitor quit".into()));
            String::new()
        }
        ("system_reset", []) => {
            control.request_exit("host-qmp-system-reset", ExitReason::Reboot);
            String::new()
        }
        ("system_powerdown", []) => "nicvm's machine has no ACPI power button, so the guest \
             cannot be asked to power down: the guest must power itself off (poweroff), or use \
             quit\n"
            .into(),
        _ => extra(name),
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
/// port each is bound to), under "Hub N (ID):" (N the hub of a `-net` backend, -1 for one of
/// `-netdev` or `-nic`), in the order QEMU made them; those no NIC uses too, as they run.
fn info_usernet(control: &Control) -> String {
    let mut out = String::new();
    for netdev in &control.netdev_ids {
        if let Some(Ok(Ok(table))) = ask_usernet(control, netdev, UsernetAsk::Info) {
            let hub = control
                .hubs
                .iter()
                .find(|(id, _)| id == netdev)
                .map_or(-1, |&(_, h)| i64::from(h));
            out.push_str(&format!("Hub {hub} ({netdev}):\n{table}"));
        }
    }
    out
}

/// Asks netdev `id`, if it is a user network (None if not); Err if it does not answer. The
/// slirp thread answers at once when woken; a second at most.
fn ask_usernet(
    control: &Control,
    id: &str,
    ask: UsernetAsk,
) -> Option<Result<UsernetAnswer, String>> {
    let asked = control.usernet(id, ask)?;
    Some(
        asked
            .recv_timeout(std::time::Duration::from_secs(1))
            .map_err(|_| "the user network did not answer".into()),
    )
}

/// The user network `-netdev` `id` names, or the first there is in QEMU's order; Err, in
/// QEMU's words, when there is none.
fn usernet_id<'a>(control: &'a Control, id: Option<&str>) -> Result<&'a str, String> {
    if let Some(id) = id {
        if !control.netdev_ids.iter().any(|n| n == id) {
            return Err(format!("unrecognized netdev id '{id}'"));
        }
    }
    control
        .netdev_ids
        .iter()
        .filter(|n| id.is_none_or(|id| *n == id))
        .find(|n| control.is_usernet(n))
        .map(String::as_str)
        .ok_or_else(|| match id {
            Some(_) => "invalid device specified".into(),
            None => "user mode network stack not in use".into(),
        })
}

/// What a user network answered: Ok(Ok) done, Ok(Err) refused with its reason, Err no answer.
fn ask_id(control: &Control, id: &str, ask: UsernetAsk) -> Result<UsernetAnswer, String> {
    ask_usernet(control, id, ask).unwrap_or_else(|| Err("invalid device specified".into()))
}

/// `hostfwd_add [netdev_id] RULE`: a forward as `hostfwd=` takes it, added while the guest
/// runs. Silent when it worked; as QEMU, the netdev is looked up before the rule is read.
fn hostfwd_add(control: &Control, id: Option<&str>, rule: &str) -> String {
    let netdev = match usernet_id(control, id) {
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
    match ask_id(control, netdev, UsernetAsk::AddHostFwd(fwd)) {
        Ok(Ok(_)) => String::new(),
        Ok(Err(e)) => format!("Could not set up host forwarding rule '{rule}': {e}\n"),
        Err(e) => format!("{e}\n"),
    }
}

/// `hostfwd_remove [netdev_id] [tcp|udp]:[hostaddr]:hostport`: says whether a forward was
/// there to remove, in QEMU's words.
fn hostfwd_remove(control: &Control, id: Option<&str>, rule: &str) -> String {
    let netdev = match usernet_id(control, id) {
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
    match ask_id(
        control,
        netdev,
        UsernetAsk::RemoveHostFwd { udp, addr, port },
    ) {
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
        let link = if up { "" } else { ",link=down" };
        out.push_str(&format!(
            "{}: index=0,type=nic,model={},macaddr={}{link}\n",
            control.nic_name(i),
            n.config.model.name(),
            n.config.mac,
        ));
        // A NIC without a peer has no second line.
        if let Some(netdev) = &n.config.netdev {
            out.push_str(&format!(
                " \\ {netdev}: index=0,type={}{link}\n{}",
                control.backends[i],
                filters(netdev)
            ));
        }
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

    /// `help` and `help info` as QEMU 7.2 prints them: a line a command (two spaces when it
    /// takes no arguments), by name; `info` alone as `help info`.
    #[test]
    fn help_lines_as_qemu_prints_them() {
        let help = help();
        let lines: Vec<&str> = help.lines().collect();
        assert!(lines.contains(&"cont|c  -- resume emulation"), "{help}");
        assert!(lines.contains(&"stop|s  -- stop emulation"), "{help}");
        assert!(
            lines.contains(&"set_link name on|off -- change the link status of a network adapter")
        );
        assert!(
            lines.contains(&"info [subcommand] -- show various information about the system state")
        );
        let mut sorted = lines.clone();
        sorted.sort();
        assert_eq!(lines, sorted, "by name, as QEMU lists them");
        let info: Vec<String> = info_help().lines().map(String::from).collect();
        let names: Vec<&str> = info
            .iter()
            .map(|l| l.split_whitespace().nth(1).unwrap())
            .collect();
        assert_eq!(
            names,
            ["migrate", "name", "network", "pci", "status", "usernet", "version"]
        );
        assert_eq!(
            info[4],
            "info status  -- show the current VM status (running|paused)"
        );
        let words = |w: &[&str]| help_for(&w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(words(&["s"]), "stop|s  -- stop emulation\n");
        assert_eq!(
            words(&["set_link"]),
            "set_link name on|off -- change the link status of a network adapter\n"
        );
        assert_eq!(words(&["info"]), info_help());
        assert_eq!(
            words(&["info", "status"]),
            "info status  -- show the current VM status (running|paused)\n"
        );
        assert_eq!(words(&["bogus"]), "unknown command: 'bogus'\n");
        assert_eq!(words(&["info", "bogus"]), "unknown command: 'info bogus'\n");
    }

    /// Keys as QEMU's readline takes them: backspace and DEL edit, other control
    /// characters (a telnet NUL, ESC) are dropped.
    #[test]
    fn typed_lines_are_edited_as_readline_edits_them() {
        assert_eq!(typed("info nama\u{7f}e"), "info name");
        assert_eq!(typed("info\tname\u{8}\u{8}\u{8}\u{8}status"), "info status");
        assert_eq!(typed("\u{0}info \u{1}\u{2}name"), "info name");
        // As QEMU's readline: ESC and the key after it (Alt+key) are dropped.
        assert_eq!(typed("info \u{1b}xname"), "info name");
        assert_eq!(typed("\u{7f}\u{7f}q"), "q");
        assert_eq!(typed("info status\u{1b}[A"), "info status", "an arrow key");
        assert_eq!(typed("info \u{1b}[1;5Dstatus\u{1b}OB"), "info status");
    }

    /// Arguments as QEMU's monitor reads strings: words, or double-quoted with escapes;
    /// single quotes are kept; a quote left open is no argument at all.
    #[test]
    fn arguments_as_qemu_reads_them() {
        assert_eq!(arguments("  e   off ").unwrap(), ["e", "off"]);
        assert_eq!(arguments("\"e\" off").unwrap(), ["e", "off"]);
        assert_eq!(arguments("'e' off").unwrap(), ["'e'", "off"]);
        assert_eq!(arguments(r#""a b\"c\\" x"#).unwrap(), ["a b\"c\\", "x"]);
        assert_eq!(arguments("").unwrap(), Vec::<String>::new());
        assert!(arguments("\"e off").is_none());
        assert!(arguments("\"e\\").is_none());
        assert!(
            arguments("\"a\\x\" off").is_none(),
            "an escape QEMU does not know"
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
