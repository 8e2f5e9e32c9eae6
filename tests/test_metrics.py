"""Prometheus metrics: real tapdisk daemons, a real exporter, real clients, real Prometheus.

Every test starts ``tapdisk daemon`` processes in a private control directory, opens
images in them with ``tap-ctl``, does I/O over their NBD sockets with libnbd, and reads
``tapdisk-exporter``'s endpoint over HTTP on 127.0.0.1.  The last test runs Debian's
Prometheus server against the exporter and queries it through its HTTP API while I/O
runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import nbd
import pytest
from helpers import TAPDISK, require, run
from prometheus_client.parser import text_string_to_metric_families

from tapdisk.metrics import check_stats, device_label, errno_label

BIN = Path(sys.executable).parent
EXPORTER = str(BIN / "tapdisk-exporter")
TAPCTL = str(BIN / "tap-ctl")


def wait_for(predicate, timeout: float = 30, what: str = "condition"):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@dataclass
class Daemon:
    """A ``tapdisk daemon`` process and the devices opened in it."""

    proc: subprocess.Popen[bytes]
    directory: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tapctl(self, *args: str) -> str:
        command, *rest = args
        return run(TAPCTL, command, "--control-dir", self.directory, *rest).strip()

    def open(self, spec: str, *flags: str) -> tuple[int, str]:
        """Open ``spec``; (minor, NBD URI)."""
        socket_path = self.tapctl("open", "-p", str(self.pid), "-a", spec, *flags)
        minor = int(socket_path.rpartition(".")[2])
        return minor, f"nbd+unix:///?socket={socket_path}"

    def device(self, minor: int) -> str:
        return f"td{self.pid}.{minor}"


@pytest.fixture
def control_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def daemons(control_dir: Path) -> Iterator[list[Daemon]]:
    """``daemons.append(...)`` is done by ``start_daemon``; all are stopped afterwards."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(30)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()


@pytest.fixture
def start_daemon(daemons: list[Daemon], control_dir: Path):  # type: ignore[no-untyped-def]
    def start() -> Daemon:
        proc = subprocess.Popen(
            [TAPDISK, "daemon", "--control-dir", str(control_dir)], stderr=subprocess.DEVNULL
        )
        daemon = Daemon(proc, control_dir)
        daemons.append(daemon)
        wait_for((control_dir / f"ctl{proc.pid}").exists, what="the control socket")
        return daemon

    return start


