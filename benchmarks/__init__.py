"""Benchmarks of the caching methods on the pack's trained reference DiT (see README, Benchmark)."""
