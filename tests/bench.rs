//! The NIC comparison benchmark's smoke test: `scripts/bench nics` on one small cell
//! (virtio-net on user networking, 1 MiB each way, one run, no QEMU), then its report: the JSON
//! parses, every number is positive, the bytes it moved are the bytes it checked, nicvm's own
//! counters (NICVM_STATS) saw at least that much traffic, and the table and chart are there.

mod support;
use serde_json::Value as Json;
use std::process::{Command, Stdio};
use support::*;

/// Lookups into the report that fail the test with the path that was missing.
trait Report {
    fn at(&self, key: &str) -> &Json;
    fn num(&self, key: &str) -> f64;
    fn arr(&self, key: &str) -> &[Json];
    fn str(&self, key: &str) -> &str;
}

impl Report for Json {
    fn at(&self, key: &str) -> &Json {
        self.get(key)
            .unwrap_or_else(|| panic!("no \"{key}\" in {self}"))
    }
    fn num(&self, key: &str) -> f64 {
        self.at(key)
            .as_f64()
            .unwrap_or_else(|| panic!("\"{key}\" is not a number in {self}"))
    }
    fn arr(&self, key: &str) -> &[Json] {
        self.at(key)
            .as_array()
            .unwrap_or_else(|| panic!("\"{key}\" is not an array in {self}"))
    }
    fn str(&self, key: &str) -> &str {
        self.at(key)
            .as_str()
            .unwrap_or_else(|| panic!("\"{key}\" is not a string in {self}"))
    }
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
    let report: Json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("report does not parse: {e}"));
    assert!(!report.str("host").is_empty());
    assert!(report.str("host_label").contains(report.str("host")));
    assert_eq!(report.num("mib"), mib as f64);
    let cells = report.arr("cells");
    assert_eq!(cells.len(), 1);
    let cell = &cells[0];
    assert_eq!(cell.str("backend"), "user");
    assert_eq!(cell.str("model"), "virtio-net");
    let nicvm = cell.at("nicvm");
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
        if let Some(s) = nicvm.at("summary").as_object() {
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
    let st = run.at("nic_stats");
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
