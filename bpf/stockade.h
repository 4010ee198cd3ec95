/* stockade.h - the one contract between the XDP program and user space.
 *
 * Every map, key/value struct, reason code and limit lives here. User space
 * mirrors the structs with ctypes (controller/layout.py) and a test checks
 * sizes and offsets against bcc's view of this file; reason codes are parsed
 * from this file, never retyped.
 *
 * Limits have #ifndef defaults so the loader can override them with -D.
 */
#ifndef STOCKADE_H
#define STOCKADE_H

/* Bumped whenever a pinned map's key, value or type changes: bcc does not
 * type-check pinned maps, so a new layout must live in a new directory. */
#define STOCKADE_LAYOUT_VERSION 2

#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/stockade/v2"
#endif

#ifndef MAX_BANS_V4
#define MAX_BANS_V4 1048576
#endif
#ifndef MAX_BANS_V6
#define MAX_BANS_V6 1048576
#endif
#ifndef MAX_PREFIX_BANS
#define MAX_PREFIX_BANS 65536
#endif
#ifndef MAX_ALLOW
#define MAX_ALLOW 4096
#endif
#ifndef MAX_RATE_SOURCES
#define MAX_RATE_SOURCES 262144
#endif
/* Bound on IPv6 extension headers walked before giving up on L4. */
#ifndef MAX_V6_EXT_HDRS
#define MAX_V6_EXT_HDRS 6
#endif
#ifndef EVENTS_PAGES
#define EVENTS_PAGES 64
#endif

/* Interface slots in the counters map: a packet is counted in slot
 * ingress_ifindex % IF_SLOTS, so counting per interface needs no hash
 * lookup. Interfaces whose ifindex share a slot share its counters (the
 * controller warns and labels them together). A power of two, so the modulo
 * is a mask. Part of the counters map's shape: changing it changes the
 * layout (bump STOCKADE_LAYOUT_VERSION), so it is not a -D option. */
#define IF_SLOTS 64

/* Verdict reasons: index into the counters map, within a slot. Never renumber a reason;
 * retire it and add a new one at the end. */
enum stockade_reason {
	REASON_PASS = 0,      /* evaluated, nothing matched */
	REASON_ALLOW = 1,     /* source is in the allowlist */
	REASON_DROP_BAN = 2,  /* source is banned (exact or prefix) */
	REASON_DROP_RATE = 3, /* SYN over the per-source rate */
	REASON_MALFORMED = 4, /* truncated or invalid headers: passed */
	REASON_NON_IP = 5,    /* ARP and other non-IP ethertypes: passed */
	REASON_MAX = 6,
};

/* config.flags */
#define CONFIG_F_MONITOR 1 /* evaluate and count, never drop */

/* Event types in the ring buffer. */
#define EVENT_SYN_RATE 1

#define STOCKADE_AF_INET 4
#define STOCKADE_AF_INET6 6

/* Runtime settings written by the controller (one entry, index 0). */
struct stockade_config {
	__u64 syn_rate;       /* SYNs per second per source; 0 disables */
	__u64 syn_burst;      /* bucket size in SYNs */
	__u32 v6_rate_prefix; /* IPv6 sources are grouped by this prefix */
	__u32 flags;          /* CONFIG_F_* */
	/* Upper bounds on the entries in each trie; 0 lets the program skip
	 * the lookup. The controller raises a count before inserting and
	 * lowers it after deleting, so it is never below the real number. */
	__u32 ban_prefix_v4_count;
	__u32 ban_prefix_v6_count;
	__u32 allow_v4_count;
	__u32 allow_v6_count;
};

struct lpm_v4_key {
	__u32 prefixlen;
	__u8 addr[4];
};

struct lpm_v6_key {
	__u32 prefixlen;
	__u8 addr[16];
};

struct addr_v4 {
	__u8 addr[4];
};

struct addr_v6 {
	__u8 addr[16];
};

/* Value of every ban entry, exact or prefix. */
struct ban_value {
	__u64 expires_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns); 0 = permanent */
	__u64 packets;    /* hits, updated atomically */
	__u64 bytes;
};

struct allow_value {
	__u64 packets;
	__u64 bytes;
};

/* Per-source SYN token bucket key: the IPv4 address, or the IPv6 address
 * masked to the configured prefix. */
struct rate_key {
	__u32 family; /* STOCKADE_AF_* */
	__u8 addr[16];
};

struct rate_bucket {
	__u64 tokens_nano;    /* tokens x 1e9, so a refill needs no division */
	__u64 last_ns;        /* last refill */
	__u64 last_report_ns; /* last event sent to user space */
	__u64 dropped;        /* SYNs dropped from this source */
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

/* Ring-buffer event: at most one per source per second. */
struct rate_event {
	__u32 type; /* EVENT_* */
	__u32 family;
	__u8 addr[16];
	__u64 dropped; /* SYNs dropped from this source so far */
	__u64 ts_ns;
};

/* Maps. Only the ring buffer is not pinned: it belongs to one load. */
BPF_TABLE_PINNED("array", u32, struct stockade_config, config, 1, PIN_DIR "/config");
/* counters[slot * REASON_MAX + reason], slot = ingress_ifindex % IF_SLOTS. */
BPF_TABLE_PINNED("percpu_array", u32, struct counter, counters, IF_SLOTS * REASON_MAX,
		 PIN_DIR "/counters");
/* events_lost[0]: ring-buffer reservations that failed. */
BPF_TABLE_PINNED("percpu_array", u32, u64, events_lost, 1, PIN_DIR "/events_lost");
BPF_TABLE_PINNED("hash", struct addr_v4, struct ban_value, ban_v4, MAX_BANS_V4, PIN_DIR "/ban_v4");
BPF_TABLE_PINNED("hash", struct addr_v6, struct ban_value, ban_v6, MAX_BANS_V6, PIN_DIR "/ban_v6");
/* LPM tries must be created with BPF_F_NO_PREALLOC. */
BPF_TABLE_PINNED("lpm_trie", struct lpm_v4_key, struct ban_value, ban_prefix_v4, MAX_PREFIX_BANS,
		 PIN_DIR "/ban_prefix_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6_key, struct ban_value, ban_prefix_v6, MAX_PREFIX_BANS,
		 PIN_DIR "/ban_prefix_v6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v4_key, struct allow_value, allow_v4, MAX_ALLOW,
		 PIN_DIR "/allow_v4", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lpm_v6_key, struct allow_value, allow_v6, MAX_ALLOW,
		 PIN_DIR "/allow_v6", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lru_hash", struct rate_key, struct rate_bucket, syn_buckets, MAX_RATE_SOURCES,
		 PIN_DIR "/syn_buckets");
BPF_RINGBUF_OUTPUT(events, EVENTS_PAGES);

#endif /* STOCKADE_H */
