//! Turning `-netdev` specs into backends, with their set-up scripts and what must be undone
//! when nicvm exits.

use crate::cli::NetdevSpec;
use net_backends::tap::Tap;
use net_backends::NetBackend;
use std::path::{Path, PathBuf};
use std::process::Command;

static CLEANUPS: std::sync::Mutex<Vec<Cleanup>> = std::sync::Mutex::new(Vec::new());

/// Queues work for [`run_cleanups`].
pub fn on_exit(c: Cleanup) {
    CLEANUPS.lock().unwrap().push(c);
}

/// Undoes what set-up did, newest first. Called on every exit path.
pub fn run_cleanups() {
    let list = std::mem::take(&mut *CLEANUPS.lock().unwrap_or_else(|e| e.into_inner()));
    for c in list.into_iter().rev() {
        c.run();
    }
}

/// Something to undo at exit, on every exit path.
pub enum Cleanup {
    /// Run the tap's downscript with its interface name.
    DownScript { script: PathBuf, ifname: String },
}

impl Cleanup {
    pub fn run(self) {
        match self {
            Cleanup::DownScript { script, ifname } => {
                if let Err(e) = run_script(&script, &ifname) {
                    eprintln!("nicvm: downscript: {e}");
                }
            }
        }
    }
}

pub const DEFAULT_IFUP: &str = "/etc/nicvm-ifup";
pub const DEFAULT_IFDOWN: &str = "/etc/nicvm-ifdown";

fn run_script(script: &Path, ifname: &str) -> Result<(), String> {
    let status = Command::new(script)
        .arg(ifname)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !status.success() {
        return Err(format!("{} {ifname} failed ({status})", script.display()));
    }
    Ok(())
}

/// `script=`/`downscript=`: a path, `no`, or absent (the default file when it exists).
fn script_option(value: Option<&str>, default: &str) -> Option<PathBuf> {
    match value {
        Some("no") | Some("") => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Path::new(default).exists().then(|| PathBuf::from(default)),
    }
}

pub struct Opened {
    pub backend: Box<dyn NetBackend>,
    /// What to call it in messages (the tap's name, ...).
    pub label: String,
}

/// Opens the backend for `spec`. `want_vnet_hdr`: the frontend can use a virtio-net header.
pub fn open(spec: &NetdevSpec, want_vnet_hdr: bool) -> Result<Opened, String> {
    let opt = format!("-netdev {},id={}", spec.kind, spec.id);
    let e = |m: String| format!("{opt}: {m}");
    match spec.kind.as_str() {
        "tap" => {
            let o = &spec.opts;
            if let Some(k) = o.unknown_key(&["ifname", "fd", "script", "downscript", "vnet_hdr"]) {
                return Err(e(format!("unknown parameter '{k}'")));
            }
            let vnet = match o.get("vnet_hdr") {
                None => None,
                Some("on") => Some(true),
                Some("off") => Some(false),
                Some(v) => return Err(e(format!("vnet_hdr: '{v}' is not on or off"))),
            };
            let vnet = match vnet {
                Some(true) if !want_vnet_hdr => Some(false), // e1000/rtl8139 do offloads themselves
                None => Some(want_vnet_hdr),
                v => v,
            };
            let tap = match o.get("fd") {
                Some(fd) => {
                    if o.get("ifname").is_some() {
                        return Err(e("fd= and ifname= cannot be used together".into()));
                    }
                    let fd: i32 = fd
                        .parse()
                        .map_err(|_| e(format!("fd: '{fd}' is not a number")))?;
                    Tap::from_fd(fd).map_err(|x| e(x.to_string()))?
                }
                None => {
                    Tap::open(o.get("ifname").unwrap_or(""), vnet).map_err(|x| e(x.to_string()))?
                }
            };
            let name = tap.name().to_string();
            if let Some(up) = script_option(o.get("script"), DEFAULT_IFUP) {
                run_script(&up, &name).map_err(|m| e(format!("script: {m}")))?;
            }
            if let Some(down) = script_option(o.get("downscript"), DEFAULT_IFDOWN) {
                on_exit(Cleanup::DownScript {
                    script: down,
                    ifname: name.clone(),
                });
            }
            Ok(Opened {
                backend: Box::new(tap),
                label: name,
            })
        }
        other => Err(e(format!(
            "the '{other}' backend is not available in this build of nicvm yet (tap is)"
        ))),
    }
}
