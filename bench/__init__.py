"""Benchmarks: wrk runs of edgeproxy against HAProxy and nginx, and micro-benchmarks.

`python -m bench.wrk_compare --help` runs the whole-proxy comparison; see
bench/README.md.
"""
