"""The kernel group: tests that drive the real nbd.ko, run inside the kvm-nbd VM.

``tests/kernel/run.sh`` boots one VM for the whole group (``kvm-nbd.sh run``),
which sets ``KVM_NBD_GUEST=1``.  Anywhere else these tests are skipped, so a
plain ``pytest tests`` on a development machine never touches the host's
``/dev/nbd*``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kerneltools import DirectServer

from tapdisk import kernel

IN_GUEST = os.environ.get("KVM_NBD_GUEST") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here not in Path(item.path).parents:
            continue
        item.add_marker(pytest.mark.kernel)
        if not IN_GUEST:
            item.add_marker(
                pytest.mark.skip(
                    reason="needs the real nbd.ko: runs inside the VM via tests/kernel/run.sh"
                )
            )


@pytest.fixture
def nbd_module() -> None:
    """The nbd driver is loaded (the guest's init loads it; a test may have unloaded it)."""
    kernel.ensure_module()


@pytest.fixture
def direct_server(nbd_module: None) -> Iterator[Callable[..., DirectServer]]:
    """Factory: ``direct_server("raw:/path")``; its devices are detached afterwards."""
    started: list[DirectServer] = []

    def factory(spec: str, **options: Any) -> DirectServer:
        server = DirectServer(spec, **options)
        started.append(server)
        return server

    yield factory
    for server in reversed(started):
        server.stop()


#: Measurements ("dd write MB/s"...) printed at the end of the run.
RESULTS: list[str] = []


@pytest.fixture
def report() -> Callable[[str, str], None]:
    """``report(name, value)``: a measurement shown in the terminal summary."""
    return lambda name, value: RESULTS.append(f"{name}: {value}")


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if RESULTS:
        terminalreporter.section("kernel measurements")
        for line in RESULTS:
            terminalreporter.write_line(line)
