//! QMP, the JSON protocol of QEMU's machine monitor: a greeting, capabilities negotiation,
//! then `{"execute": ..., "arguments": ..., "id": ...}` commands answered with `return` or
//! `error` (class and description), and events. Messages are JSON values one after another
//! (newlines optional); each answer ends with CRLF as QEMU's do.

use super::{hmp, Client, Control, QmpError};
use crate::json::{requote, Node};
use devices::lifecycle::ExitReason;
use devices::net::RxFilter;
use devices::pci::BarKind;
use serde_json::{json, Map, Value};

/// A message may not be longer than this: a client sending more without finishing it gets
/// an error and its input is dropped.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// QEMU version nicvm's QMP answers as (the protocol it follows).
const QEMU_VERSION: (u32, u32, u32) = (8, 2, 0);

const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-status",
    "query-name",
    "query-commands",
    "query-kvm",
    "query-cpus-fast",
    "query-pci",
    "query-rx-filter",
    "set_link",
    "stop",
    "cont",
    "migrate",
    "query-migrate",
    "system_reset",
    "system_powerdown",
    "quit",
    "human-monitor-command",
];

/// One message to the client, on a line of its own, or indented over several (`pretty`) as
/// QEMU prints them: four spaces a level, an empty object or array on two lines, CR LF.
fn send(c: &mut Client, v: &Value) {
    if c.pretty {
        let mut text = String::new();
        indent(v, 0, &mut text);
        c.output
            .extend_from_slice(text.replace('\n', "\r\n").as_bytes());
    } else {
        c.output.extend_from_slice(v.to_string().as_bytes());
    }
    c.output.extend_from_slice(b"\r\n");
}

/// A message already in JSON text (an event): as [`send`] puts it.
pub(super) fn send_text(c: &mut Client, text: &str) {
    match c.pretty.then(|| serde_json::from_str::<Value>(text)) {
        Some(Ok(v)) => send(c, &v),
        _ => {
            c.output.extend_from_slice(text.as_bytes());
            c.output.extend_from_slice(b"\r\n");
        }
    }
}

/// `v` as QEMU's pretty printer writes it at nesting `level`.
fn indent(v: &Value, level: usize, out: &mut String) {
    let pad = |out: &mut String, level: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("    ", level));
    };
    match v {
        Value::Object(m) => {
            out.push('{');
            for (i, (k, v)) in m.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                pad(out, level + 1);
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                indent(v, level + 1, out);
            }
            pad(out, level);
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                pad(out, level + 1);
                indent(v, level + 1, out);
            }
            pad(out, level);
            out.push(']');
        }
        _ => out.push_str(&v.to_string()),
    }
}

fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({
        "qemu": {"major": major, "minor": minor, "micro": micro},
        "package": format!("nicvm {}", env!("CARGO_PKG_VERSION")),
    })
}

pub(super) fn greet(c: &mut Client) {
    send(
        c,
        &json!({"QMP": {"version": version(), "capabilities": []}}),
    );
}

fn error(c: &mut Client, e: QmpError, id: Option<&Value>) {
    let mut v = json!({"error": {"class": e.class, "desc": e.desc}});
    if let Some(id) = id {
        v["id"] = id.clone();
    }
    send(c, &v);
}

/// Handles the complete messages in the client's input while its unread output stays under
/// [`super::OUTPUT_PAUSE`] (the rest waits: the client is not read meanwhile, as QEMU stops
/// reading a client whose output backs up).
pub(super) fn process(control: &Control, c: &mut Client) {
    while c.output.len() < super::OUTPUT_PAUSE {
        match read_message(&mut c.input, &mut c.scan) {
            Some(Ok(v)) => handle(control, c, v),
            Some(Err(e)) => error(c, e, None),
            None => return,
        }
    }
}

/// Where the reading of a client's input stands between reads: how far the message being
/// read has been scanned, and what the scan found so far. Each byte is scanned once, however
/// the input is cut into reads.
#[derive(Debug, Default)]
pub(super) struct Scan {
    /// Bytes of the input scanned: the message so far, and any white space before it.
    at: usize,
    /// Objects and arrays open, counted apart as QEMU's streamer counts them: the message
    /// ends when both are back to 0.
    braces: usize,
    brackets: usize,
    /// In a string, opened with this quote.
    quote: Option<u8>,
    /// Just after a backslash in a string.
    escaped: bool,
    /// In a bare word (a number, a keyword, junk) outside any object or array.
    word: bool,
    /// The message has begun: it starts at the input's first byte (white space before it is
    /// dropped when it begins).
    begun: bool,
    /// After a control character in a string: skipping up to the next structural character
    /// (`{}[]:,`, which then starts afresh) or control character (dropped too), as QEMU's
    /// lexer does after an error.
    recovering: bool,
    /// The message outgrew [`MAX_MESSAGE`]: refused, and the rest of it dropped as it comes.
    dropping: bool,
}

