"""The YAML configuration: validation errors name the key and its line; flags override."""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import nbd
import pytest
from helpers import TAPDISK, run

from tapdisk.config import (
    DEVICE_SCHEMA,
    SCHEMA,
    Config,
    ConfigError,
    DeviceEntry,
    add_arguments,
    from_arguments,
    load,
    parse,
    parse_host_port,
)

FULL = """\
retry_deadline: 30
queue_depth: 64
merge_size: 512KiB
control_dir: /run/td
allowed_dirs: [/srv/images, /var/lib/tapdisk/]
metrics_listen: "[::1]:9999"
log_level: DEBUG
devices:
  - spec: qcow2:/srv/images/a.qcow2
    device: 3
  - spec: raw:/srv/images/b.img
    read_only: true
"""


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(textwrap.dedent(text), "t.yaml")
    return str(info.value)


def test_empty_file_gives_the_defaults():
    assert parse("", "t.yaml") == Config()
    assert parse("# nothing but a comment\n", "t.yaml") == Config()


def test_every_key_is_parsed():
    config = parse(FULL, "t.yaml")
    assert config == Config(
        retry_deadline=30.0,
        queue_depth=64,
        merge_size=512 << 10,
        control_dir="/run/td",
        allowed_dirs=("/srv/images", "/var/lib/tapdisk"),
        metrics_listen=("::1", 9999),
        log_level="debug",
        devices=(
            DeviceEntry("qcow2:/srv/images/a.qcow2", device=3),
            DeviceEntry("raw:/srv/images/b.img", read_only=True),
        ),
    )


def test_unknown_key_names_the_key_and_its_line():
    message = error_of(
        """\
        queue_depth: 8
        retry_dedline: 5
        """
    )
    assert message.startswith("t.yaml: line 2: retry_dedline: unknown key")
    assert "retry_deadline" in message  # the known keys are listed


def test_wrong_type_names_the_key_and_its_line():
    message = error_of(
        """\
        log_level: info

        queue_depth: many
        """
    )
    assert message == "t.yaml: line 3: queue_depth: expected an integer, got 'many'"


def test_bool_is_not_accepted_as_a_number():
    assert "line 1: retry_deadline: expected a number" in error_of("retry_deadline: yes\n")


def test_bad_value_names_the_key_and_its_line():
    message = error_of("log_level: info\nmerge_size: 3MB\nqueue_depth: 0\n")
    assert message == "t.yaml: line 3: queue_depth: must be between 1 and 65536, got 0"


def test_bad_value_in_a_list_names_the_line_of_the_value():
    message = error_of(
        """\
        allowed_dirs:
          - /srv
          - relative/dir
        """
    )
    assert message.startswith("t.yaml: line 3: allowed_dirs[1]: must be an absolute path")


def test_unknown_key_in_a_device_names_its_path_and_line():
    message = error_of(
        """\
        devices:
          - spec: raw:/srv/a.img
          - spec: raw:/srv/b.img
            readonly: true
        """
    )
    assert message.startswith("t.yaml: line 4: devices[1].readonly: unknown key")
    assert "read_only" in message


def test_device_with_unknown_image_type_is_refused():
    message = error_of("devices:\n  - spec: floppy:/srv/a.img\n")
    assert message.startswith("t.yaml: line 2: devices[0].spec: unknown image type 'floppy'")


def test_device_with_relative_image_path_is_refused():
    message = error_of("devices:\n  - {spec: 'raw:a.img'}\n")
    assert message.startswith("t.yaml: line 2: devices[0].spec: the image path must be absolute")


def test_device_without_spec_is_refused():
    message = error_of("devices:\n  - read_only: true\n")
    assert message == "t.yaml: line 2: devices[0]: missing the required key spec"


def test_device_outside_the_allowed_dirs_is_refused():
    message = error_of(
        """\
        allowed_dirs: [/srv/images]
        devices:
          - spec: raw:/srv/images/a.img
          - spec: raw:/srv/images-old/b.img
        """
    )
    assert message.startswith("t.yaml: line 4: devices[1].spec: image is outside every")


def test_device_index_used_twice_is_refused():
    message = error_of(
        """\
        devices:
          - {spec: "raw:/a.img", device: 2}
          - {spec: "raw:/b.img", device: 2}
        """
    )
    assert message == "t.yaml: line 3: devices[1].device: nbd2 is already used on line 2"


def test_key_given_twice_is_refused():
    message = error_of("queue_depth: 8\nlog_level: info\nqueue_depth: 9\n")
    assert message == "t.yaml: line 3: queue_depth: given twice (first on line 1)"


def test_yaml_syntax_error_names_the_line():
    message = error_of("queue_depth: 8\ndevices: [\n  - x\n")
    assert message.startswith("t.yaml: line ")
    assert "not valid YAML" in message


def test_top_level_must_be_a_mapping():
    assert error_of("- a\n- b\n").startswith("t.yaml: line 1: top level: expected a mapping")


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("4096", 4096), ("64K", 64 << 10), ("64KiB", 64 << 10), ("2M", 2 << 20)],
)
def test_merge_size_accepts_sizes_with_units(text, size):
    assert parse(f"merge_size: {text}\n").merge_size == size


def test_merge_size_out_of_range_is_refused():
    assert "merge_size: must be 0 (no merging) or from 4KiB to 32MiB" in error_of(
        "merge_size: 1G\n"
    )


def test_missing_default_file_means_defaults(monkeypatch, tmp_path):
    monkeypatch.setattr("tapdisk.config.DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    assert load(None) == Config()


def test_missing_named_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"absent\.yaml: cannot read the configuration"):
        load(str(tmp_path / "absent.yaml"))


