"""Shared-memory tables: the routing table (pinger writes, workers read) and the
in-flight counters (master owns, workers count). See shm/writer.py, shm/reader.py
and shm/inflight.py; codecs are pure and live in shm/codec.py and
shm/inflight_codec.py.
"""