/// Takes the next message out of a client's `input`: a JSON value, or the error to answer
/// bad input with; None until a whole message has come. Messages are framed as QEMU's JSON
/// streamer frames them, before they are parsed: one runs from its first byte until the
/// objects and arrays it opened are closed (or is one string, or one bare word up to white
/// space or a structural character; a stray `}`/`]`, `,` or `:` is one of its own). So a
/// message that does not parse is answered with its error and the messages after it, on
/// the same line too, still run. A control character in a string is an error at once (as
/// QEMU's lexer has it), so a string left open at a line end does not take the next line
/// with it.
fn read_message(input: &mut Vec<u8>, s: &mut Scan) -> Option<Result<Value, QmpError>> {
    let whole = |s: &Scan| s.braces == 0 && s.brackets == 0;
    loop {
        let Some(&b) = input.get(s.at) else {
            if s.dropping || s.recovering || !s.begun {
                // Nothing of this to keep: skipped bytes, or white space before a message.
                input.clear();
                s.at = 0;
            } else if s.at > MAX_MESSAGE {
                input.clear();
                s.at = 0;
                s.dropping = true;
                return Some(Err(too_long()));
            }
            return None;
        };
        if s.recovering {
            if matches!(b, b'{' | b'}' | b'[' | b']' | b':' | b',') {
                input.drain(..s.at);
                *s = Scan::default();
            } else if b < 0x20 {
                input.drain(..=s.at);
                *s = Scan::default();
            } else {
                s.at += 1;
            }
            continue;
        }
        if !s.begun && !b.is_ascii_whitespace() {
            input.drain(..s.at);
            s.at = 0;
            s.begun = true;
        }
        // Where the message ends, if this byte ends it.
        let mut end = None;
        if let Some(q) = s.quote {
            if b < 0x20 {
                // The error is the parser's, on the message up to this byte.
                let bad = parse(&input[..=s.at]).err();
                let dropping = s.dropping;
                input.drain(..=s.at);
                *s = Scan {
                    recovering: true,
                    ..Scan::default()
                };
                match (dropping, bad) {
                    (false, Some(e)) => return Some(Err(e)),
                    _ => continue,
                }
            } else if s.escaped {
                s.escaped = false;
            } else if b == b'\\' {
                s.escaped = true;
            } else if b == q {
                s.quote = None;
                if whole(s) {
                    end = Some(s.at + 1);
                }
            }
        } else if s.word && (b.is_ascii_whitespace() || b"{}[]:,\"'".contains(&b)) {
            end = Some(s.at);
        } else {
            match b {
                b'"' | b'\'' => s.quote = Some(b),
                b'{' => s.braces += 1,
                b'[' => s.brackets += 1,
                b'}' | b']' => {
                    let open = if b == b'}' {
                        &mut s.braces
                    } else {
                        &mut s.brackets
                    };
                    if *open == 0 {
                        // A closer its kind did not open ends the message there, refused
                        // (as QEMU's streamer ends one when either count goes below 0),
                        // also inside the other kind: `{"a":]` does not take the next
                        // line's command into an object left open.
                        end = Some(s.at + 1);
                    } else {
                        *open -= 1;
                        if whole(s) {
                            end = Some(s.at + 1);
                        }
                    }
                }
                b':' | b',' if whole(s) => end = Some(s.at + 1),
                _ if b.is_ascii_whitespace() => {}
                _ => s.word |= whole(s),
            }
        }
        let Some(end) = end else {
            s.at += 1;
            continue;
        };
        let dropping = s.dropping;
        *s = Scan::default();
        let result = if dropping {
            None
        } else if end > MAX_MESSAGE {
            Some(Err(too_long()))
        } else {
            Some(parse(&input[..end]))
        };
        input.drain(..end);
        if result.is_some() {
            return result;
        }
    }
}