def test_file_that_is_not_utf8_is_an_error(tmp_path):
    path = tmp_path / "bin.yaml"
    path.write_bytes(b"log_level: \xff\xfe\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load(str(path))


def parser_for(keys):
    parser = argparse.ArgumentParser(prog="t", exit_on_error=False)
    add_arguments(parser, keys=keys)
    return parser


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "tapdisk.yaml"
    path.write_text(FULL)
    keys = ["retry_deadline", "queue_depth", "merge_size", "control_dir", "metrics_listen"]
    args = parser_for(keys).parse_args(
        ["--config", str(path), "-t", "7.5", "--queue-depth", "4", "--metrics-listen", ":80"]
    )
    config = from_arguments(args, keys)
    assert (config.retry_deadline, config.queue_depth) == (7.5, 4)
    assert config.metrics_listen == ("127.0.0.1", 80)
    # What no flag names still comes from the file.
    assert config.merge_size == 512 << 10
    assert config.control_dir == "/run/td"
    assert len(config.devices) == 2


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9847", ("127.0.0.1", 9847)),
        ("example.org:80", ("example.org", 80)),
        ("[::1]:10809", ("::1", 10809)),
        ("[::]:0", ("::", 0)),
        (":65535", ("127.0.0.1", 65535)),
        ("0.0.0.0:0080", ("0.0.0.0", 80)),
    ],
)
def test_host_port_accepts_ipv4_ipv6_names_and_an_empty_host(text, address):
    assert parse_host_port(text) == address


@pytest.mark.parametrize(
    "value",
    ["9847", "127.0.0.1", "127.0.0.1:", "h:65536", "h:-1", "h:+80", "h:8 0", "h:\u0663", 9847],
)
def test_host_port_refuses_anything_else(value):
    with pytest.raises(ValueError, match=r"expected HOST:PORT or \[IPV6\]:PORT"):
        parse_host_port(value)


def test_flag_values_are_validated_like_the_file():
    parser = parser_for(["queue_depth"])
    with pytest.raises(argparse.ArgumentError, match="must be between 1 and 65536"):
        parser.parse_args(["--queue-depth", "0"])
    with pytest.raises(argparse.ArgumentError, match="expected a number"):
        parser.parse_args(["--queue-depth", "lots"])


def test_readme_documents_every_key_with_its_default():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.partition("## Configuration")[2].partition("\n## ")[0]
    assert section, "README.md has no Configuration section"
    for key in [*SCHEMA, "devices", *DEVICE_SCHEMA]:
        assert f"`{key}`" in section, f"README does not document {key}"


def test_readme_example_is_a_valid_configuration():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.partition("## Configuration")[2]
    example = section.partition("```yaml\n")[2].partition("```")[0]
    config = parse(example, "README.md")
    assert [d.device for d in config.devices] == [0, None]


# --- the configuration in real tapdisk daemons -----------------------------------------


def failing_write_takes(tmp_path: Path, config: str, *flags: str) -> float:
    """Seconds a write to an always-failing (EIO) disk takes to fail in a real daemon
    started with ``--config`` holding ``config`` and ``flags``."""
    path = tmp_path / "tapdisk.yaml"
    path.write_text(config)
    directory = tmp_path / "run"
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    daemon = subprocess.Popen(
        [TAPDISK, "daemon", "--config", str(path), "--control-dir", str(directory), *flags],
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (directory / f"ctl{daemon.pid}").exists():
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        tapctl = Path(sys.executable).with_name("tap-ctl")
        spec = f"fault:duration=600,ops=write:raw:{image}"
        opened = run(tapctl, "open", "--control-dir", directory, "-p", str(daemon.pid), "-a", spec)
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///?socket={opened.strip()}")
        start = time.monotonic()
        with pytest.raises(nbd.Error, match="EIO"):
            h.pwrite(bytes(4096), 0)
        took = time.monotonic() - start
        h.shutdown()
        return took
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)


def test_daemon_takes_the_retry_deadline_from_the_configuration(tmp_path):
    assert 0.9 < failing_write_takes(tmp_path, "retry_deadline: 1\n") < 10


def test_daemon_flag_overrides_the_configured_retry_deadline(tmp_path):
    assert 0.9 < failing_write_takes(tmp_path, "retry_deadline: 600\n", "--timeout", "1") < 10


def test_daemon_with_an_invalid_configuration_exits_naming_key_and_line(tmp_path):
    path = tmp_path / "tapdisk.yaml"
    path.write_text("log_level: info\nqueue_depth: -3\n")
    proc = subprocess.run(
        [TAPDISK, "daemon", "--config", str(path), "--control-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert f"{path}: line 2: queue_depth: must be between 1 and 65536, got -3" in proc.stderr


def test_busy_poll_from_the_file_and_its_flag(tmp_path):
    assert parse("busy_poll: 0\n").busy_poll == 0
    assert parse("busy_poll: 200\n").busy_poll == 200
    assert "busy_poll: must be between 0 and 10000, got 20000" in error_of("busy_poll: 20000\n")
    assert "busy_poll: expected an integer, got 'fast'" in error_of("busy_poll: fast\n")
    path = tmp_path / "tapdisk.yaml"
    path.write_text("busy_poll: 200\n")
    args = parser_for(["busy_poll"]).parse_args(["--config", str(path), "--busy-poll", "0"])
    assert from_arguments(args, ["busy_poll"]).busy_poll == 0
