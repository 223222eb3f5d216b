"""The cluster store's errors: what a backend raises inside the pinger (never beyond it)."""

from __future__ import annotations


class StoreError(Exception):
    """The store could not be reached or refused a request (never escapes the daemon API)."""


class SessionLostError(StoreError):
    """Our lease / session is gone (expired or revoked): re-create it."""
