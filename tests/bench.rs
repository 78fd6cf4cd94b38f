//! The NIC comparison benchmark's smoke test: `scripts/bench nics` on one small cell
//! (virtio-net on user networking, 1 MiB each way, one run, no QEMU), then its report: the JSON
//! parses, every number is positive, the bytes it moved are the bytes it checked, nicvm's own
//! counters (NICVM_STATS) saw at least that much traffic, and the table and chart are there.

mod support;
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use support::*;

/// Just enough JSON for the report.
#[derive(Debug, Clone, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(BTreeMap<String, Json>),
}

impl Json {
    fn parse(s: &str) -> Result<Json, String> {
        let mut p = Parser {
            s: s.as_bytes(),
            i: 0,
        };
        let v = p.value()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(format!("trailing data at {}", p.i));
        }
        Ok(v)
    }

    fn get(&self, key: &str) -> &Json {
        match self {
            Json::Obj(m) => m
                .get(key)
                .unwrap_or_else(|| panic!("no \"{key}\" in {self:?}")),
            _ => panic!("not an object looking for \"{key}\": {self:?}"),
        }
    }

    fn num(&self, key: &str) -> f64 {
        match self.get(key) {
            Json::Num(n) => *n,
            v => panic!("\"{key}\" is not a number: {v:?}"),
        }
    }

    fn arr(&self, key: &str) -> &[Json] {
        match self.get(key) {
            Json::Arr(a) => a,
            v => panic!("\"{key}\" is not an array: {v:?}"),
        }
    }

    fn str(&self, key: &str) -> &str {
        match self.get(key) {
            Json::Str(s) => s,
            v => panic!("\"{key}\" is not a string: {v:?}"),
        }
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, c: u8) -> Result<(), String> {
        self.ws();
        if self.s.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            Err(format!("expected '{}' at {}", c as char, self.i))
        }
    }

    fn value(&mut self) -> Result<Json, String> {
        self.ws();
        match self.s.get(self.i) {
            Some(b'{') => {
                self.i += 1;
                let mut m = BTreeMap::new();
                self.ws();
                if self.s.get(self.i) == Some(&b'}') {
                    self.i += 1;
                    return Ok(Json::Obj(m));
                }
                loop {
                    self.ws();
                    let Json::Str(k) = self.value()? else {
                        return Err(format!("object key at {}", self.i));
                    };
                    self.eat(b':')?;
                    let v = self.value()?;
                    m.insert(k, v);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b'}') => {
                            self.i += 1;
                            return Ok(Json::Obj(m));
                        }
                        _ => return Err(format!("expected ',' or '}}' at {}", self.i)),
                    }
                }
            }
            Some(b'[') => {
                self.i += 1;
                let mut a = vec![];
                self.ws();
                if self.s.get(self.i) == Some(&b']') {
                    self.i += 1;
                    return Ok(Json::Arr(a));
                }
                loop {
                    a.push(self.value()?);
                    self.ws();
                    match self.s.get(self.i) {
                        Some(b',') => self.i += 1,
                        Some(b']') => {
                            self.i += 1;
                            return Ok(Json::Arr(a));
                        }
                        _ => return Err(format!("expected ',' or ']' at {}", self.i)),
                    }
                }
            }
            Some(b'"') => {
                self.i += 1;
                let mut out = String::new();
                loop {
                    let c = *self.s.get(self.i).ok_or("unterminated string")?;
                    self.i += 1;
                    match c {
                        b'"' => return Ok(Json::Str(out)),
                        b'\\' => {
                            let e = *self.s.get(self.i).ok_or("unterminated escape")?;
                            self.i += 1;
                            match e {
                                b'n' => out.push('\n'),
                                b't' => out.push('\t'),
                                b'r' => out.push('\r'),
                                b'b' => out.push('\u{8}'),
                                b'f' => out.push('\u{c}'),
                                b'u' => {
                                    let hex = self.s.get(self.i..self.i + 4).ok_or("bad \\u")?;
                                    let code = u32::from_str_radix(
                                        std::str::from_utf8(hex).map_err(|e| e.to_string())?,
                                        16,
                                    )
                                    .map_err(|e| e.to_string())?;
                                    self.i += 4;
                                    out.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                                }
                                c => out.push(c as char),
                            }
                        }
                        _ => {
                            // Copy a whole UTF-8 sequence.
                            let start = self.i - 1;
                            while self.i < self.s.len() && (self.s[self.i] & 0xc0) == 0x80 {
                                self.i += 1;
                            }
                            out.push_str(
                                std::str::from_utf8(&self.s[start..self.i])
                                    .map_err(|e| e.to_string())?,
                            );
                        }
                    }
                }
            }
            Some(b't') if self.s[self.i..].starts_with(b"true") => {
                self.i += 4;
                Ok(Json::Bool(true))
            }
            Some(b'f') if self.s[self.i..].starts_with(b"false") => {
                self.i += 5;
                Ok(Json::Bool(false))
            }
            Some(b'n') if self.s[self.i..].starts_with(b"null") => {
                self.i += 4;
                Ok(Json::Null)
            }
            Some(_) => {
                let start = self.i;
                while self.i < self.s.len() && b"+-.eE0123456789".contains(&self.s[self.i]) {
                    self.i += 1;
                }
                std::str::from_utf8(&self.s[start..self.i])
                    .ok()
                    .and_then(|t| t.parse().ok())
                    .map(Json::Num)
                    .ok_or_else(|| format!("bad value at {start}"))
            }
            None => Err("unexpected end".into()),
        }
    }
}

