"""[http2] and [listen] h2c: defaults, every key read, and the values refused."""

from __future__ import annotations

import pytest

from proxy.config import ConfigError, loads
from proxy.config_http2 import Http2Config


def test_defaults() -> None:
    """Without [http2]: 100 streams, RFC windows, h2c off."""
    c = loads("")
    assert c.http2 == Http2Config()
    assert c.http2.max_concurrent_streams == 100 and c.http2.initial_window == 65535
    assert c.listen.h2c is False


def test_keys_are_read() -> None:
    """Every key reaches the record; h2c is a [listen] key."""
    c = loads(
        "[listen]\nh2c = true\n[http2]\nmax_concurrent_streams = 7\ninitial_window = 131072\n"
        "connection_window = 2000000\nmax_header_list_size = 8192\nreset_burst = 9\n"
        "reset_rate = 2.5\nflood_burst = 3\nflood_rate = 1\nstall_timeout = 4\n"
        "adaptive_window = false\nmax_window = 4000000\n"
    )
    h = c.http2
    assert c.listen.h2c is True
    assert (h.max_concurrent_streams, h.initial_window, h.connection_window) == (7, 131072, 2000000)
    assert (h.max_header_list_size, h.reset_burst, h.reset_rate) == (8192, 9, 2.5)
    assert (h.flood_burst, h.flood_rate, h.stall_timeout) == (3, 1.0, 4.0)
    assert (h.adaptive_window, h.max_window) == (False, 4000000)


def test_the_adaptive_window_is_on_up_to_16_mib() -> None:
    """By default the windows grow with the measured BDP, up to 16 MiB."""
    h = loads("").http2
    assert h.adaptive_window is True and h.max_window == 16 * 1024 * 1024


@pytest.mark.parametrize(
    "text",
    [
        "[http2]\ninitial_window = 1000\n",  # below 65535: a client may rightly overrun it
        "[http2]\nconnection_window = 2147483648\n",  # past 2^31-1
        "[http2]\nmax_concurrent_streams = 0\n",
        "[http2]\nmax_window = 65534\n",  # below the RFC's initial window
        "[http2]\nmax_window = 1000000\n",  # below connection_window (1 MiB)
        "[http2]\ninitial_window = 200000\nconnection_window = 65535\nmax_window = 100000\n",
        "[http2]\nmax_window = 2147483648\n",
        '[http2]\nadaptive_window = "yes"\n',
        "[http2]\nmax_header_list_size = 100\n",
        "[http2]\nreset_rate = -1\n",
        "[http2]\nnope = 1\n",
        '[listen]\nh2c = "yes"\n',
    ],
)
def test_bad_values_are_refused(text: str) -> None:
    """Out-of-range windows, zero or negative bounds, unknown keys, a non-boolean h2c."""
    with pytest.raises(ConfigError):
        loads(text)
