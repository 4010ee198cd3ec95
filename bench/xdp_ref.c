/* xdp_ref.c - reference XDP programs that put stockade's numbers in scale.
 *
 * Not part of stockade. bench.xdp_cost runs the first two with
 * BPF_PROG_TEST_RUN to show the harness's own cost per run and what one
 * clock read adds to it; bench.flood attaches the third to show what XDP
 * itself costs on a veth, apart from the work stockade's program does.
 */
#include <uapi/linux/bpf.h>

/* The floor: the test-run loop around a program that does nothing. */
int xdp_ref_pass(struct xdp_md *ctx)
{
	return XDP_PASS;
}

/* The clock read stockade's program does for every IP packet. */
int xdp_ref_clock(struct xdp_md *ctx)
{
	bpf_ktime_get_ns();
	return XDP_PASS;
}

/* The cheapest drop. */
int xdp_ref_drop(struct xdp_md *ctx)
{
	return XDP_DROP;
}
