"""The control-socket client against stand-in daemons: discovery, timeouts and every failure."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tapdisk.ctl.client import CallError, Client, DaemonGone, daemon_pids
from tapdisk.ctl.protocol import Decoder, Response, encode

PID = 4242


def test_daemon_pids_are_the_ctl_sockets_in_pid_order(tmp_path):
    for name in ("ctl300", "ctl7", "ctl", "ctlx1", "nbd7.0", "ctl12.old", "ctl\u0663"):
        (tmp_path / name).touch()
    assert daemon_pids(str(tmp_path)) == [7, 300]


def test_daemon_pids_of_a_directory_with_glob_characters(tmp_path):
    directory = tmp_path / "run[1]*"
    directory.mkdir()
    (directory / "ctl5").touch()
    assert daemon_pids(str(directory)) == [5]


def test_a_missing_socket_means_the_daemon_is_gone(tmp_path):
    with pytest.raises(DaemonGone, match=f"no tapdisk with pid {PID}"):
        Client.connect(str(tmp_path), PID)


def test_a_socket_nobody_listens_on_is_an_error_but_not_gone(tmp_path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(tmp_path / f"ctl{PID}"))
        with pytest.raises(CallError, match="Connection refused") as info:
            Client.connect(str(tmp_path), PID)
    assert not isinstance(info.value, DaemonGone)


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[Callable[[Callable[[bytes], bytes | None]], str]]:
    """Serve one connection on ``ctl<PID>``: ``answer(request bytes)`` -> reply (None: hang)."""
    threads = []
    release = threading.Event()

    def start(answer: Callable[[bytes], bytes | None]) -> str:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(tmp_path / f"ctl{PID}"))
        listener.listen()

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, listener:
                decoder, messages = Decoder(), []
                while not messages:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    messages = decoder.feed(data)
                reply = answer(messages[0])
                if reply is None:
                    release.wait(10)
                else:
                    conn.sendall(reply)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return str(tmp_path)

    yield start
    release.set()
    for thread in threads:
        thread.join(10)


def test_call_returns_the_result_and_leaves_out_none_arguments(fake_daemon):
    seen = []

    def answer(request):
        seen.append(request)
        return encode(Response.success(request["id"], {"pid": PID}))

    with Client.connect(fake_daemon(answer), PID) as client:
        assert client.call("stats", minor=None) == {"pid": PID}
    assert seen == [{"id": 1, "op": "stats", "args": {}}]


def test_a_refusal_raises_the_daemons_message(fake_daemon):
    def answer(request):
        return encode(Response.failure(request["id"], "not-found", "no minor 7"))

    with Client.connect(fake_daemon(answer), PID) as client, pytest.raises(CallError) as info:
        client.call("stats", minor=7)
    assert str(info.value) == "no minor 7"


def test_a_daemon_that_hangs_up_without_answering_is_an_error(fake_daemon):
    client = Client.connect(fake_daemon(lambda request: b""), PID)
    with client, pytest.raises(CallError, match=f"tapdisk {PID} closed the control connection"):
        client.call("list")


def test_a_malformed_answer_is_a_bad_response(fake_daemon):
    client = Client.connect(fake_daemon(lambda request: encode({"id": 1})), PID)
    with client, pytest.raises(CallError, match=f"tapdisk {PID} sent a bad response: field 'ok'"):
        client.call("list")


def test_a_daemon_that_never_answers_costs_only_the_timeout(fake_daemon):
    client = Client.connect(fake_daemon(lambda request: None), PID, timeout=0.3)
    begin = time.monotonic()
    with client, pytest.raises(CallError, match=f"tapdisk {PID} did not answer stats in time"):
        client.call("stats")
    assert time.monotonic() - begin < 2
