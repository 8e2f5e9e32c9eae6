"""A kill -9 of the OSD under a tap-ctl rbd device, on bluestore (memstore keeps its data only
across a clean stop): the VBD retries until the OSD is back, and what was flushed is there."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import nbd
import pytest
from rbd_helpers import Cluster, start_cluster
from tapctl_helpers import TapCtl, nbd_uri

MiB = 1 << 20


@pytest.fixture(scope="module")
def bluestore(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from start_cluster(tmp_path_factory.mktemp("bluestore"), "bluestore")


def test_a_kill_9_of_the_osd_loses_no_flushed_write_and_reaches_no_client(
    bluestore: Cluster, tapctl: TapCtl, tmp_path: Path
) -> None:
    name = bluestore.create("16M")
    pid = int(tapctl.out("spawn"))
    sock = tapctl.out(
        "open", "-p", str(pid), "-a", f"{bluestore.spec(name)}:rados_osd_op_timeout=2"
    )
    handle = nbd.NBD()
    handle.connect_uri(nbd_uri(sock))
    handle.pwrite(b"\x0a" * 4 * MiB, 0)
    handle.flush()
    errors: list[BaseException] = []

    def write_while_down() -> None:
        try:
            handle.pwrite(b"\x0b" * 4 * MiB, 4 * MiB)
            handle.flush()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=write_while_down)
    bluestore.restart_osd(down=3.0, during=thread.start, sig=signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive() and errors == []
    handle.shutdown()
    exported = bluestore.export(name, tmp_path / "export.raw")
    assert exported[: 8 * MiB] == b"\x0a" * 4 * MiB + b"\x0b" * 4 * MiB
