"""The event loop every tapdisk command runs on: uvloop when installed, else asyncio.

uvloop is imported here, with the daemon, rather than when a loop starts: tapdisks
forked by the spawner then share it with their siblings instead of each loading it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

try:
    import uvloop
except ImportError:
    uvloop = None


def run_loop(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` on uvloop when it is installed, else on plain asyncio."""
    if uvloop is None:
        return asyncio.run(coro)
    return uvloop.run(coro)
