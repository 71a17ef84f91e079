"""The process's file-descriptor limit, which bounds how many connections it can hold.

Every connection is a descriptor; so are the listening socket, the database, log files and the
engines' files. A process at its limit can accept nothing, not even a health probe. So the server
raises its soft limit to the hard one at start (the soft limit is often 1 024 while the hard one
is far higher), then keeps its connections a margin below the limit (`connection_cap`).
"""

from __future__ import annotations

import logging
import resource

logger = logging.getLogger(__name__)

#: Never ask for more than this many, even when the hard limit is "unlimited" (the kernel's
#: `nr_open` caps it anyway, and a soft limit above it is refused).
_CEILING = 1 << 20
#: Descriptors kept for what is not a connection (database, logs, engine files, the listener).
MIN_RESERVE = 128


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in effect."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _CEILING if hard == resource.RLIM_INFINITY else min(hard, _CEILING)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            logger.warning("could not raise the descriptor limit from %d to %d", soft, target)
    return _CEILING if soft == resource.RLIM_INFINITY else soft


def connection_cap(descriptors: int, configured: int | None = None) -> int:
    """How many connections to hold at once: `configured` (None: as many as fit), never more than
    the descriptor limit less a reserve of an eighth (at least `MIN_RESERVE`).

    The guarded protocol makes room for a new connection as it is accepted, inside the accept loop
    (measured: a burst of 2 000 pending connections, accepted at once at a limit of 1 024, left the
    process at 910 descriptors and /healthz answering), so uvicorn's listen backlog can stay as is."""
    ceiling = max(16, descriptors - max(MIN_RESERVE, descriptors // 8))
    return min(configured or ceiling, ceiling)
