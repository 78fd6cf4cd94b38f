//! nicvm-fuzz: drives nicvm's device models, backends' parsers and command line with
//! generated operation lists, as a hostile guest (or user) would, and reports any panic, hang
//! or runaway allocation with the shortest operation list that still shows it.
//!
//! ```text
//! nicvm-fuzz list
//! nicvm-fuzz run [TARGET...] [--seed S] [--time SECS] [--cases N] [--jobs J]
//!                [--hang-ms MS] [--out DIR] [--keep-going] [--no-minimize]
//! nicvm-fuzz replay TARGET FILE [--hang-ms MS] [-v]
//! ```
//!
//! Runs on the stable toolchain; build it with `--profile fuzz` (overflow checks, debug
//! assertions and unwinding panics on). Everything is deterministic in the seed: the same seed
//! and case number always make the same case.

mod harness;
mod rng;
mod targets;

use harness::{Finding, Kind};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

#[global_allocator]
static ALLOC: harness::CountingAlloc = harness::CountingAlloc;

const USAGE: &str = "\
usage: nicvm-fuzz list
       nicvm-fuzz run [TARGET...] [--seed S] [--time SECS] [--cases N] [--jobs J]
                      [--hang-ms MS] [--out DIR] [--keep-going] [--no-minimize]
       nicvm-fuzz replay TARGET FILE [--hang-ms MS] [-v]

run: fuzzes each TARGET (default: all) for --time seconds (default 60) or --cases cases,
whichever ends first, --jobs targets at a time (default 1). S is a number or any string (a
commit id). Findings go to --out (default fuzz-out) with their minimised operation lists.
Exit status 1 when anything was found.
";

fn die(msg: impl std::fmt::Display) -> ! {
    eprintln!("nicvm-fuzz: {msg}");
    std::process::exit(2);
}

/// A seed from a number or any string (FNV-1a of its bytes).
fn parse_seed(s: &str) -> u64 {
    s.parse().unwrap_or_else(|_| {
        s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        })
    })
}

struct Args {
    positional: Vec<String>,
    flags: Vec<(String, Option<String>)>,
}

fn parse_args(args: Vec<String>, with_value: &[&str]) -> Args {
    let mut a = Args {
        positional: vec![],
        flags: vec![],
    };
    let mut it = args.into_iter();
    while let Some(x) = it.next() {
        if let Some(name) = x.strip_prefix("--").or(x.strip_prefix('-')) {
            if with_value.contains(&name) {
                let v = it
                    .next()
                    .unwrap_or_else(|| die(format!("--{name} needs a value")));
                a.flags.push((name.to_string(), Some(v)));
            } else {
                a.flags.push((name.to_string(), None));
            }
        } else {
            a.positional.push(x);
        }
    }
    a
}

impl Args {
    fn get(&self, name: &str) -> Option<&str> {
        self.flags
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }
    fn has(&self, name: &str) -> bool {
        self.flags.iter().any(|(n, _)| n == name)
    }
    fn num(&self, name: &str, default: u64) -> u64 {
        self.get(name).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| die(format!("--{name}: '{v}' is not a number")))
        })
    }
    fn check_known(&self, known: &[&str]) {
        for (n, _) in &self.flags {
            if !known.contains(&n.as_str()) {
                die(format!("unknown option --{n}\n{USAGE}"));
            }
        }
    }
}

