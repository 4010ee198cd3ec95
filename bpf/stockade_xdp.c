/* stockade_xdp.c - the kernel fast path.
 *
 * Per packet: parse Ethernet (up to two VLAN tags), IPv4/IPv6 -> allowlist
 * -> bans (exact, then prefix) -> SYN token bucket -> one exit that counts
 * the verdict by ingress interface slot and reason.
 *
 * Policy on odd packets:
 *  - Truncated or invalid headers PASS as REASON_MALFORMED: the kernel's own
 *    stack drops what is really broken, and a parser bug must never turn
 *    into an outage. A source's ban is still applied when its L3 header is
 *    whole, whatever follows.
 *  - IPv4 options are skipped using ihl; IPv6 extension headers are walked
 *    at most MAX_V6_EXT_HDRS times, then L4 is not inspected.
 *  - A fragment (IPv4 MF/offset, IPv6 fragment header) is judged by its
 *    source address only: later fragments carry no TCP header, so the SYN
 *    limit applies to unfragmented SYNs.
 *  - More than two VLAN tags is malformed.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>

#include "stockade.h"

#define NS_PER_SEC 1000000000ULL
/* Elapsed time counted for a refill; with syn_rate <= 1e6 (checked by the
 * controller) elapsed * rate stays far below 2^64. */
#define MAX_REFILL_NS (1000ULL * NS_PER_SEC)

#define L4_NONE 256 /* no L4 header to inspect */

_Static_assert((IF_SLOTS & (IF_SLOTS - 1)) == 0, "IF_SLOTS must be a power of two");

/* IPv4 fragment bits of frag_off (host order) */
#define IPV4_MF 0x2000
#define IPV4_OFFSET 0x1fff

struct vlan_hdr_stk {
	__be16 tci;
	__be16 encapsulated_proto;
};

struct frag_hdr_stk {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

struct cursor {
	void *pos;
	void *end;
};

struct packet {
	__u32 family;
	__u8 saddr[16]; /* IPv4 uses the first 4 bytes */
	int l4proto;    /* IPPROTO_*, or L4_NONE */
	int malformed;
};

/* Returns the ethertype (network order) after up to two VLAN tags, or -1. */
static __always_inline int parse_eth(struct cursor *c)
{
	struct ethhdr *eth = c->pos;

	/* bounds: the whole Ethernet header must be in the frame */
	if ((void *)(eth + 1) > c->end)
		return -1;
	c->pos = eth + 1;
	__be16 proto = eth->h_proto;

#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan_hdr_stk *vlan = c->pos;
		/* bounds: each tag is checked before it is read */
		if ((void *)(vlan + 1) > c->end)
			return -1;
		proto = vlan->encapsulated_proto;
		c->pos = vlan + 1;
	}
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
		return -1;
	return proto;
}

/* Fills pkt from an IPv4 header; returns 0, or -1 if it is not whole. */
static __always_inline int parse_ipv4(struct cursor *c, struct packet *pkt)
{
	struct iphdr *ip = c->pos;

	/* bounds: the fixed header before reading ihl */
	if ((void *)(ip + 1) > c->end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	__u32 hlen = ip->ihl * 4;
	if (bpf_ntohs(ip->tot_len) < hlen)
		return -1;
	/* bounds: options included (hlen <= 60) */
	if (c->pos + hlen > c->end)
		return -1;
	c->pos += hlen;

	pkt->family = STOCKADE_AF_INET;
	__builtin_memcpy(pkt->saddr, &ip->saddr, 4);
	if (ip->frag_off & bpf_htons(IPV4_MF | IPV4_OFFSET))
		pkt->l4proto = L4_NONE;
	else
		pkt->l4proto = ip->protocol;
	return 0;
}

/* Fills pkt from an IPv6 header and its extension headers. */
static __always_inline int parse_ipv6(struct cursor *c, struct packet *pkt)
{
	struct ipv6hdr *ip6 = c->pos;

	/* bounds: the fixed header */
	if ((void *)(ip6 + 1) > c->end)
		return -1;
	if (ip6->version != 6)
		return -1;
	c->pos = ip6 + 1;
	pkt->family = STOCKADE_AF_INET6;
	__builtin_memcpy(pkt->saddr, &ip6->saddr, 16);

	__u8 nexthdr = ip6->nexthdr;
	pkt->l4proto = L4_NONE;
#pragma unroll
	for (int i = 0; i < MAX_V6_EXT_HDRS; i++) {
		struct ipv6_opt_hdr *opt = c->pos;
		__u32 len;

		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			/* bounds: the two bytes that give the length */
			if ((void *)(opt + 1) > c->end)
				return -1;
			len = (opt->hdrlen + 1) * 8;
			break;
		case IPPROTO_AH:
			if ((void *)(opt + 1) > c->end)
				return -1;
			len = (opt->hdrlen + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			/* judged by the source only; the header must still be whole */
			if (c->pos + sizeof(struct frag_hdr_stk) > c->end)
				return -1;
			return 0;
		default:
			pkt->l4proto = nexthdr;
			return 0;
		}
		nexthdr = opt->nexthdr;
		/* bounds: len <= 2048, the verifier tracks it; checked below */
		if (c->pos + len > c->end)
			return -1;
		c->pos += len;
	}
	/* MAX_V6_EXT_HDRS headers walked. If the last one leads to L4, inspect
	 * it like any other (is_syn() checks its bounds): before this check,
	 * exactly MAX_V6_EXT_HDRS extension headers escaped the SYN limit. */
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_FRAGMENT:
		/* too many extension headers: judged by the source only */
		return 0;
	default:
		pkt->l4proto = nexthdr;
		return 0;
	}
}