/// One message's text as a value, or the parse error to answer it with. QEMU's parser also
/// takes 'single-quoted' strings: they are given to serde_json double-quoted.
fn parse(text: &[u8]) -> Result<Value, QmpError> {
    let requoted = text.contains(&b'\'').then(|| requote(text).0);
    let mut v = serde_json::from_slice::<Node>(requoted.as_deref().unwrap_or(text))
        .map(Node::into_value)
        .map_err(|e| QmpError::generic(format!("JSON parse error, {e}")))?;
    if let Some(id) = v.get_mut("id") {
        as_qemu_prints(id);
    }
    Ok(v)
}

/// A value as QEMU prints it back (an `id` it echoes): a whole number read as a float (`1E2`,
/// `2.0`, `-0`) is that integer, as QEMU's `%.17g` writes it, within a double's exact
/// integers.
fn as_qemu_prints(v: &mut Value) {
    const EXACT: f64 = (1u64 << 53) as f64;
    match v {
        Value::Number(n) if n.is_f64() => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if f.fract() == 0.0 && f.abs() <= EXACT {
                *v = Value::from(f as i64);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(as_qemu_prints),
        Value::Object(members) => members.values_mut().for_each(as_qemu_prints),
        _ => {}
    }
}

fn too_long() -> QmpError {
    QmpError::generic(format!(
        "JSON parse error, message longer than {MAX_MESSAGE} bytes"
    ))
}

fn handle(control: &Control, c: &mut Client, msg: Value) {
    let id = msg.get("id").cloned();
    let Value::Object(obj) = msg else {
        return error(
            c,
            QmpError::generic("QMP input must be a JSON object"),
            None,
        );
    };
    if let Some(k) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
    {
        // exec-oob too: the greeting offers no out-of-band capability.
        return error(
            c,
            QmpError::generic(format!("QMP input member '{k}' is unexpected")),
            id.as_ref(),
        );
    }
    let cmd = match obj.get("execute") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return error(
                c,
                QmpError::generic("QMP input member 'execute' must be a string"),
                id.as_ref(),
            )
        }
        None => {
            return error(
                c,
                QmpError::generic("QMP input lacks member 'execute'"),
                id.as_ref(),
            )
        }
    };
    let args = match obj.get("arguments") {
        None => Map::new(),
        Some(Value::Object(a)) => a.clone(),
        Some(_) => {
            return error(
                c,
                QmpError::generic("QMP input member 'arguments' must be an object"),
                id.as_ref(),
            )
        }
    };
    let result = if cmd == "qmp_capabilities" {
        if c.negotiated {
            Err(QmpError {
                class: "CommandNotFound",
                desc: "Capabilities negotiation is already complete, command ignored".into(),
            })
        } else {
            match (only_args(&args, &["enable"]), args.get("enable")) {
                (Err(e), _) => Err(e),
                (_, Some(Value::Array(a))) if !a.is_empty() => Err(QmpError::generic(format!(
                    "Capability '{}' not available",
                    a[0].as_str().unwrap_or("?")
                ))),
                _ => {
                    c.negotiated = true;
                    c.next_event = control.events.next();
                    Ok(json!({}))
                }
            }
        }
    } else if !c.negotiated {
        Err(QmpError {
            class: "CommandNotFound",
            desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
        })
    } else {
        let result = execute(control, &cmd, &args);
        // What the command set off (STOP, RESUME, MIGRATION, SHUTDOWN) comes first, as QEMU
        // sends its events before the answer.
        control.events.send_waiting(c);
        result
    };
    match result {
        Ok(ret) => {
            let mut v = json!({ "return": ret });
            if let Some(id) = id {
                v["id"] = id;
            }
            send(c, &v);
        }
        Err(e) => error(c, e, id.as_ref()),
    }
}

fn arg_str<'a>(args: &'a Map<String, Value>, key: &str) -> Result<&'a str, QmpError> {
    match args.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(QmpError::generic(format!(
            "Parameter '{key}' expects a string"
        ))),
        None => Err(QmpError::generic(format!("Parameter '{key}' is missing"))),
    }
}

