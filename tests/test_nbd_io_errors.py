"""Image I/O errors reach the client as NBD errors, and the connection lives on.

The errors come from the ``fault:`` layer over a real raw file, served by a
real ``tapdisk serve``; the client is libnbd.
"""

from __future__ import annotations

import nbd
import pytest

MiB = 1 << 20


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x5a" * 4 * MiB)
    return path


def connect(uri: str, *, structured: bool = True) -> nbd.NBD:
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    h.connect_uri(uri)
    return h


@pytest.mark.parametrize("structured", [True, False], ids=["structured", "simple"])
def test_read_error_is_eio_and_the_next_read_works(serve, image, structured):
    served = serve(f"fault:rate=1,count=1,ops=read:raw:{image}")
    h = connect(served.uri(), structured=structured)
    assert h.get_structured_replies_negotiated() == structured
    with pytest.raises(nbd.Error) as info:
        h.pread(4096, 0)
    assert info.value.errno == "EIO"
    assert h.pread(4096, 0) == b"\x5a" * 4096
    h.shutdown()


def test_write_error_keeps_its_errno_and_the_data_is_untouched(serve, image):
    served = serve(f"fault:rate=1,count=1,ops=write,errno=ENOSPC:raw:{image}")
    h = connect(served.uri())
    with pytest.raises(nbd.Error) as info:
        h.pwrite(b"w" * 4096, 0)
    assert info.value.errno == "ENOSPC"
    assert h.pread(4096, 0) == b"\x5a" * 4096
    h.pwrite(b"w" * 4096, 0)
    assert h.pread(4096, 0) == b"w" * 4096
    h.shutdown()


def test_errno_outside_the_nbd_set_becomes_eio(serve, image):
    served = serve(f"fault:rate=1,count=1,ops=flush,errno=ESTALE:raw:{image}")
    h = connect(served.uri())
    with pytest.raises(nbd.Error) as info:
        h.flush()
    assert info.value.errno == "EIO"
    h.flush()
    h.shutdown()


def test_zero_and_trim_errors_are_reported(serve, image):
    served = serve(f"fault:rate=1,count=2,ops=zero+discard,errno=EIO:raw:{image}")
    h = connect(served.uri())
    with pytest.raises(nbd.Error) as info:
        h.zero(4096, 0)
    assert info.value.errno == "EIO"
    h.zero(4096, 0)  # the operation after an episode goes through
    with pytest.raises(nbd.Error) as info:
        h.trim(4096, 8192)
    assert info.value.errno == "EIO"
    assert h.pread(8192, 0) == bytes(4096) + b"\x5a" * 4096
    h.shutdown()
