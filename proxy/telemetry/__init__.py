"""Counters and their exposition: per-worker stats blocks and the Prometheus text."""
