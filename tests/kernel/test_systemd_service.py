"""``tapdisk service`` (what tapdisk.service runs) against the real nbd.ko.

The configured devices are attached at start, ``READY=1`` reaches the notify socket only
after both are usable, the exporter labels them by their ``/dev/nbdN``, and SIGTERM (what
``systemctl stop`` sends) detaches them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from kerneltools import sh
from prometheus_client.parser import text_string_to_metric_families

from tapdisk import kernel

MiB = 1 << 20
BIN = Path(sys.executable).parent


def read_device(path: str, length: int) -> bytes:
    with open(path, "rb", buffering=0) as device:
        return device.read(length)


def test_service_attaches_configured_devices_reports_ready_and_detaches_on_stop(
    nbd_module, tmp_path
):
    raw = tmp_path / "data.raw"
    sh("qemu-img", "create", "-q", "-f", "raw", raw, str(32 * MiB))
    sh("qemu-io", "-f", "raw", "-c", "write -P 0xab 0 1M", raw)
    base = tmp_path / "base.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", base, str(16 * MiB))
    config = tmp_path / "tapdisk.yaml"
    config.write_text(
        f"devices:\n  - {{spec: 'raw:{raw}', device: 5}}\n"
        f"  - {{spec: 'qcow2:{base}', read_only: true}}\n"
    )
    run_dir = tmp_path / "run"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(tmp_path / "notify"))
        notify.settimeout(300)
        service = subprocess.Popen(
            [BIN / "tapdisk", "service", "--config", config, "--control-dir", run_dir],
            env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify")},
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while True:
                message = dict(
                    line.split("=", 1) for line in notify.recv(4096).decode().splitlines()
                )
                if "READY" in message:
                    break
            assert message["STATUS"] == "2 devices attached"
            assert message["MAINPID"] == str(service.pid)

            listing = json.loads(sh(BIN / "tap-ctl", "list", "--control-dir", run_dir, "--json"))
            devices = {row["spec"]: row["device"] for row in listing["tapdisks"]}
            assert devices[f"raw:{raw}"] == "/dev/nbd5"
            other = devices[f"qcow2:{base}"]
            other_index = int(other.removeprefix("/dev/nbd"))
            assert kernel.status(5) == {5: True}
            assert read_device("/dev/nbd5", MiB) == b"\xab" * MiB
            assert Path(f"/sys/block/nbd{other_index}/ro").read_text().strip() == "1"

            exporter = subprocess.Popen(
                [BIN / "tapdisk-exporter", "--control-dir", run_dir],
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                assert exporter.stdout is not None
                url = exporter.stdout.readline().strip()
                with urllib.request.urlopen(url, timeout=60) as response:
                    text = response.read().decode()
            finally:
                exporter.send_signal(signal.SIGTERM)
                exporter.wait(60)
            info = {
                sample.labels["device"]: sample.labels
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "tapdisk_device_info"
            }
            assert info["nbd5"]["image"] == str(raw)
            assert info[f"nbd{other_index}"]["readonly"] == "true"
        finally:
            service.send_signal(signal.SIGTERM)
            _, err = service.communicate(timeout=300)
    assert service.returncode == 0, err
    assert kernel.status(5) == {5: False}
    assert kernel.status(other_index) == {other_index: False}