fn entry(name: &str) -> &'static targets::Entry {
    targets::ALL
        .iter()
        .find(|e| e.name == name)
        .unwrap_or_else(|| {
            let names: Vec<_> = targets::ALL.iter().map(|e| e.name).collect();
            die(format!(
                "unknown target '{name}' (one of {})",
                names.join(", ")
            ))
        })
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        print!("{USAGE}");
        std::process::exit(2);
    }
    let cmd = args.remove(0);
    match cmd.as_str() {
        "list" => {
            for e in targets::ALL {
                println!("{:16} {}", e.name, e.about);
            }
        }
        "run" => run(parse_args(
            args,
            &[
                "seed", "time", "cases", "jobs", "hang-ms", "out", "heap-mib",
            ],
        )),
        "replay" => {
            let a = parse_args(args, &["hang-ms", "heap-mib"]);
            a.check_known(&["hang-ms", "heap-mib", "v"]);
            let [target, file] = a.positional.as_slice() else {
                die(USAGE)
            };
            set_heap_limit(&a);
            let hang = Duration::from_millis(a.num("hang-ms", 1000));
            (entry(target).replay)(Path::new(file), hang, a.has("v"))
        }
        "campaign" => {
            let a = parse_args(
                args,
                &[
                    "target",
                    "seed",
                    "from",
                    "cases",
                    "deadline-ms",
                    "hang-ms",
                    "out",
                    "known",
                    "heap-mib",
                ],
            );
            set_heap_limit(&a);
            let known: Vec<String> = a
                .get("known")
                .and_then(|p| std::fs::read(p).ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
                .unwrap_or_default();
            let c = harness::Campaign {
                seed: a.num("seed", 0),
                from: a.num("from", 0),
                cases: a.num("cases", u64::MAX),
                deadline: a.get("deadline-ms").map(|v| {
                    SystemTime::UNIX_EPOCH + Duration::from_millis(v.parse().unwrap_or(0))
                }),
                hang: Duration::from_millis(a.num("hang-ms", 1000)),
                keep_going: a.has("keep-going"),
                known,
                out: PathBuf::from(a.get("out").unwrap_or("fuzz-out")),
            };
            (entry(a.get("target").unwrap_or_else(|| die("--target"))).campaign)(c)
        }
        "-h" | "--help" | "help" => print!("{USAGE}"),
        _ => die(format!("unknown command '{cmd}'\n{USAGE}")),
    }
}

fn set_heap_limit(a: &Args) {
    let mib = a.num("heap-mib", 256);
    harness::HEAP_LIMIT.store((mib as usize) << 20, std::sync::atomic::Ordering::Relaxed);
}

/// One target's campaign, as the parent sees it.
struct Report {
    target: &'static str,
    cases: u64,
    ops: u64,
    seconds: f64,
    findings: Vec<(Finding, PathBuf, usize)>,
    notes: Vec<String>,
}

