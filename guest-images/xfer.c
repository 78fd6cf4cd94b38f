/*
 * nicvm-xfer: bulk TCP for the test guest, with 256 KiB buffers and no libc.
 *
 * busybox nc moves 1 KiB per system call, and on a host whose KVM emulates guest kernel code
 * each call costs about a millisecond, so 8 MiB took minutes. This moves the same data with a
 * few hundred calls and reports, on stdout, a line the tests parse:
 *
 *   xfer recv PORT            listen (NICVM-LISTEN port=PORT once it does), accept one
 *                             connection, count what arrives until EOF:
 *                             NICVM-RECV port=PORT bytes=N fnv1a64=HEX
 *                             (or, when accept fails, bytes=0 ... result=fail step=accept
 *                             errno=E)
 *   xfer send ADDR PORT BYTES send BYTES of the xorshift64 stream the tests also generate:
 *                             NICVM-SENT addr=ADDR port=PORT bytes=N fnv1a64=HEX result=ok
 *                             or, with the bytes written so far,
 *                             ... result=fail step=socket|connect|write errno=E
 *                             (connecting gives up after 10 s)
 *   xfer udpecho PORT N       bind (NICVM-UDPLISTEN port=PORT), then send back each of N
 *                             UDP datagrams to where it came from:
 *                             NICVM-UDPECHO port=PORT datagrams=N bytes=B
 *   xfer mcast GROUP PORT N IFINDEX
 *                             join GROUP on interface IFINDEX, bind PORT
 *                             (NICVM-MCASTLISTEN group=GROUP), count N datagrams:
 *                             NICVM-MCAST group=GROUP datagrams=N result=ok|timeout
 *                             (gives up 30 s after the last datagram)
 *   xfer echoed N SECS        wait until this guest has answered N ICMP echo requests
 *                             (the kernel's Icmp InEchos), for SECS at most:
 *                             NICVM-ECHOED requests=N result=ok|timeout
 *
 * FNV-1a (64-bit) is the checksum both sides compute.
 */
typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;

#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_nanosleep 35
#define SYS_socket 41
#define SYS_connect 42
#define SYS_accept 43
#define SYS_shutdown 48
#define SYS_bind 49
#define SYS_listen 50
#define SYS_setsockopt 54
#define SYS_exit 60
#define SYS_sendto 44
#define SYS_recvfrom 45

static long sys(long n, long a, long b, long c, long d, long e)
{
	long r;
	register long r10 __asm__("r10") = d;
	register long r8 __asm__("r8") = e;
	__asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8)
			 : "rcx", "r11", "memory");
	return r;
}

struct sockaddr_in {
	u16 family;
	u16 port;
	u32 addr;
	u8 zero[8];
};

static u8 buf[256 * 1024];

static u64 len(const char *s) { u64 n = 0; while (s[n]) n++; return n; }
static void out(const char *s) { sys(SYS_write, 1, (long)s, len(s), 0, 0); }

static u64 num(const char *s)
{
	u64 v = 0;
	while (*s >= '0' && *s <= '9') v = v * 10 + (u64)(*s++ - '0');
	return v;
}

static int ipv4(const char *s, u32 *addr)
{
	u32 a = 0;
	for (int i = 0; i < 4; i++) {
		u64 part = 0;
		int digits = 0;
		while (*s >= '0' && *s <= '9') { part = part * 10 + (u64)(*s++ - '0'); digits++; }
		if (!digits || part > 255 || (i < 3 && *s++ != '.')) return -1;
		a |= (u32)part << (8 * i);	/* network order in memory */
	}
	*addr = a;
	return *s ? -1 : 0;
}

static char *put(char *p, const char *s) { while (*s) *p++ = *s++; return p; }

static char *put_dec(char *p, u64 v)
{
	char t[24]; int n = 0;
	do { t[n++] = (char)('0' + v % 10); v /= 10; } while (v);
	while (n) *p++ = t[--n];
	return p;
}

static char *put_hex(char *p, u64 v)
{
	for (int i = 15; i >= 0; i--) *p++ = "0123456789abcdef"[(v >> (4 * i)) & 15];
	return p;
}