/// Refuses arguments other than `known`, as QEMU does.
fn only_args(args: &Map<String, Value>, known: &[&str]) -> Result<(), QmpError> {
    match args.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

fn no_args(args: &Map<String, Value>) -> Result<(), QmpError> {
    match args.keys().next() {
        Some(k) => Err(QmpError::generic(format!("Parameter '{k}' is unexpected"))),
        None => Ok(()),
    }
}

/// The vCPUs as QEMU 8.2 lists them for x86: where `-smp` put each (socket, die when there
/// is more than one, core, thread), with the host thread running it (`thread-id`, 0 before
/// it runs).
fn query_cpus_fast(cpus: u8, topology: &crate::config::Topology) -> Value {
    // The vCPU threads are named vcpuN: their ids are the directories of /proc/self/task.
    let mut tids = std::collections::HashMap::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            let index = comm
                .trim()
                .strip_prefix("vcpu")
                .and_then(|n| n.parse::<u8>().ok());
            let tid = t.file_name().to_str().and_then(|n| n.parse::<i64>().ok());
            // Not the main thread, which `-name ...,process=` may have named vcpuN.
            let main = tid == Some(i64::from(std::process::id()));
            if let (Some(i), Some(tid), false) = (index, tid, main) {
                tids.insert(i, tid);
            }
        }
    }
    Value::Array(
        (0..cpus)
            .map(|i| {
                let (socket, die, core, thread) = topology.ids(i);
                let mut props =
                    json!({ "core-id": core, "thread-id": thread, "socket-id": socket });
                if topology.dies > 1 {
                    props["die-id"] = json!(die);
                }
                json!({
                    "cpu-index": i,
                    "qom-path": format!("/machine/unattached/device[{i}]"),
                    "thread-id": tids.get(&i).copied().unwrap_or(0),
                    "props": props,
                    "target": "x86_64",
                })
            })
            .collect(),
    )
}

/// One command (capabilities already negotiated).
pub fn execute(control: &Control, cmd: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
    match cmd {
        "query-version" => no_args(args).map(|_| version()),
        "query-status" => {
            no_args(args)?;
            Ok(json!({
                "running": control.running() && !control.lifecycle.exit_requested(),
                "singlestep": false,
                "status": control.status(),
            }))
        }
        "query-name" => {
            no_args(args)?;
            Ok(match &control.name {
                Some(n) => json!({ "name": n }),
                None => json!({}),
            })
        }
        "query-commands" => {
            no_args(args)?;
            Ok(Value::Array(
                COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
            ))
        }
        "query-kvm" => {
            no_args(args)?;
            Ok(json!({ "enabled": true, "present": true }))
        }
        "query-cpus-fast" => {
            no_args(args)?;
            Ok(query_cpus_fast(control.cpus, &control.topology))
        }
        "query-pci" => {
            no_args(args)?;
            Ok(query_pci(control))
        }
        "query-rx-filter" => {
            only_args(args, &["name"])?;
            let name = match args.get("name") {
                None => None,
                Some(_) => Some(arg_str(args, "name")?),
            };
            let mut out = vec![];
            for (i, n) in control.nics.iter().enumerate() {
                let nic_name = control.nic_name(i);
                if name.is_some_and(|want| want != nic_name && Some(want) != n.config.id.as_deref())
                {
                    continue;
                }
                let mut ctl = n.control.lock().unwrap();
                let f = ctl.rx_filter();
                ctl.rx_filter_queried();
                out.push(rx_filter_json(&nic_name, &f));
            }
            if let (Some(want), true) = (name, out.is_empty()) {
                // As QEMU words it: a backend's name, or no net client at all.
                return Err(QmpError::generic(
                    if control.netdev_ids.iter().any(|id| id == want) {
                        format!("net client({want}) isn't a NIC")
                    } else {
                        format!("invalid net client name: {want}")
                    },
                ));
            }
            Ok(Value::Array(out))
        }
        "set_link" => {
            only_args(args, &["name", "up"])?;
            let name = arg_str(args, "name")?;
            let up = match args.get("up") {
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(QmpError::generic("Parameter 'up' expects a boolean")),
                None => return Err(QmpError::generic("Parameter 'up' is missing")),
            };
            control.set_link(name, up).map(|_| json!({}))
        }
        "stop" => {
            no_args(args)?;
            control.stop();
            Ok(json!({}))
        }
        "cont" => {
            no_args(args)?;
            control.cont()?;
            Ok(json!({}))
        }
        "migrate" => {
            // detach is accepted and means nothing: migration is always done when the
            // command answers here.
            only_args(args, &["uri", "detach"])?;
            control.migrate(arg_str(args, "uri")?).map(|_| json!({}))
        }
        "query-migrate" => {
            no_args(args)?;
            Ok(control.query_migrate())
        }
        "system_reset" => {
            no_args(args)?;
            // nicvm never reboots a guest (QEMU's -no-reboot): a reset ends the VM.
            control.request_exit("host-qmp-system-reset", ExitReason::Reboot);
            Ok(json!({}))
        }
        "system_powerdown" => {
            no_args(args)?;
            Err(QmpError::generic(
                "nicvm's machine has no ACPI power button, so the guest cannot be asked to \
                 power down: the guest must power itself off (poweroff), or use quit",
            ))
        }
        "quit" => {
            no_args(args)?;
            control.request_exit("host-qmp-quit", ExitReason::User("QMP quit".into()));
            Ok(json!({}))
        }
        "human-monitor-command" => {
            only_args(args, &["command-line", "cpu-index"])?;
            let line = arg_str(args, "command-line")?;
            // The CPU the command is about: every nicvm command is about the whole VM, but the
            // index must name one, as QEMU checks.
            if let Some(i) = args.get("cpu-index") {
                match i.as_i64() {
                    Some(i) if (0..i64::from(control.cpus)).contains(&i) => {}
                    Some(_) => {
                        return Err(QmpError::generic(
                            "Parameter 'cpu-index' expects a CPU number",
                        ))
                    }
                    None => {
                        return Err(QmpError::generic(
                            "Invalid parameter type for 'cpu-index', expected: integer",
                        ))
                    }
                }
            }
            // With QEMU's line ends, as its monitor prints them everywhere.
            Ok(Value::String(hmp::crlf(&hmp::execute(control, line))))
        }
        c => Err(QmpError {
            class: "CommandNotFound",
            desc: format!("The command {c} has not been found"),
        }),
    }
}