/* 1 if the TCP header is a SYN without ACK, 0 if not, -1 if truncated. */
static __always_inline int is_syn(struct cursor *c)
{
	struct tcphdr *tcp = c->pos;

	/* bounds: the fixed TCP header */
	if ((void *)(tcp + 1) > c->end)
		return -1;
	if (tcp->doff < 5)
		return -1;
	return tcp->syn && !tcp->ack;
}

/* bpf_ktime_get_ns() costs about half of a passing packet's budget (see
 * bench/README.md), so it is read at most once, and only when a decision
 * needs it: an expiring ban that matched, or a SYN. */
static __always_inline __u64 clock_now(__u64 *now)
{
	if (!*now)
		*now = bpf_ktime_get_ns();
	return *now;
}

static __always_inline int ban_active(const struct ban_value *ban, __u64 *now)
{
	return ban->expires_ns == 0 || ban->expires_ns > clock_now(now);
}

static __always_inline void hit_ban(struct ban_value *ban, __u64 bytes)
{
	/* shared by all CPUs: atomic adds */
	__sync_fetch_and_add(&ban->packets, 1);
	__sync_fetch_and_add(&ban->bytes, bytes);
}

static __always_inline void hit_allow(struct allow_value *allow, __u64 bytes)
{
	__sync_fetch_and_add(&allow->packets, 1);
	__sync_fetch_and_add(&allow->bytes, bytes);
}

static __always_inline int allowed(const struct stockade_config *cfg, const struct packet *pkt,
				   __u64 bytes)
{
	struct allow_value *allow;

	if (pkt->family == STOCKADE_AF_INET) {
		if (!cfg->allow_v4_count)
			return 0;
		struct lpm_v4_key key = {.prefixlen = 32};
		__builtin_memcpy(key.addr, pkt->saddr, 4);
		allow = allow_v4.lookup(&key);
	} else {
		if (!cfg->allow_v6_count)
			return 0;
		struct lpm_v6_key key = {.prefixlen = 128};
		__builtin_memcpy(key.addr, pkt->saddr, 16);
		allow = allow_v6.lookup(&key);
	}
	/* NULL check: no entry covers the source */
	if (!allow)
		return 0;
	hit_allow(allow, bytes);
	return 1;
}

/* Exact entry first, then the longest prefix; each result is tested on its
 * own (the verifier rejects arithmetic on two map-value pointers). */
static __always_inline int banned(const struct stockade_config *cfg, const struct packet *pkt,
				  __u64 *now, __u64 bytes)
{
	struct ban_value *ban;

	if (pkt->family == STOCKADE_AF_INET) {
		struct addr_v4 exact = {};
		__builtin_memcpy(exact.addr, pkt->saddr, 4);
		ban = ban_v4.lookup(&exact);
		if (ban && ban_active(ban, now)) {
			hit_ban(ban, bytes);
			return 1;
		}
		if (!cfg->ban_prefix_v4_count)
			return 0;
		struct lpm_v4_key key = {.prefixlen = 32};
		__builtin_memcpy(key.addr, pkt->saddr, 4);
		ban = ban_prefix_v4.lookup(&key);
	} else {
		struct addr_v6 exact = {};
		__builtin_memcpy(exact.addr, pkt->saddr, 16);
		ban = ban_v6.lookup(&exact);
		if (ban && ban_active(ban, now)) {
			hit_ban(ban, bytes);
			return 1;
		}
		if (!cfg->ban_prefix_v6_count)
			return 0;
		struct lpm_v6_key key = {.prefixlen = 128};
		__builtin_memcpy(key.addr, pkt->saddr, 16);
		ban = ban_prefix_v6.lookup(&key);
	}
	/* NULL check, then expiry: an expired ban never drops */
	if (!ban || !ban_active(ban, now))
		return 0;
	hit_ban(ban, bytes);
	return 1;
}

static __always_inline void rate_key_of(const struct stockade_config *cfg,
					const struct packet *pkt, struct rate_key *key)
{
	key->family = pkt->family;
	if (pkt->family == STOCKADE_AF_INET) {
		__builtin_memcpy(key->addr, pkt->saddr, 4);
		return;
	}
	__u32 plen = cfg->v6_rate_prefix;
#pragma unroll
	for (int i = 0; i < 16; i++) {
		int bits = (int)plen - i * 8;
		if (bits >= 8)
			key->addr[i] = pkt->saddr[i];
		else if (bits > 0)
			key->addr[i] = pkt->saddr[i] & (0xff << (8 - bits));
	}
}