#define FNV_OFFSET 0xcbf29ce484222325UL
#define FNV_PRIME 0x100000001b3UL

static u64 fnv(u64 h, const u8 *d, u64 n)
{
	for (u64 i = 0; i < n; i++) { h ^= d[i]; h *= FNV_PRIME; }
	return h;
}

static int do_recv(const char *port_s)
{
	struct sockaddr_in sa = { 2, 0, 0, {0} };
	u64 port = num(port_s), total = 0, h = FNV_OFFSET;
	int one = 1;
	long s = sys(SYS_socket, 2, 1, 0, 0, 0);
	sa.port = (u16)((port >> 8) | (port << 8));
	sys(SYS_setsockopt, s, 1, 2, (long)&one, sizeof(one));	/* SO_REUSEADDR */
	if (s < 0 || sys(SYS_bind, s, (long)&sa, sizeof(sa), 0, 0) < 0 || sys(SYS_listen, s, 1, 0, 0, 0) < 0)
		return 1;
	char ready[64], *q = ready;
	q = put(q, "NICVM-LISTEN port="); q = put(q, port_s); q = put(q, "\n"); *q = 0;
	out(ready);	/* only now: a peer that connects after this line is accepted */
	long c;
	do c = sys(SYS_accept, s, 0, 0, 0, 0); while (c == -4);	/* EINTR */
	if (c < 0) {	/* say so: a missing line tells nothing */
		char line[96], *p = line;
		p = put(p, "NICVM-RECV port="); p = put(p, port_s);
		p = put(p, " bytes=0 fnv1a64=0 result=fail step=accept errno=");
		p = put_dec(p, (u64)-c); p = put(p, "\n"); *p = 0;
		out(line);
		return 1;
	}
	for (;;) {
		long n = sys(SYS_read, c, (long)buf, sizeof(buf), 0, 0);
		if (n == -4) continue;	/* EINTR */
		if (n <= 0) break;
		h = fnv(h, buf, (u64)n);
		total += (u64)n;
	}
	char line[128], *p = line;
	p = put(p, "NICVM-RECV port="); p = put(p, port_s);
	p = put(p, " bytes="); p = put_dec(p, total);
	p = put(p, " fnv1a64="); p = put_hex(p, h); p = put(p, "\n"); *p = 0;
	out(line);
	return 0;
}

static int do_send(const char *addr_s, const char *port_s, const char *bytes_s)
{
	struct sockaddr_in sa = { 2, 0, 0, {0} };
	u64 port = num(port_s), want = num(bytes_s), sent = 0, h = FNV_OFFSET;
	u64 x = 0x9e3779b97f4a7c15UL;
	const char *step = 0;	/* what failed, if anything */
	long err = 0;
	if (ipv4(addr_s, &sa.addr) || len(addr_s) > 32 || len(port_s) > 8) return 2;	/* line[] */
	sa.port = (u16)((port >> 8) | (port << 8));
	long s = sys(SYS_socket, 2, 1, 0, 0, 0);
	long tv[2] = { 10, 0 };	/* SO_SNDTIMEO bounds connect() too */
	if (s < 0) { step = "socket"; err = s; }
	if (!step) {
		sys(SYS_setsockopt, s, 1, 21, (long)tv, sizeof(tv));
		err = sys(SYS_connect, s, (long)&sa, sizeof(sa), 0, 0);
		if (err < 0) step = "connect";
		tv[0] = 0;
		sys(SYS_setsockopt, s, 1, 21, (long)tv, sizeof(tv));
	}
	while (!step && sent < want) {
		u64 n = want - sent < sizeof(buf) ? want - sent : sizeof(buf);
		for (u64 i = 0; i < n; i++) {
			x ^= x << 13; x ^= x >> 7; x ^= x << 17;
			buf[i] = (u8)x;
		}
		for (u64 off = 0; off < n;) {
			long w = sys(SYS_write, s, (long)(buf + off), (long)(n - off), 0, 0);
			if (w == -4) continue;
			if (w <= 0) { step = "write"; err = w; break; }
			h = fnv(h, buf + off, (u64)w);	/* what was written: bytes= and the hash agree */
			off += (u64)w;
			sent += (u64)w;
		}
	}
	if (!step) {
		sys(SYS_shutdown, s, 1, 0, 0, 0);	/* SHUT_WR, then wait for the peer to close */
		while (sys(SYS_read, s, (long)buf, sizeof(buf), 0, 0) > 0)
			;
	}
	char line[224], *p = line;
	p = put(p, "NICVM-SENT addr="); p = put(p, addr_s);
	p = put(p, " port="); p = put(p, port_s);
	p = put(p, " bytes="); p = put_dec(p, sent);
	p = put(p, " fnv1a64="); p = put_hex(p, h);
	if (step) {
		/* e.g. step=connect errno=115: EINPROGRESS, the 10 s ran out */
		p = put(p, " result=fail step="); p = put(p, step);
		p = put(p, " errno="); p = put_dec(p, (u64)-err); p = put(p, "\n");
	} else {
		p = put(p, " result=ok\n");
	}
	*p = 0;
	out(line);
	return step ? 1 : 0;
}

