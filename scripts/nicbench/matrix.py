"""What the nics bench measures: the NIC models and backends of its matrix and the metrics of
every cell. The runner, the statistics, the tables and the chart all read these, so a model or
metric added here reaches each of them."""

MODELS = {
    # key: (label, nicvm -device, qemu -device or None, the guest driver)
    "rtl8139-cp": ("rtl8139 (8139cp)", "rtl8139", "rtl8139", "8139cp"),
    "rtl8139-too": ("rtl8139 (8139too)", "rtl8139,cplus=off", None, "8139too"),
    "e1000": ("e1000", "e1000", "e1000", "e1000"),
    "virtio-net": ("virtio-net-pci", "virtio-net-pci", "virtio-net-pci", "virtio_net"),
    "virtio-net-mq": ("virtio-net-pci mq=on (2 pairs, -smp 2)", "virtio-net-pci,mq=on",
                      "virtio-net-pci,mq=on,vectors=6", "virtio_net"),
}
# Models whose guest gets this many vCPUs and a multiqueue tap of as many queues (a tap
# backend only: their other cells are n/a).
MULTIQUEUE = {"virtio-net-mq": 2}
BACKENDS = ["tap", "user", "vde"]
METRICS = [
    # key, column title, unit, digits, better
    ("boot_to_lease_s", "boot->lease s", "s", 1, "lower"),
    ("h2g_mbit_s", "host->guest Mbit/s", "Mbit/s", 1, "higher"),
    ("g2h_mbit_s", "guest->host Mbit/s", "Mbit/s", 1, "higher"),
    ("rtt_median_ms", "RTT median ms", "ms", 2, "lower"),
    ("rtt_p99_ms", "RTT p99 ms", "ms", 2, "lower"),
    ("cpu_s_per_gb", "CPU s/GB", "s", 0, "lower"),
    ("frames_per_s", "frames/s", "", 0, "higher"),
    ("irqs_per_s", "irq/s", "", 0, "higher"),
]
