"""Benchmarks of stockade's kernel fast path; results in bench/README.md.

- bench.xdp_cost: per-packet cost with BPF_PROG_TEST_RUN, against xdp-filter.
- bench.flood: receiver softirq CPU under a bounded veth flood, against nftables.
- bench.run: both, then the README (`make bench`).
"""