fn mac(a: &[u8; 6]) -> String {
    net_backends::MacAddr(*a).to_string()
}

pub fn rx_filter_json(name: &str, f: &RxFilter) -> Value {
    json!({
        "name": name,
        "promiscuous": f.promiscuous,
        "multicast": f.multicast.name(),
        "unicast": f.unicast.name(),
        "vlan": f.vlan.name(),
        "broadcast-allowed": f.broadcast_allowed,
        "multicast-overflow": f.multicast_overflow,
        "unicast-overflow": f.unicast_overflow,
        "main-mac": mac(&f.main_mac),
        "vlan-table": f.vlan_table,
        "unicast-table": f.unicast_table.iter().map(mac).collect::<Vec<_>>(),
        "multicast-table": f.multicast_table.iter().map(mac).collect::<Vec<_>>(),
    })
}

fn query_pci(control: &Control) -> Value {
    let (vendor, device) = devices::pci::HOST_BRIDGE_ID;
    let mut devices = vec![json!({
        "bus": 0, "slot": 0, "function": 0,
        "class_info": {"class": 0x0600, "desc": "Host bridge"},
        "id": {"vendor": vendor, "device": device},
        "regions": [],
    })];
    for n in control.nics_by_slot() {
        let ctl = n.control.lock().unwrap();
        let (vendor, device, svendor, sdevice, class) = ctl.pci_ids();
        let regions: Vec<Value> = ctl
            .bars()
            .into_iter()
            .map(|(bar, kind, addr, size)| match kind {
                BarKind::Io => json!({"bar": bar, "type": "io", "address": addr, "size": size}),
                BarKind::Mem32 | BarKind::Mem64 => {
                    json!({"bar": bar, "type": "memory", "address": addr, "size": size,
                           "prefetch": false, "mem_type_64": kind == BarKind::Mem64})
                }
            })
            .collect();
        let d = json!({
            "bus": 0,
            "slot": n.slot,
            "function": 0,
            "class_info": {"class": class >> 8, "desc": "Ethernet controller"},
            "id": {"vendor": vendor, "device": device,
                   "subsystem-vendor": svendor, "subsystem": sdevice},
            "irq": ctl.irq(),
            "irq_pin": 1,
            "qdev_id": n.config.id.clone().unwrap_or_default(),
            "regions": regions,
        });
        devices.push(d);
    }
    json!([{ "bus": 0, "devices": devices }])
}

#[cfg(test)]
mod tests {
    use super::{indent, read_message};
    use crate::json::requote;
    use serde_json::json;

