"""edgeproxy: the proxy master and its workers."""

from importlib.util import find_spec

__version__ = "0.1.0"


def compiled() -> bool:
    """Whether the request path runs as mypyc-compiled C (setup.py) or as Python."""
    spec = find_spec("proxy.worker.client")
    return spec is not None and bool(spec.origin) and not str(spec.origin).endswith(".py")


def build() -> str:
    """How this copy was built, as `edgeproxy --version` and status show it."""
    return "request path compiled (mypyc)" if compiled() else "pure Python"
