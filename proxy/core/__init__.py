"""The sans-io core: HTTP/1 heads and requests, the router. Bytes and values in, values out.

No sockets, no event loop, no clock reads (callers pass `now`); nothing of
proxy.worker or proxy.master (checked by the import contract in setup.cfg).
"""
