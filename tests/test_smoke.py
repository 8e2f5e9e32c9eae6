"""The smallest end-to-end check: qemu-io reads and writes through tapdisk serve."""

from helpers import require, run


def test_qemu_io_reads_back_what_it_wrote(serve, raw_image):
    image = raw_image("16M", "write -P 0xab 0 1M")
    served = serve(f"raw:{image}")
    out = run(
        require("qemu-io"),
        "-f",
        "raw",
        "-c",
        "read -P 0xab 0 1M",
        "-c",
        "write -P 0x5a 4M 64k",
        "-c",
        "read -P 0x5a 4M 64k",
        served.uri(),
    )
    assert "Pattern verification failed" not in out
    assert served.stop() == 0
    assert not served.socket.exists()
    assert image.read_bytes()[4 << 20 : (4 << 20) + 65536] == b"\x5a" * 65536
