# Shared by the scenario scripts (sourced): the guest image, nicvm, network namespaces that
# stand in for the host and the LAN, guests whose console lines come out prefixed with their
# name, and a clean-up that removes everything on any exit (also Ctrl-C or a failure).
#
# Environment: NICVM (nicvm binary, default target/release/nicvm), NICVM_GUEST_DIR (guest
# image; default: scripts/setup builds it), NICVM_SCENARIO_TAG (namespace name suffix).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
guest=${NICVM_GUEST_DIR:-$("$root/scripts/setup" | tail -n1)}
nicvm=${NICVM:-$root/target/release/nicvm}
xfer=$guest/xfer
tag=${NICVM_SCENARIO_TAG:-$$}
namespaces=()
daemons=()
guests=()
dirs=()
files=()

cleanup() {
  local p n
  for p in "${guests[@]}" "${daemons[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  for n in "${namespaces[@]}"; do ip netns del "$n" 2>/dev/null || true; done
  for d in "${dirs[@]}"; do rm -rf "$d"; done
  for f in "${files[@]}"; do rm -f "$f"; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ns NAME: the full name of one of this run's namespaces.
ns() { echo "nicvm-$tag-$1"; }
# mkns NAME: a fresh namespace with lo up.
mkns() {
  ip netns add "$(ns "$1")"
  namespaces+=("$(ns "$1")")
  ip -n "$(ns "$1")" link set lo up
}
# inside NAME CMD...: run CMD inside namespace NAME. (Background jobs call ip netns exec
# directly, so that $! is the process itself, not a subshell, and cleanup can kill it.)
inside() { local n=$1; shift; ip netns exec "$(ns "$n")" "$@"; }

# dhcp NS IFACE START END [MAC,IP...]: a DHCP server (dnsmasq) on IFACE. --no-ping: guests
# booting together must not wait for its address-in-use probes.
dhcp() {
  local n=$1 ifc=$2 start=$3 end=$4; shift 4
  local pins=() leases="/tmp/$(ns "$n").$ifc.leases"
  for h in "$@"; do pins+=("--dhcp-host=$h"); done
  files+=("$leases")
  ip netns exec "$(ns "$n")" dnsmasq --no-daemon --interface="$ifc" --bind-interfaces --except-interface=lo \
    --dhcp-range="$start,$end,255.255.255.0,1h" --port=0 --no-resolv --no-hosts --no-ping \
    --dhcp-leasefile="$leases" --pid-file= "${pins[@]}" \
    </dev/null >/dev/null 2>&1 &
  daemons+=($!)
  sleep 0.3
}

# daemon NS CMD...: a helper process kept until the end, its output prefixed with NS.
daemon() {
  local n=$1; shift
  ip netns exec "$(ns "$n")" "$@" </dev/null > >(sed -u "s/^/$n: /") 2>&1 &
  daemons+=($!)
}

# boot NAME NS "KERNEL-ARGS" NICVM-ARGS...: a guest running the image's init steps
# (nicvm.run=... in KERNEL-ARGS), console lines prefixed with NAME.
boot() {
  local name=$1 n=$2 append=$3; shift 3
  ip netns exec "$(ns "$n")" "$nicvm" -m 128 -nographic -kernel "$guest/vmlinux" -initrd "$guest/initramfs.cpio" \
    -append "console=ttyS0 quiet $append" "$@" \
    </dev/null > >(sed -u "s/^/$name: /") 2>&1 &
  guests+=($!)
}

# tmpdir: a private directory removed at the end, in $tmp.
tmpdir() {
  tmp=$(mktemp -d "${TMPDIR:-/tmp}/nicvm-scenario.XXXXXX")
  dirs+=("$tmp")
}

# listening SOCKET: whether a Unix stream socket accepts connections.
listening() {
  python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$1" 2>/dev/null
}

# vde_switch NS DIR [TAP]: a VDE switch with its control socket in DIR (optionally plugged into
# a tap it creates in NS), stopped at the end.
vde_switch() {
  local n=$1 dir=$2; shift 2
  local tapopt=()
  [ $# -gt 0 ] && tapopt=(-t "$1")
  inside "$n" vde_switch -s "$dir" "${tapopt[@]}" -d -p "$dir.pid" </dev/null >/dev/null 2>&1
  # Up once it has written its pidfile, listens on ctl (the file appears at bind, a moment
  # before listen) and (after the pidfile) created its tap.
  for _ in $(seq 100); do
    [ -s "$dir.pid" ] && listening "$dir/ctl" && { [ $# -eq 0 ] || inside "$n" ip link show "$1" >/dev/null 2>&1; } && break
    sleep 0.1
  done
  daemons+=("$(cat "$dir.pid")")
}

# wait_guests: waits for every guest; fails if one did not end cleanly.
wait_guests() {
  local p rc=0
  for p in "${guests[@]}"; do wait "$p" || rc=1; done
  guests=()
  return $rc
}
