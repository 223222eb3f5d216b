"""edgeproxy: the proxy master and its workers."""

__version__ = "0.1.0"
