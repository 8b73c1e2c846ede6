"""Downloads on a machine that may be offline: fail within seconds, never hang."""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator

#: seconds a download may wait on the network before we call the machine offline
DOWNLOAD_TIMEOUT_S = 10


@contextmanager
def fail_fast_when_offline(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Bound every socket operation inside (torchvision's downloads use urllib) to `seconds`."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def reachable(host: str, port: int = 443, seconds: float = 3.0) -> bool:
    """Whether a TCP connection to `host` opens within `seconds` (DNS included).

    Asked before a download whose client retries for a minute when offline
    (huggingface_hub), so that an offline machine gets its one-line error at once.
    """
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=seconds):
            return True
    except OSError:
        return False
