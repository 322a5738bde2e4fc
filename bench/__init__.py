"""``make bench``: throughput, latency, fence time and memory of a real dev cluster.

Benchmarks, not tests: nothing here asserts; ``bench/run.py`` writes the numbers and whether
the targets of issue 8 were met to ``bench/results/latest.json`` and plots them.
"""