static int do_udpecho(const char *port_s, const char *count_s)
{
	struct sockaddr_in sa = { 2, 0, 0, {0} }, from;
	u64 port = num(port_s), want = num(count_s), n = 0, bytes = 0;
	long s = sys(SYS_socket, 2, 2, 0, 0, 0);	/* SOCK_DGRAM */
	sa.port = (u16)((port >> 8) | (port << 8));
	if (s < 0 || sys(SYS_bind, s, (long)&sa, sizeof(sa), 0, 0) < 0) return 1;
	char ready[64], *q = ready;
	q = put(q, "NICVM-UDPLISTEN port="); q = put(q, port_s); q = put(q, "\n"); *q = 0;
	out(ready);
	while (n < want) {
		u32 fromlen = sizeof(from);
		register long a5 __asm__("r9") = (long)&fromlen;
		long r;
		__asm__ volatile("syscall" : "=a"(r) : "a"(SYS_recvfrom), "D"(s), "S"((long)buf), "d"(sizeof(buf)),
				 "r"((long)0), "r"((long)&from), "r"(a5) : "rcx", "r11", "memory");
		if (r == -4) continue;
		if (r < 0) return 1;
		register long t5 __asm__("r9") = (long)fromlen;
		register long t4 __asm__("r8") = (long)&from;
		register long t3 __asm__("r10") = 0;
		__asm__ volatile("syscall" : "=a"(r) : "a"(SYS_sendto), "D"(s), "S"((long)buf), "d"(r), "r"(t3), "r"(t4), "r"(t5)
				 : "rcx", "r11", "memory");
		n++;
		bytes += r > 0 ? (u64)r : 0;
	}
	char line[128], *p = line;
	p = put(p, "NICVM-UDPECHO port="); p = put(p, port_s);
	p = put(p, " datagrams="); p = put_dec(p, n);
	p = put(p, " bytes="); p = put_dec(p, bytes); p = put(p, "\n"); *p = 0;
	out(line);
	return 0;
}

static int do_mcast(const char *group_s, const char *port_s, const char *count_s, const char *ifindex_s)
{
	struct sockaddr_in sa = { 2, 0, 0, {0} };
	struct { u32 group, local; int ifindex; } mreq = { 0, 0, (int)num(ifindex_s) };
	struct { long sec, usec; } timeout = { 30, 0 };
	u64 port = num(port_s), want = num(count_s), n = 0;
	long s = sys(SYS_socket, 2, 2, 0, 0, 0);	/* SOCK_DGRAM */
	sa.port = (u16)((port >> 8) | (port << 8));
	if (s < 0 || ipv4(group_s, &mreq.group)) return 1;
	if (sys(SYS_bind, s, (long)&sa, sizeof(sa), 0, 0) < 0) return 1;
	/* IPPROTO_IP/IP_ADD_MEMBERSHIP with an ip_mreqn; SOL_SOCKET/SO_RCVTIMEO */
	if (sys(SYS_setsockopt, s, 0, 35, (long)&mreq, sizeof(mreq)) < 0) return 1;
	if (sys(SYS_setsockopt, s, 1, 20, (long)&timeout, sizeof(timeout)) < 0) return 1;
	char ready[80], *q = ready;
	q = put(q, "NICVM-MCASTLISTEN group="); q = put(q, group_s); q = put(q, "\n"); *q = 0;
	out(ready);
	const char *result = "ok";
	while (n < want) {
		long r = sys(SYS_recvfrom, s, (long)buf, sizeof(buf), 0, 0);
		if (r == -4) continue;
		if (r < 0) { result = "timeout"; break; }
		n++;
	}
	char line[128], *p = line;
	p = put(p, "NICVM-MCAST group="); p = put(p, group_s);
	p = put(p, " datagrams="); p = put_dec(p, n);
	p = put(p, " result="); p = put(p, result); p = put(p, "\n"); *p = 0;
	out(line);
	return 0;
}