    /// What a client sending `input` is answered, in order: each message read (its `id`, or
    /// its `execute`), or `error: DESC` for input refused; then what is left waiting.
    fn read_all(input: &[u8]) -> (Vec<String>, Vec<u8>) {
        let (mut input, mut scan) = (input.to_vec(), super::Scan::default());
        let mut read = vec![];
        while let Some(m) = read_message(&mut input, &mut scan) {
            read.push(match m {
                Ok(v) => match v.get("id") {
                    Some(id) => id.to_string(),
                    None => v["execute"].to_string(),
                },
                Err(e) => format!("error: {}", e.desc),
            });
        }
        (read, input)
    }

    /// A string left open at a line end is refused there (a control character in a string,
    /// as QEMU's lexer refuses it), and the line end ends the bad line: the next line's
    /// command runs.
    #[test]
    fn a_string_left_open_at_a_line_end_does_not_take_the_next_line() {
        let (read, _) = read_all(b"\"\n{\"execute\":\"query-status\"}\n");
        assert_eq!(read.len(), 2, "{read:?}");
        assert!(
            read[0].starts_with("error: JSON parse error, control character"),
            "{read:?}"
        );
        assert_eq!(read[1], "\"query-status\"");
        // The same inside a message, single-quoted, and with the rest of the line after it.
        let (read, _) =
            read_all(b"{\"execute\":\"query-status\",\"id\":\"a\n{'execute':'x','id':2}\n");
        assert_eq!(read.len(), 2, "{read:?}");
        assert!(read[0].starts_with("error: "), "{read:?}");
        assert_eq!(read[1], "2");
        let (read, _) = read_all(b"{'execute':'query-status','id':'a\n{'execute':'x','id':2}\n");
        assert_eq!(read.len(), 2, "{read:?}");
        assert!(read[0].starts_with("error: "), "{read:?}");
        assert_eq!(read[1], "2");
        // Another control character in a string: refused there, the rest skipped up to the
        // next structural character (here a stray `}`, refused too), as QEMU does.
        let (read, _) = read_all(b"{\"id\":\"a\tb\"} {\"id\":1}\n{\"id\":2}\n");
        assert_eq!(read.len(), 4, "{read:?}");
        assert!(read[0].starts_with("error: "), "{read:?}");
        assert!(read[1].starts_with("error: "), "{read:?}");
        assert_eq!(read[2..], ["1", "2"]);
        // A message cut off in a string waits for the rest.
        let (read, rest) = read_all(b"{\"execute\":\"query-st");
        assert!(read.is_empty(), "{read:?}");
        assert_eq!(rest, b"{\"execute\":\"query-st");
    }

    /// Messages are framed as QEMU 7.2's streamer frames them: after one that does not parse,
    /// those that follow it on the same line run. Each case is what QEMU 7.2 answered the
    /// same bytes (`error` for any parse error; its texts differ).
    #[test]
    fn the_messages_after_a_bad_one_on_its_line_run() {
        let ok = |id: u32| format!("{{\"execute\":\"query-status\",\"id\":{id}}}");
        let cases: Vec<(Vec<u8>, Vec<&str>)> = vec![
            (
                format!("{{\"execute\": }} {}\n", ok(1)).into(),
                vec!["error", "1"],
            ),
            (format!("xyz {}\n", ok(2)).into(), vec!["error", "2"]),
            (
                format!("{} }}{}\n", ok(3), ok(4)).into(),
                vec!["3", "error", "4"],
            ),
            (format!("] {}\n", ok(7)).into(), vec!["error", "7"]),
            (
                format!("{}}} {}\n", ok(8), ok(9)).into(),
                vec!["8", "error", "9"],
            ),
            (
                format!("{{\"execute\": 1x}} {}\n", ok(10)).into(),
                vec!["error", "10"],
            ),
            (
                [b"\xff ".as_slice(), ok(11).as_bytes(), b"\n"].concat(),
                vec!["error", "11"],
            ),
            (format!("\"abc\" {}\n", ok(3)).into(), vec!["null", "3"]),
            (format!(", {}\n", ok(7)).into(), vec!["error", "7"]),
            (
                format!("{{\"id\":[1,{{\"a\":2]}}}} {}\n", ok(8)).into(),
                vec!["error", "8"],
            ),
            (
                format!("{{\"id\":\"x\\qy\"}} {}\n", ok(6)).into(),
                vec!["error", "6"],
            ),
            (format!("{}{}", ok(4), ok(5)).into(), vec!["4", "5"]),
            (
                b"{\"execute\":\n\"query-status\",\"id\":2}\n".to_vec(),
                vec!["2"],
            ),
            // A closer of a kind that is not open ends the message there, refused (QEMU's
            // streamer: a count below 0); the next line's command runs.
            (format!("{{\"a\":]\n{}\n", ok(1)).into(), vec!["error", "1"]),
            (format!("[1}}\n{}\n", ok(2)).into(), vec!["error", "2"]),
            // An array left open waits, however the braces go.
            (
                format!("{{\"id\":12, \"x\": [1,2}} {}\n", ok(13)).into(),
                vec![],
            ),
            // A string left open at a line end is refused there; the next line runs.
            (
                format!("{{\"a\": \"open {}\n{}\n", ok(5), ok(6)).into(),
                vec!["error", "6"],
            ),
        ];
        for (input, want) in cases {
            let (read, _) = read_all(&input);
            let read: Vec<&str> = read
                .iter()
                .map(|r| if r.starts_with("error: ") { "error" } else { r })
                .collect();
            assert_eq!(read, want, "{}", String::from_utf8_lossy(&input));
        }
    }