fn run(a: Args) {
    a.check_known(&[
        "seed",
        "time",
        "cases",
        "jobs",
        "hang-ms",
        "out",
        "keep-going",
        "no-minimize",
        "heap-mib",
    ]);
    let names: Vec<&'static str> = if a.positional.is_empty() {
        targets::ALL.iter().map(|e| e.name).collect()
    } else {
        a.positional.iter().map(|n| entry(n).name).collect()
    };
    let seed_text = a.get("seed").unwrap_or("0").to_string();
    let seed = parse_seed(&seed_text);
    let time = Duration::from_secs(a.num("time", 60));
    let cases = a.num("cases", u64::MAX);
    let jobs = a.num("jobs", 1).max(1) as usize;
    let hang = a.num("hang-ms", 1000);
    let heap = a.num("heap-mib", 256);
    let out = PathBuf::from(a.get("out").unwrap_or("fuzz-out"));
    let keep_going = a.has("keep-going");
    let minimize = !a.has("no-minimize");
    let _ = std::fs::create_dir_all(&out);
    eprintln!(
        "nicvm-fuzz: seed {seed_text} ({seed:#x}), {} per target, {jobs} at a time, hang bound {hang} ms",
        if cases == u64::MAX {
            format!("{} s", time.as_secs())
        } else {
            format!("at most {} s or {cases} cases", time.as_secs())
        }
    );
    let queue = std::sync::Mutex::new(names.into_iter());
    let reports = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let Some(t) = queue.lock().unwrap().next() else {
                    return;
                };
                let r = run_target(t, seed, time, cases, hang, heap, &out, keep_going, minimize);
                print_report(&r);
                reports.lock().unwrap().push(r);
            });
        }
    });
    let mut reports = reports.into_inner().unwrap();
    reports.sort_by_key(|r| r.target);
    let total: usize = reports.iter().map(|r| r.findings.len()).sum();
    let summary: Vec<serde_json::Value> = reports
        .iter()
        .map(|r| {
            serde_json::json!({
                "target": r.target,
                "cases": r.cases,
                "ops": r.ops,
                "seconds": r.seconds,
                "findings": r.findings.iter().map(|(f, p, n)| serde_json::json!({
                    "kind": f.kind, "signature": f.signature, "case": f.case,
                    "min_ops": n, "file": p,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let _ = std::fs::write(
        out.join("summary.json"),
        serde_json::to_vec_pretty(&serde_json::json!({
            "seed": seed_text, "hang_ms": hang, "targets": summary,
        }))
        .unwrap(),
    );
    eprintln!(
        "nicvm-fuzz: {} target(s), {} case(s), {} finding(s)",
        reports.len(),
        reports.iter().map(|r| r.cases).sum::<u64>(),
        total
    );
    std::process::exit(if total > 0 { 1 } else { 0 });
}

fn print_report(r: &Report) {
    let rate = r.cases as f64 / r.seconds.max(0.001);
    eprintln!(
        "fuzz: {}: {} cases, {} operations in {:.1} s ({rate:.0} cases/s); {} finding(s)",
        r.target,
        r.cases,
        r.ops,
        r.seconds,
        r.findings.len()
    );
    for (f, p, n) in &r.findings {
        eprintln!(
            "  {:?} at case {} ({} ops, minimised to {n}): {}\n    {}",
            f.kind,
            f.case,
            f.ops.as_array().map_or(0, |a| a.len()),
            f.signature,
            p.display()
        );
    }
    for n in &r.notes {
        eprintln!("  {n}");
    }
}

#[allow(clippy::too_many_arguments)]
fn run_target(
    target: &'static str,
    seed: u64,
    time: Duration,
    cases: u64,
    hang_ms: u64,
    heap_mib: u64,
    out: &Path,
    keep_going: bool,
    minimize: bool,
) -> Report {
    let exe = std::env::current_exe().unwrap_or_else(|e| die(e));
    let started = Instant::now();
    let deadline = SystemTime::now() + time;
    let known_file = out.join(format!("{target}.known.json"));
    let mut r = Report {
        target,
        cases: 0,
        ops: 0,
        seconds: 0.0,
        findings: vec![],
        notes: vec![],
    };
    let mut known: Vec<String> = vec![];
    let mut from = 0u64;
    loop {
        let _ = std::fs::write(&known_file, serde_json::to_vec(&known).unwrap());
        let mut cmd = Command::new(&exe);
        cmd.args(["campaign", "--target", target])
            .args(["--seed", &seed.to_string()])
            .args(["--from", &from.to_string()])
            .args(["--cases", &cases.saturating_sub(r.cases).to_string()])
            .args(["--deadline-ms", &harness::unix_ms(deadline).to_string()])
            .args(["--hang-ms", &hang_ms.to_string()])
            .args(["--heap-mib", &heap_mib.to_string()])
            .arg("--out")
            .arg(out)
            .arg("--known")
            .arg(&known_file)
            .stdout(Stdio::piped());
        if keep_going {
            cmd.arg("--keep-going");
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| die(e));
        let mut last = from;
        let mut new = vec![];
        for line in BufReader::new(child.stdout.take().unwrap()).lines() {
            let Ok(line) = line else { break };
            if let Some(p) = line.strip_prefix("FOUND ") {
                if let Some(f) = std::fs::read(p)
                    .ok()
                    .and_then(|b| serde_json::from_slice::<Finding>(&b).ok())
                {
                    new.push((f, PathBuf::from(p)));
                }
            } else if let Some(rest) = line.strip_prefix("DONE ") {
                for kv in rest.split_whitespace() {
                    match kv.split_once('=') {
                        Some(("cases", v)) => r.cases += v.parse::<u64>().unwrap_or(0),
                        Some(("last", v)) => last = v.parse().unwrap_or(last),
                        Some(("ops", v)) => r.ops += v.parse::<u64>().unwrap_or(0),
                        _ => {}
                    }
                }
            }
        }
        let status = child.wait().unwrap_or_else(|e| die(e));
        for (f, p) in new {
            if known.contains(&f.signature) {
                let _ = std::fs::remove_file(&p);
                continue;
            }
            known.push(f.signature.clone());
            let n = if minimize {
                minimise(&exe, &f, &p, hang_ms, heap_mib)
            } else {
                f.ops.as_array().map_or(0, |a| a.len())
            };
            r.findings.push((f, p, n));
        }
        let stuck = status.code().and_then(Kind::from_exit_code);
        match (status.code(), stuck) {
            (Some(0 | 1), _) => break,
            (_, Some(_)) => {
                from = last + 1;
                if !keep_going || SystemTime::now() >= deadline || r.cases >= cases {
                    break;
                }
            }
            _ => {
                r.notes.push(format!(
                    "the campaign process died ({status}) after case {last}: rerun with \
                     `--seed {seed}` and look at cases from {from}"
                ));
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&known_file);
    r.seconds = started.elapsed().as_secs_f64();
    r
}

/// Runs a candidate operation list in a fresh process: the kind and signature it fails with.
fn try_ops(
    exe: &Path,
    target: &str,
    file: &Path,
    hang_ms: u64,
    heap_mib: u64,
) -> Option<(Kind, String)> {
    let o = Command::new(exe)
        .args(["replay", target])
        .arg(file)
        .args(["--hang-ms", &hang_ms.to_string()])
        .args(["--heap-mib", &heap_mib.to_string()])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let kind = Kind::from_exit_code(o.status.code()?)?;
    let text = String::from_utf8_lossy(&o.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("FINDING "))?;
    let sig = line.split_once(' ').map_or("", |(_, s)| s).to_string();
    Some((kind, sig))
}

/// Shrinks a finding's operation list to one that still fails the same way (delta debugging
/// over removals), writes it next to the finding as `.min.json` and `.min.txt`, and returns
/// its length.
fn minimise(exe: &Path, f: &Finding, path: &Path, hang_ms: u64, heap_mib: u64) -> usize {
    let Some(all) = f.ops.as_array() else {
        return 0;
    };
    let tmp = path.with_extension("try.json");
    let same = |ops: &[serde_json::Value]| -> bool {
        let _ = std::fs::write(
            &tmp,
            serde_json::to_vec(&serde_json::json!({ "ops": ops })).unwrap(),
        );
        match try_ops(exe, &f.target, &tmp, hang_ms, heap_mib) {
            Some((k, sig)) => k == f.kind && (k != Kind::Panic || sig == f.signature),
            None => false,
        }
    };
    let t0 = Instant::now();
    let budget = Duration::from_secs(180);
    // Cut at the failing operation first: nothing after it matters.
    let mut ops: Vec<serde_json::Value> = all[..(f.at_op + 1).min(all.len())].to_vec();
    if !same(&ops) {
        ops = all.clone();
    }
    let mut n = 2usize;
    while ops.len() >= 2 && t0.elapsed() < budget {
        let chunk = ops.len().div_ceil(n);
        let cut = (0..n)
            .map(|i| i * chunk)
            .take_while(|lo| *lo < ops.len())
            .find_map(|lo| {
                let hi = (lo + chunk).min(ops.len());
                let cand: Vec<_> = ops[..lo].iter().chain(&ops[hi..]).cloned().collect();
                same(&cand).then_some(cand)
            });
        if let Some(cand) = cut {
            ops = cand;
            n = n.saturating_sub(1).max(2);
        } else {
            if n >= ops.len() {
                break;
            }
            n = (2 * n).min(ops.len());
        }
    }
    let _ = std::fs::remove_file(&tmp);
    let mut min = f.clone();
    min.ops = serde_json::Value::Array(ops.clone());
    min.at_op = ops.len().saturating_sub(1);
    let _ = std::fs::write(
        path.with_extension("min.json"),
        serde_json::to_vec_pretty(&min).unwrap(),
    );
    let listing = (entry(&f.target).describe)(&min.ops);
    let _ = std::fs::write(
        path.with_extension("min.txt"),
        format!(
            "{} {:?}: {}\n{}\n\n{}\n",
            f.target,
            f.kind,
            f.signature,
            listing.join("\n"),
            f.detail
        ),
    );
    ops.len()
}