/* Whether p starts with the word w (followed by a blank, a line end or the end). */
static int word(const char *p, const char *w)
{
	while (*w && *p == *w) { p++; w++; }
	return !*w && (*p == ' ' || *p == '\n' || !*p);
}

static const char *skip_blanks(const char *p) { while (*p == ' ') p++; return p; }
static const char *skip_word(const char *p) { while (*p && *p != ' ' && *p != '\n') p++; return p; }

/* Icmp InEchos from /proc/net/snmp, whose first "Icmp:" line names the fields and whose
 * second holds their values in the same order; -1 when it cannot be read. */
static long in_echos(void)
{
	long fd = sys(SYS_open, (long)"/proc/net/snmp", 0, 0, 0, 0);
	if (fd < 0) return -1;
	long n = sys(SYS_read, fd, (long)buf, sizeof(buf) - 1, 0, 0);
	sys(SYS_close, fd, 0, 0, 0, 0);
	if (n <= 0) return -1;
	buf[n] = 0;
	const char *names = 0, *values = 0, *p = (const char *)buf;
	while (*p && !values) {
		if (word(p, "Icmp:")) {
			if (names) values = p; else names = p;
		}
		while (*p && *p != '\n') p++;
		if (*p) p++;
	}
	if (!values) return -1;
	for (;;) {
		names = skip_blanks(skip_word(names));
		values = skip_blanks(skip_word(values));
		if (!*names || *names == '\n' || !*values || *values == '\n') return -1;
		if (word(names, "InEchos")) return (long)num(values);
	}
}

static int do_echoed(const char *count_s, const char *secs_s)
{
	long want = (long)num(count_s), got = in_echos();
	struct { long sec, nsec; } tick = { 0, 200000000 };
	for (u64 i = 0; got < want && i < num(secs_s) * 5; i++) {
		sys(SYS_nanosleep, (long)&tick, 0, 0, 0, 0);
		got = in_echos();
	}
	char line[96], *p = line;
	p = put(p, "NICVM-ECHOED requests="); p = put_dec(p, got > 0 ? (u64)got : 0);
	p = put(p, got >= want ? " result=ok\n" : " result=timeout\n"); *p = 0;
	out(line);
	return got >= want ? 0 : 1;
}

static int streq(const char *a, const char *b) { while (*a && *a == *b) { a++; b++; } return *a == *b; }

__attribute__((used)) void start_c(long *sp)
{
	long argc = sp[0];
	char **argv = (char **)(sp + 1);
	int rc = 2;
	if (argc == 3 && streq(argv[1], "recv")) rc = do_recv(argv[2]);
	else if (argc == 5 && streq(argv[1], "send")) rc = do_send(argv[2], argv[3], argv[4]);
	else if (argc == 4 && streq(argv[1], "udpecho")) rc = do_udpecho(argv[2], argv[3]);
	else if (argc == 6 && streq(argv[1], "mcast")) rc = do_mcast(argv[2], argv[3], argv[4], argv[5]);
	else if (argc == 4 && streq(argv[1], "echoed")) rc = do_echoed(argv[2], argv[3]);
	else out("usage: xfer recv PORT | xfer send ADDR PORT BYTES | xfer udpecho PORT N"
		 " | xfer mcast GROUP PORT N IFINDEX | xfer echoed N SECS\n");
	sys(SYS_exit, rc, 0, 0, 0, 0);
}

__asm__(".global _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start_c\n\thlt\n");