#[test]
fn json_parser_reads_what_python_writes() {
    let v =
        Json::parse(r#"{"a": [1, -2.5e3, "x\"y\u00e9"], "b": {"c": null, "d": true}}"#).unwrap();
    assert_eq!(v.arr("a")[1], Json::Num(-2500.0));
    assert_eq!(v.arr("a")[2], Json::Str("x\"yé".into()));
    assert_eq!(v.get("b").get("d"), &Json::Bool(true));
    assert!(Json::parse("{\"a\": 1,}").is_err());
}

#[test]
fn one_small_cell_reports_consistent_numbers() {
    let Some(img) = image() else { return };
    let guest = img.kernel.parent().unwrap().to_path_buf();
    let dir = std::env::temp_dir().join(format!("nicvm-bench-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json_path = dir.join("report.json");
    let svg_path = dir.join("report.svg");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench");
    let mib = 1u64;
    let out = Command::new(script)
        .args(["nics", "--models", "virtio-net", "--backends", "user"])
        .args(["--runs", "1", "--mib", &mib.to_string(), "--pings", "5"])
        .args(["--no-qemu", "--no-netbench"])
        .arg("--nicvm")
        .arg(nicvm())
        .arg("--guest")
        .arg(&guest)
        .arg("--json")
        .arg(&json_path)
        .arg("--svg")
        .arg(&svg_path)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "scripts/bench failed: {:?}\n{stdout}\n{stderr}",
        out.status
    );

    let text = std::fs::read_to_string(&json_path).expect("the JSON report");
    let report = Json::parse(&text).unwrap_or_else(|e| panic!("report does not parse: {e}"));
    assert!(!report.str("host").is_empty());
    assert!(report.str("host_label").contains(report.str("host")));
    assert_eq!(report.num("mib"), mib as f64);
    let cells = report.arr("cells");
    assert_eq!(cells.len(), 1);
    let cell = &cells[0];
    assert_eq!(cell.str("backend"), "user");
    assert_eq!(cell.str("model"), "virtio-net");
    let nicvm = cell.get("nicvm");
    assert_eq!(nicvm.arr("errors"), &[] as &[Json], "{text}");
    assert_eq!(nicvm.num("runs_ok"), 1.0);
    let run = &nicvm.arr("runs")[0];

    let each_way = (mib << 20) as f64;
    assert_eq!(run.num("bytes_moved"), 2.0 * each_way, "{text}");
    assert_eq!(
        run.num("bytes_checked"),
        run.num("bytes_moved"),
        "bytes moved = bytes checked"
    );
    assert_eq!(nicvm.num("bytes_checked"), nicvm.num("bytes_moved"));
    for key in [
        "boot_to_lease_s",
        "h2g_mbit_s",
        "g2h_mbit_s",
        "rtt_median_ms",
        "rtt_p99_ms",
        "cpu_s_per_gb",
        "frames_per_s",
        "irqs_per_s",
        "transfer_s",
        "transfer_cpu_s",
        "vmm_cpu_total_s",
    ] {
        let v = run.num(key);
        assert!(v > 0.0 && v.is_finite(), "{key} = {v}");
        // One run: the summary's median and spread are that run's value.
        if let Json::Obj(s) = nicvm.get("summary") {
            if let Some(m) = s.get(key) {
                assert_eq!(m.num("median"), v, "{key}");
                assert_eq!(m.num("min"), v, "{key}");
                assert_eq!(m.num("max"), v, "{key}");
            }
        }
    }
    assert!(run.num("rtt_p99_ms") >= run.num("rtt_median_ms"));
    assert_eq!(run.num("pings_answered"), 5.0);
    assert!(run.num("boot_to_lease_s") < run.num("vmm_wall_s"));
    assert!(run.num("transfer_cpu_s") <= run.num("vmm_cpu_total_s") + 0.05);
    // Throughput and time agree: both directions together took transfer_s.
    let implied =
        each_way * 8.0 / 1e6 / run.num("h2g_mbit_s") + each_way * 8.0 / 1e6 / run.num("g2h_mbit_s");
    assert!((implied - run.num("transfer_s")).abs() < 0.01 * implied);

    // nicvm's own counters saw every byte the host checked, both ways (plus headers).
    let st = run.get("nic_stats");
    assert_eq!(st.str("model"), "virtio-net-pci");
    assert_eq!(st.str("backend"), "user");
    assert!(st.num("rx_bytes") >= each_way, "{st:?}");
    assert!(st.num("tx_bytes") >= each_way, "{st:?}");
    assert!(st.num("interrupts") > 0.0);
    let frames = st.num("tx_frames") + st.num("rx_frames");
    assert!((frames / run.num("transfer_s") - run.num("frames_per_s")).abs() < 1e-6 * frames);

    assert!(
        stdout.contains("| user | virtio-net-pci | nicvm |"),
        "table row:\n{stdout}"
    );
    assert!(
        stdout.contains(report.str("host")),
        "host kind in the table"
    );
    let svg = std::fs::read_to_string(&svg_path).expect("the SVG chart");
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert!(svg.contains("host-&gt;guest Mbit/s") && svg.contains("boot-&gt;lease s"));
    let _ = std::fs::remove_dir_all(&dir);
}