    /// However the input is cut into reads, the same messages come out, each byte scanned
    /// once; a message past 64 KiB is refused once and the rest of it dropped as it comes.
    #[test]
    fn framing_does_not_depend_on_how_the_input_is_cut() {
        let input = b"{\"execute\": } xyz {'execute':'query-status','id':1}\n\
            {\"id\":\"a\tb\"} {\"id\":[2,\"}\"]}{\"id\":3}  \"s\" , {\"id\":4}\n";
        let (whole, _) = read_all(input);
        assert_eq!(whole.len(), 10, "{whole:?}");
        for step in 1..8 {
            let (mut buf, mut scan, mut read) = (vec![], super::Scan::default(), vec![]);
            for piece in input.chunks(step) {
                buf.extend_from_slice(piece);
                while let Some(m) = read_message(&mut buf, &mut scan) {
                    read.push(m.map(|v| v.get("id").cloned()).map_err(|e| e.desc));
                }
            }
            let ids: Vec<_> = read.iter().map(|r| r.as_ref().ok().cloned()).collect();
            assert_eq!(read.len(), whole.len(), "pieces of {step}: {read:?}");
            assert_eq!(
                ids.iter().flatten().flatten().count(),
                4,
                "pieces of {step}"
            );
        }
        // Too long: one error, however long the rest is; the next message runs.
        let (mut buf, mut scan, mut read) = (vec![], super::Scan::default(), vec![]);
        let long = [
            b"{\"id\":\"".as_slice(),
            &vec![b'x'; 200_000],
            b"\"}{\"id\":5}",
        ]
        .concat();
        for piece in long.chunks(4096) {
            buf.extend_from_slice(piece);
            while let Some(m) = read_message(&mut buf, &mut scan) {
                read.push(m.map(|v| v["id"].clone()).map_err(|e| e.desc));
            }
            assert!(buf.len() <= super::MAX_MESSAGE + 4096);
        }
        assert_eq!(read.len(), 2, "{read:?}");
        assert!(read[0].as_ref().is_err_and(|e| e.contains("longer than")));
        assert_eq!(read[1], Ok(json!(5)));
    }

    /// An id is echoed as QEMU prints it back: a whole number written as a float is that
    /// integer (QEMU's `%.17g`), a fraction stays one.
    #[test]
    fn whole_float_ids_come_back_as_integers() {
        let (read, _) = read_all(
            b"{\"id\":1E2} {\"id\":-0} {\"id\":1.5e3} {\"id\":2.0} {\"id\":0.25} \
              {\"id\":[1e1,{\"a\":3.0}]}",
        );
        assert_eq!(read, ["100", "0", "1500", "2", "0.25", "[10,{\"a\":3}]"]);
    }

