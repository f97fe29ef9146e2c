"""Benchmarks: scripts a user runs (`python -m benchmarks.<name>`); each prints a table and writes JSON
under benchmarks/results/. RESULTS.md summarises the latest runs and the machine they ran on."""