static __always_inline void report_rate(const struct rate_key *key, __u64 dropped, __u64 now)
{
	struct rate_event *ev = events.ringbuf_reserve(sizeof(*ev));

	if (!ev) {
		__u32 zero = 0;
		__u64 *lost = events_lost.lookup(&zero);
		/* NULL check; per-CPU slot, no atomics needed */
		if (lost)
			*lost += 1;
		return;
	}
	ev->type = EVENT_SYN_RATE;
	ev->family = key->family;
	__builtin_memcpy(ev->addr, key->addr, 16);
	ev->dropped = dropped;
	ev->ts_ns = now;
	events.ringbuf_submit(ev, 0);
}

/* Token bucket per source; 1 if this SYN is over the rate. */
static __always_inline int syn_over_rate(const struct stockade_config *cfg,
					 const struct packet *pkt, __u64 *clock)
{
	if (!cfg->syn_rate)
		return 0;

	__u64 now = clock_now(clock);
	struct rate_key key = {};
	rate_key_of(cfg, pkt, &key);
	__u64 cap = cfg->syn_burst * NS_PER_SEC;
	struct rate_bucket *bucket = syn_buckets.lookup(&key);

	/* NULL check: a new source starts with a full bucket, minus this SYN */
	if (!bucket) {
		struct rate_bucket fresh = {
			.tokens_nano = cap > NS_PER_SEC ? cap - NS_PER_SEC : 0,
			.last_ns = now,
		};
		syn_buckets.update(&key, &fresh);
		return 0;
	}

	/* Buckets are shared by all CPUs and updated without atomics: two
	 * CPUs racing on one source may both spend the same token, which lets
	 * at most one extra SYN per CPU through. Accepted for a rate limit. */
	__u64 elapsed = now > bucket->last_ns ? now - bucket->last_ns : 0;
	if (elapsed > MAX_REFILL_NS)
		elapsed = MAX_REFILL_NS;
	__u64 tokens = bucket->tokens_nano + elapsed * cfg->syn_rate;
	if (tokens > cap)
		tokens = cap;
	bucket->last_ns = now;
	if (tokens >= NS_PER_SEC) {
		bucket->tokens_nano = tokens - NS_PER_SEC;
		return 0;
	}
	bucket->tokens_nano = tokens;
	bucket->dropped += 1;
	if (now - bucket->last_report_ns >= NS_PER_SEC) {
		bucket->last_report_ns = now;
		report_rate(&key, bucket->dropped, now);
	}
	return 1;
}

/* Everything but the exit: returns the reason for this packet. */
static __always_inline __u32 classify(struct xdp_md *ctx, const struct stockade_config *cfg,
				      __u64 bytes)
{
	struct cursor c = {
		.pos = (void *)(long)ctx->data,
		.end = (void *)(long)ctx->data_end,
	};
	struct packet pkt = {};

	int proto = parse_eth(&c);
	if (proto < 0)
		return REASON_MALFORMED;
	if (proto == bpf_htons(ETH_P_IP)) {
		if (parse_ipv4(&c, &pkt) < 0)
			return REASON_MALFORMED;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		if (parse_ipv6(&c, &pkt) < 0)
			return REASON_MALFORMED;
	} else {
		return REASON_NON_IP;
	}

	if (allowed(cfg, &pkt, bytes))
		return REASON_ALLOW;
	__u64 now = 0; /* read lazily by clock_now() */
	if (banned(cfg, &pkt, &now, bytes))
		return REASON_DROP_BAN;
	if (pkt.l4proto != IPPROTO_TCP)
		return REASON_PASS;

	int syn = is_syn(&c);
	if (syn < 0)
		return REASON_MALFORMED;
	if (syn && syn_over_rate(cfg, &pkt, &now))
		return REASON_DROP_RATE;
	return REASON_PASS;
}

int xdp_stockade(struct xdp_md *ctx)
{
	__u32 zero = 0;
	__u64 bytes = ctx->data_end - ctx->data;
	struct stockade_config *cfg = config.lookup(&zero);
	__u32 reason = REASON_PASS;

	/* NULL check: an array always has index 0, but the verifier asks */
	if (cfg)
		reason = classify(ctx, cfg, bytes);

	/* The one exit: every packet is counted by interface slot and reason.
	 * bounds: the mask keeps the slot below IF_SLOTS and classify() returns
	 * a reason below REASON_MAX, so the index is below IF_SLOTS *
	 * REASON_MAX, the size of the map. The verifier does not need to know:
	 * an array lookup checks its index at run time and returns NULL past
	 * the end, and the NULL check below is the one it asks for. */
	__u32 slot = ctx->ingress_ifindex & (IF_SLOTS - 1);
	__u32 index = slot * REASON_MAX + reason;
	struct counter *cnt = counters.lookup(&index);
	/* NULL check; per-CPU slot, so plain adds without atomics */
	if (cnt) {
		cnt->packets += 1;
		cnt->bytes += bytes;
	}
	if (cfg && !(cfg->flags & CONFIG_F_MONITOR) &&
	    (reason == REASON_DROP_BAN || reason == REASON_DROP_RATE))
		return XDP_DROP;
	return XDP_PASS;
}