@dataclass
class Exporter:
    proc: subprocess.Popen[str]
    url: str

    @property
    def address(self) -> str:
        return urllib.parse.urlsplit(self.url).netloc

    def text(self) -> str:
        with urllib.request.urlopen(self.url, timeout=30) as response:
            return response.read().decode()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels): value} of one scrape."""
        samples = {}
        for family in text_string_to_metric_families(self.text()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples


def start_exporter(*args: str) -> Exporter:
    proc = subprocess.Popen(
        [EXPORTER, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url:
        proc.wait(30)
        raise AssertionError(f"tapdisk-exporter did not start: {proc.stderr.read()}")  # type: ignore[union-attr]
    return Exporter(proc, url)


@pytest.fixture
def exporter(control_dir: Path) -> Iterator[Exporter]:
    started = start_exporter("--control-dir", str(control_dir), "--metrics-listen", "127.0.0.1:0")
    yield started
    started.proc.send_signal(signal.SIGTERM)
    started.proc.communicate(timeout=30)


def value(samples, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    return samples[(name, tuple(sorted(labels.items())))]


def series_of(samples, device: str) -> set[str]:  # type: ignore[no-untyped-def]
    return {name for name, labels in samples if ("device", device) in labels}


@contextlib.contextmanager
def client(uri: str) -> Iterator[nbd.NBD]:
    handle = nbd.NBD()
    handle.connect_uri(uri)
    try:
        yield handle
    finally:
        handle.shutdown()


# --- one exporter, real daemons -----------------------------------------------------------


def test_counters_match_the_io_a_client_did(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    minor, uri = daemon.open(f"raw:{raw_image('32M')}")
    with client(uri) as h:
        for i in range(10):
            h.pwrite(b"\xab" * 4096, i * 65536)
        for i in range(7):
            h.pread(8192, i * 65536)
        h.flush()
        h.flush()
        h.trim(65536, 1 << 20)
        h.zero(4096, 2 << 20)
        h.zero(4096, 3 << 20)
    samples = exporter.scrape()
    device = daemon.device(minor)
    assert value(samples, "tapdisk_writes_completed_total", device=device) == 10
    assert value(samples, "tapdisk_reads_completed_total", device=device) == 7
    assert value(samples, "tapdisk_flush_requests_total", device=device) == 2
    assert value(samples, "tapdisk_discards_completed_total", device=device) == 1
    assert value(samples, "tapdisk_write_zeroes_completed_total", device=device) == 2
    assert value(samples, "tapdisk_written_bytes_total", device=device) == 10 * 4096
    assert value(samples, "tapdisk_read_bytes_total", device=device) == 7 * 8192
    assert value(samples, "tapdisk_io_now", device=device) == 0
    assert value(samples, "tapdisk_size_bytes", device=device) == 32 << 20


def test_latency_histogram_counts_every_request(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    minor, uri = daemon.open(f"raw:{raw_image('32M')}")
    with client(uri) as h:
        for i in range(20):
            h.pwrite(b"\1" * 4096, i * 4096)
        h.flush()
    samples = exporter.scrape()
    device = daemon.device(minor)
    buckets = sorted(
        (float(dict(labels)["le"]), v)
        for (name, labels), v in samples.items()
        if name == "tapdisk_request_duration_seconds_bucket" and ("device", device) in labels
    )
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)  # cumulative
    assert buckets[-1] == (float("inf"), 21)
    assert value(samples, "tapdisk_request_duration_seconds_count", device=device) == 21
    assert value(samples, "tapdisk_request_duration_seconds_sum", device=device) > 0


def test_flush_discard_and_write_zeroes_times_are_counted(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    minor, uri = daemon.open(f"raw:{raw_image('32M')}")
    with client(uri) as h:
        h.pwrite(b"\1" * 65536, 0)
        h.flush()
        h.trim(1 << 20, 1 << 20)
        h.zero(1 << 20, 4 << 20)
    samples = exporter.scrape()
    device = daemon.device(minor)
    # Each of these goes through a thread (fdatasync, fallocate): well over a microsecond.
    assert value(samples, "tapdisk_flush_requests_time_seconds_total", device=device) > 0
    assert value(samples, "tapdisk_discard_time_seconds_total", device=device) > 0
    assert value(samples, "tapdisk_write_zeroes_time_seconds_total", device=device) > 0


def test_io_time_counts_overlapping_requests_once(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    # Two flushes that each fail once after 0.5 s (EIO, retried), in flight together.
    spec = f"fault:burst=2,count=1,delay=0.5,ops=flush:raw:{raw_image('32M')}"
    minor, uri = daemon.open(spec)
    device = daemon.device(minor)
    assert value(exporter.scrape(), "tapdisk_io_time_seconds_total", device=device) == 0
    with client(uri) as h:
        pending = {h.aio_flush(), h.aio_flush()}
        while pending:
            h.poll(-1)
            pending = {cookie for cookie in pending if not h.aio_command_completed(cookie)}
    samples = exporter.scrape()
    flush_time = value(samples, "tapdisk_flush_requests_time_seconds_total", device=device)
    io_time = value(samples, "tapdisk_io_time_seconds_total", device=device)
    assert value(samples, "tapdisk_retries_total", device=device) == 2
    assert flush_time >= 1.0  # both waited out the delay
    assert 0.5 <= io_time < 0.75 * flush_time  # busy time, not summed latency
    time.sleep(0.3)
    idle = exporter.scrape()  # an idle device's busy time stands still
    assert value(idle, "tapdisk_io_time_seconds_total", device=device) == io_time


def test_reads_and_writes_merged_are_counted_apart(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    # rate=0 injects nothing but keeps every request off the page-cache shortcut.
    minor, uri = daemon.open(f"fault:rate=0:raw:{raw_image('32M')}")
    device = daemon.device(minor)

    def batch(command: str) -> None:
        commands = []
        for i in range(32):
            commands += ["-c", f"{command} {i * 4096} 4k"]
        run(require("qemu-io"), "-f", "raw", *commands, "-c", "aio_flush", uri)

    batch("aio_write -P 7")
    samples = exporter.scrape()
    writes_merged = value(samples, "tapdisk_writes_merged_total", device=device)
    assert writes_merged > 0
    assert value(samples, "tapdisk_reads_merged_total", device=device) == 0
    batch("aio_read -P 7")
    samples = exporter.scrape()
    assert value(samples, "tapdisk_reads_merged_total", device=device) > 0
    assert value(samples, "tapdisk_writes_merged_total", device=device) == writes_merged
    assert value(samples, "tapdisk_reads_completed_total", device=device) == 32


def test_writes_through_the_page_cache_shortcut_have_a_real_latency(
    start_daemon, raw_image, exporter
):
    daemon = start_daemon()
    minor, uri = daemon.open(f"raw:{raw_image('32M')}")
    with client(uri) as h:
        for i in range(8):
            h.pwrite(b"\x33" * (1 << 20), i << 20)  # copied into the page cache inline
    samples = exporter.scrape()
    device = daemon.device(minor)
    assert value(samples, "tapdisk_writes_completed_total", device=device) == 8
    assert value(samples, "tapdisk_write_time_seconds_total", device=device) > 0
    assert value(samples, "tapdisk_request_duration_seconds_sum", device=device) > 0
    assert value(samples, "tapdisk_io_time_seconds_total", device=device) > 0


def test_device_info_names_format_image_and_read_only(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    path = raw_image("32M")
    minor, _ = daemon.open(f"raw:{path}", "-R")
    labels = {"device": daemon.device(minor), "format": "raw", "image": str(path)}
    samples = exporter.scrape()
    assert value(samples, "tapdisk_device_info", **labels, readonly="true") == 1


def test_errors_are_counted_by_operation_and_errno(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    minor, uri = daemon.open(f"fault:duration=600,errno=ENOSPC,ops=write:raw:{raw_image('32M')}")
    with client(uri) as h:
        for _ in range(3):
            with pytest.raises(nbd.Error):
                h.pwrite(b"\0" * 4096, 0)
        h.pread(4096, 0)
    samples = exporter.scrape()
    device = daemon.device(minor)
    assert value(samples, "tapdisk_errors_total", device=device, op="write", errno="ENOSPC") == 3
    assert value(samples, "tapdisk_retries_total", device=device) == 0  # ENOSPC is final
    assert value(samples, "tapdisk_reads_completed_total", device=device) == 1


def test_transient_errors_are_retried_and_counted(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    minor, uri = daemon.open(f"fault:burst=3,count=1,ops=write:raw:{raw_image('32M')}")
    with client(uri) as h:
        h.pwrite(b"\7" * 4096, 0)  # EIO three times, then it goes through
    samples = exporter.scrape()
    device = daemon.device(minor)
    assert value(samples, "tapdisk_retries_total", device=device) == 3
    assert value(samples, "tapdisk_writes_completed_total", device=device) == 1
    assert not any(name == "tapdisk_errors_total" for name, _ in samples)


def test_pause_and_connections_are_gauges(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    minor, uri = daemon.open(f"raw:{raw_image('32M')}")
    device = daemon.device(minor)
    with client(uri), client(uri):
        samples = exporter.scrape()
        assert value(samples, "tapdisk_nbd_connections", device=device) == 2
        assert value(samples, "tapdisk_paused", device=device) == 0
        daemon.tapctl("pause", "-p", str(daemon.pid), "-m", str(minor))
        assert value(exporter.scrape(), "tapdisk_paused", device=device) == 1
        daemon.tapctl("unpause", "-p", str(daemon.pid), "-m", str(minor))
    samples = exporter.scrape()
    assert value(samples, "tapdisk_paused", device=device) == 0
    assert value(samples, "tapdisk_nbd_connections", device=device) == 0


def test_closed_device_drops_its_series(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    kept, _ = daemon.open(f"raw:{raw_image('32M', name='a.raw')}")
    closed, _ = daemon.open(f"raw:{raw_image('32M', name='b.raw')}")
    assert series_of(exporter.scrape(), daemon.device(closed))
    daemon.tapctl("close", "-p", str(daemon.pid), "-m", str(closed))
    samples = exporter.scrape()
    assert series_of(samples, daemon.device(closed)) == set()
    assert "tapdisk_reads_completed_total" in series_of(samples, daemon.device(kept))


def test_one_endpoint_covers_every_daemon(start_daemon, raw_image, exporter):
    first, second = start_daemon(), start_daemon()
    a, _ = first.open(f"raw:{raw_image('32M', name='a.raw')}")
    b, _ = second.open(f"raw:{raw_image('32M', name='b.raw')}")
    samples = exporter.scrape()
    assert value(samples, "tapdisk_daemons") == 2
    assert series_of(samples, first.device(a))
    assert series_of(samples, second.device(b))
    first.proc.send_signal(signal.SIGTERM)
    first.proc.wait(30)
    samples = exporter.scrape()
    assert value(samples, "tapdisk_daemons") == 1
    assert series_of(samples, first.device(a)) == set()


def test_stale_control_socket_is_counted_and_does_not_break_the_scrape(
    start_daemon, raw_image, control_dir, exporter
):
    daemon = start_daemon()
    minor, _ = daemon.open(f"raw:{raw_image('32M')}")
    # A daemon killed with SIGKILL leaves its socket file behind: connecting is refused.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(control_dir / "ctl999999"))
    samples = exporter.scrape()
    assert value(samples, "tapdisk_daemon_scrape_failures") == 1
    assert value(samples, "tapdisk_daemons") == 1
    assert series_of(samples, daemon.device(minor))


def test_hung_daemon_costs_the_scrape_only_its_timeout(start_daemon, raw_image, control_dir):
    healthy, hung = start_daemon(), start_daemon()
    minor, _ = healthy.open(f"raw:{raw_image('32M')}")
    started = start_exporter(
        "--control-dir", str(control_dir), "--metrics-listen", "127.0.0.1:0",
        "--scrape-timeout", "0.5",
    )  # fmt: skip
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        begin = time.monotonic()
        samples = started.scrape()
        took = time.monotonic() - begin
    finally:
        os.kill(hung.pid, signal.SIGCONT)
        started.proc.send_signal(signal.SIGTERM)
        started.proc.communicate(timeout=30)
    assert took < 5
    assert value(samples, "tapdisk_daemon_scrape_failures") == 1
    assert value(samples, "tapdisk_daemons") == 1
    assert series_of(samples, healthy.device(minor))


def test_build_info_names_the_version(exporter):
    from tapdisk import __version__

    samples = exporter.scrape()
    (labels,) = [dict(labels) for name, labels in samples if name == "tapdisk_build_info"]
    assert labels["version"] == __version__


def test_promtool_check_metrics_is_clean(start_daemon, raw_image, exporter):
    daemon = start_daemon()
    _, uri = daemon.open(f"fault:duration=600,errno=ENOSPC,ops=flush:raw:{raw_image('32M')}")
    with client(uri) as h:
        h.pwrite(b"\1" * 4096, 0)
        with pytest.raises(nbd.Error):
            h.flush()
    result = subprocess.run(
        [require("promtool"), "check", "metrics"],
        input=exporter.text(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert result.stdout + result.stderr == ""


def test_exporter_flags_override_the_configuration_file(tmp_path, start_daemon, raw_image):
    daemon = start_daemon()
    minor, _ = daemon.open(f"raw:{raw_image('32M')}")
    config = tmp_path / "tapdisk.yaml"
    config.write_text("control_dir: /nonexistent/tapdisk\nmetrics_listen: 127.0.0.1:0\n")
    started = start_exporter("--config", str(config), "--control-dir", str(daemon.directory))
    try:
        assert series_of(started.scrape(), daemon.device(minor))
    finally:
        started.proc.send_signal(signal.SIGTERM)
        _, err = started.proc.communicate(timeout=30)
    assert started.proc.returncode == 0, err


def test_invalid_configuration_stops_the_exporter_naming_key_and_line(tmp_path):
    config = tmp_path / "tapdisk.yaml"
    config.write_text("log_level: info\nmetrics_listen: 9847\n")
    proc = subprocess.run(
        [EXPORTER, "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1
    assert f"{config}: line 2: metrics_listen: expected HOST:PORT" in proc.stderr


def test_stats_of_another_shape_are_refused_naming_the_field(start_daemon, raw_image):
    daemon = start_daemon()
    minor, _ = daemon.open(f"raw:{raw_image('32M')}")
    stats = json.loads(daemon.tapctl("stats", "-p", str(daemon.pid), "-m", str(minor)))["vbd"]
    check_stats(stats)  # what a daemon really answers passes
    with pytest.raises(ValueError, match="stats lack reads"):
        check_stats({k: v for k, v in stats.items() if k != "reads"})
    with pytest.raises(ValueError, match="'bytes_read' is '12', not a number"):
        check_stats({**stats, "bytes_read": "12"})
    with pytest.raises(ValueError, match="'latency_us' is malformed"):
        check_stats({**stats, "latency_us": {**stats["latency_us"], "buckets": []}})
    with pytest.raises(ValueError, match="'errors' is malformed"):
        check_stats({**stats, "errors": [{"op": "read", "count": 1}]})


def test_device_label_is_the_kernel_device_once_attached():
    assert device_label({"pid": 12, "minor": 3, "device": "/dev/nbd7"}) == "nbd7"
    assert device_label({"pid": 12, "minor": 3, "device": None}) == "td12.3"


def test_errno_label_set_is_bounded():
    assert errno_label("EIO") == "EIO"
    assert errno_label("ENOSPC") == "ENOSPC"
    assert errno_label("ECHILD") == "other"


def test_exporter_help_has_examples():
    text = run(EXPORTER, "--help")
    assert "examples:" in text
    assert "examples:" in run(TAPDISK, "exporter", "--help")


# --- a real Prometheus server -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Prometheus:
    proc: subprocess.Popen[bytes]
    base: str
    log: Path

    def query(self, expr: str) -> list[dict]:  # type: ignore[type-arg]
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=30) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture
def prometheus(tmp_path: Path, exporter: Exporter) -> Iterator[Prometheus]:
    binary = require("prometheus")
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        f"  - job_name: tapdisk\n    static_configs: [{{targets: ['{exporter.address}']}}]\n"
    )
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(proc, f"http://127.0.0.1:{port}", log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {log.read_text()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(f"{server.base}/-/ready", timeout=5) as response,
        ):
            return response.status == 200
        return False

    wait_for(ready, 60, "prometheus to be ready")
    yield server
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    shutil.rmtree(tmp_path / "tsdb", ignore_errors=True)


@dataclass
class Load:
    """Writes and reads through libnbd in a thread until stopped, counting them."""

    uri: str
    writes: int = 0
    reads: int = 0
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with client(self.uri) as h:
            block = b"\x5a" * 65536
            while not self.stop.is_set():
                offset = (self.writes % 256) * 65536
                h.pwrite(block, offset)
                self.writes += 1
                assert h.pread(65536, offset) == block
                self.reads += 1
                time.sleep(0.002)


def test_prometheus_scrapes_the_exporter_while_io_runs(start_daemon, raw_image, prometheus):
    daemon = start_daemon()
    minor, uri = daemon.open(f"raw:{raw_image('32M')}")
    device = daemon.device(minor)
    load = Load(uri)
    worker = threading.Thread(target=load.run)
    worker.start()
    try:
        wait_for(
            lambda: prometheus.scalar('up{job="tapdisk"}') == 1, 60, "the first scrape to succeed"
        )
        selector = f'{{device="{device}"}}'
        rate = f"rate(tapdisk_writes_completed_total{selector}[5s])"
        assert wait_for(lambda: (prometheus.scalar(rate) or 0) > 0, 60, "a write rate") > 0
        first = prometheus.scalar(f"tapdisk_written_bytes_total{selector}")
        wait_for(
            lambda: prometheus.scalar(f"tapdisk_written_bytes_total{selector}") > first,
            30,
            "the byte counter to grow between scrapes",
        )
        p99 = "histogram_quantile(0.99, sum by (le) "
        p99 += f"(rate(tapdisk_request_duration_seconds_bucket{selector}[5s])))"
        assert wait_for(lambda: prometheus.scalar(p99) is not None, 30, "a latency quantile")
        info = prometheus.query(f"tapdisk_device_info{selector}")
        assert info[0]["metric"]["format"] == "raw"
        assert prometheus.query(f"tapdisk_io_now{selector}")
    finally:
        load.stop.set()
        worker.join(60)
    # Once the load stops, Prometheus converges on exactly what the client did.
    for metric, expected in (
        ("tapdisk_writes_completed_total", load.writes),
        ("tapdisk_reads_completed_total", load.reads),
    ):
        query = f"{metric}{{device={device!r}}}".replace("'", '"')
        wait_for(
            lambda q=query, e=expected: prometheus.scalar(q) == e, 30, f"{metric} == {expected}"
        )