    /// Random JSON-like bytes, cut at random: the same answers as read in one piece, and
    /// the kept input never past one message.
    #[test]
    fn random_input_frames_alike_however_it_is_cut() {
        const ALPHABET: &[u8] = b"{}[]:,\"'\\ \n\tax1\xff";
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let answers = |pieces: &mut dyn Iterator<Item = &[u8]>| {
            let (mut buf, mut scan, mut out) = (vec![], super::Scan::default(), vec![]);
            for p in pieces {
                buf.extend_from_slice(p);
                while let Some(m) = read_message(&mut buf, &mut scan) {
                    out.push(m.map_err(|e| e.desc));
                }
                assert!(buf.len() <= super::MAX_MESSAGE + p.len());
            }
            out
        };
        for _ in 0..3000 {
            let len = (next() % 64) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| ALPHABET[(next() % ALPHABET.len() as u64) as usize])
                .collect();
            let whole = answers(&mut std::iter::once(input.as_slice()));
            let step = 1 + (next() % 7) as usize;
            let cut = answers(&mut input.chunks(step));
            assert_eq!(whole, cut, "{input:?} in pieces of {step}");
        }
    }

    /// A `\u0000` in a string (a value or a key, nested too) is refused as the other parse
    /// errors are (QEMU takes it, as the bytes C0 80); the next line's command runs.
    #[test]
    fn a_nul_in_a_string_is_refused() {
        for bad in [
            br#"{"execute":"query-status","id":"\u0000"}"#.as_slice(),
            br#"{"execute":"query-status","id":"a\u0000b"}"#,
            br#"{"execute":"query-status","\u0000":1}"#,
            br#"{"execute":"x","arguments":{"a":["\u0000"]},"id":1}"#,
            br#"{'execute':'query-status','id':'\u0000'}"#,
        ] {
            let input = [bad, b"\n{\"execute\":\"query-status\",\"id\":2}\n"].concat();
            let (read, _) = read_all(&input);
            let bad = String::from_utf8_lossy(bad);
            assert_eq!(read.len(), 2, "{bad}: {read:?}");
            assert!(
                read[0].starts_with("error: JSON parse error, \\u0000 is not supported"),
                "{bad}: {read:?}"
            );
            assert_eq!(read[1], "2", "{bad}");
        }
        // Other escapes of control characters are strings like any other.
        let (read, _) = read_all(br#"{"execute":"query-status","id":"\u0001\t"}"#);
        assert_eq!(read, ["\"\\u0001\\t\""]);
    }

    /// Byte for byte as QEMU 7.2's `-mon ...,pretty=on` writes (its greeting, an empty
    /// answer, an array), before the CR LF translation; keys in serde_json's order (QEMU's
    /// is its hash table's).
    #[test]
    fn pretty_output_is_qemus() {
        let mut out = String::new();
        indent(
            &json!({"QMP": {"version": {"qemu": {"micro": 2}, "package": "p"}, "capabilities": []}}),
            0,
            &mut out,
        );
        assert_eq!(
            out,
            "{\n    \"QMP\": {\n        \"capabilities\": [\n        ],\n        \"version\": {\n            \
             \"package\": \"p\",\n            \"qemu\": {\n                \"micro\": 2\n            }\n        \
             }\n    }\n}"
        );
        let mut out = String::new();
        indent(&json!({"return": {}}), 0, &mut out);
        assert_eq!(out, "{\n    \"return\": {\n    }\n}");
        let mut out = String::new();
        indent(&json!({"return": [{"name": "a\"b"}, 1]}), 0, &mut out);
        assert_eq!(
            out,
            "{\n    \"return\": [\n        {\n            \"name\": \"a\\\"b\"\n        },\n        1\n    ]\n}"
        );
    }

    #[test]
    fn single_quotes_become_double_quotes_one_message_at_a_time() {
        let input = b"\n {'a':'x\"y\\'z','b':\"it's\"}\n{'next':1}";
        let (json, map) = requote(input);
        assert_eq!(
            json,
            br#"
 {"a":"x\"y'z","b":"it's"}"#
        );
        let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(v["a"], "x\"y'z");
        assert_eq!(v["b"], "it's");
        // Offsets go back to the input: the end of the first message is where the second
        // one's line starts.
        assert_eq!(map.len(), json.len() + 1);
        assert_eq!(&input[map[json.len()]..], b"\n{'next':1}");
        assert_eq!(requote(br#"{"a":"it\'s"}"#).0, br#"{"a":"it's"}"#);
        // A line that is not JSON ends at its line end; an unfinished message runs to the end.
        assert_eq!(requote(b"hello\n{'a':1}").0, b"hello\n");
        assert_eq!(requote(b"{'a':'\\").0, b"{\"a\":\"\\");
    }
}
