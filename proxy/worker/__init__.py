"""The data plane: a worker process's I/O shells around the core (`python -m proxy.worker`).

Client and upstream protocols, the exchange between them, routing with its
admission, write batching and splicing. Nothing of proxy.master.
"""
