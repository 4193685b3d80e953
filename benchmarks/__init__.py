"""Reproducible measurements of defer: `python -m benchmarks [--quick]`. See benchmarks/README.md."""
