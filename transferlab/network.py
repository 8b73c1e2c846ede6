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
