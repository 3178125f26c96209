"""Helpers of `benchmarks/probe_vs_finetune.py`: data subsets, the methods, the seed comparison, the report."""
