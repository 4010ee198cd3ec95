"""Throwaway network-namespace lab for tests, the demo and benchmarks."""
