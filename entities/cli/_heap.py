"""The garbage collector of the long-running commands (``entities serve``, ``entities worker``).

What a server or worker allocates while it starts (modules, the registry, the app, connections)
lives as long as the process, yet CPython's cyclic collector walks it again at every full
collection, and with its default threshold (a young collection every 700 allocations) collects
after every few requests. Once started, these commands freeze the start-up heap
(:func:`gc.freeze`: never scanned again) and run the young collection every
:data:`YOUNG_THRESHOLD` allocations. Measured with ``benchmarks/request_response.py`` on this
project's 2-core machine: 5-15% more messages per second on SQLite and PostgreSQL, one-way and
request-response, and no full collection of the whole heap (tens of ms each) every few hundred
messages. ``ENTITIES_GC=default`` keeps CPython's settings.
"""

from __future__ import annotations

import gc
import logging
import os

__all__ = ["YOUNG_THRESHOLD", "settle_heap"]

logger = logging.getLogger("entities")

YOUNG_THRESHOLD = 10_000
_OLDER_THRESHOLDS = (20, 20)


def settle_heap() -> bool:
    """Collect once, freeze what is left and raise the young generation's threshold, unless
    ``ENTITIES_GC`` is ``default``. Returns whether it did. Raises nothing."""
    if os.environ.get("ENTITIES_GC", "").strip().lower() == "default":
        return False
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, *_OLDER_THRESHOLDS)
    logger.debug("froze %d start-up objects", gc.get_freeze_count())
    return True
