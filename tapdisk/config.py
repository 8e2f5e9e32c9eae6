"""The tapdisk configuration file (YAML) and the command-line flags that override it.

One file, ``/etc/tapdisk/tapdisk.yaml`` by default, holds the host-wide settings and
the devices to attach at boot::

    retry_deadline: 120          # seconds a failing request is retried
    queue_depth: 256             # requests queued or in flight per device
    merge_size: 1MiB             # largest merged request; 0 = no merging
    busy_poll: 50                # microseconds to spin for the next request; 0 = never
    control_dir: /run/blktap-control   # control and NBD sockets, minors (blktap's layout)
    allowed_dirs: [/var/lib/tapdisk]
    remote_backing: false        # true: qcow2/qcow backing files may be NBD URIs
    remote_images: false         # true: with allowed_dirs, nbd: specs may name TCP exports
    metrics_listen: 127.0.0.1:9847
    log_level: info
    tls: require                 # NBD listeners: off, on (offered) or require
    tls_certificates: /etc/tapdisk/pki   # ca-cert.pem, server-cert.pem, server-key.pem
    tls_verify_peer: true        # clients need a certificate signed by ca-cert.pem
    ceph_conf: /etc/ceph/ceph.conf   # cluster of rbd: specs that name none (Ceph's default)
    ceph_id: admin               # their cephx identity, client.ID (Ceph's default)
    devices:
      - spec: vhd:/var/lib/tapdisk/vm1.vhd
        read_only: false
        device: 0                # /dev/nbd0; omitted = first free

The file is validated on load against ``SCHEMA``: an unknown key, a value of the
wrong type or a value out of range raises ``ConfigError`` with the file, the line
and the key, so an operator can fix it without guessing.  Line numbers come from
PyYAML's node tree (``compose``), which keeps a mark on every node.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from tapdisk.drivers import sizes
from tapdisk.drivers.base import ImageError
from tapdisk.drivers.paths import is_inside
from tapdisk.drivers.registry import REMOTE, OpenOptions, parse_spec

from .busypoll import DEFAULT_MAX_US
from .busypoll import MAX_US as BUSY_POLL_MAX_US
from .ctl.protocol import DEFAULT_DIR, MAX_DEVICE_INDEX, MAX_SECONDS
from .nbd.handshake import TLSMode

DEFAULT_PATH = "/etc/tapdisk/tapdisk.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """The configuration is invalid; the message names the file, line and key."""


@dataclass(frozen=True)
class DeviceEntry:
    """One entry of ``devices``: the image spec to attach at boot, read-only, /dev/nbdN index."""

    spec: str
    read_only: bool = False
    device: int | None = None


@dataclass(frozen=True)
class Config:
    """Every setting, with its default; the README documents each one."""

    retry_deadline: float = 120.0
    queue_depth: int = 256
    merge_size: int = 1 << 20
    busy_poll: int = DEFAULT_MAX_US
    control_dir: str = DEFAULT_DIR
    allowed_dirs: tuple[str, ...] = ()
    remote_backing: bool = False
    remote_images: bool = False
    metrics_listen: tuple[str, int] = ("127.0.0.1", 9847)
    log_level: str = "info"
    tls: TLSMode = TLSMode.OFF
    tls_certificates: str | None = None
    tls_verify_peer: bool = False
    ceph_conf: str | None = None
    ceph_id: str | None = None
    devices: tuple[DeviceEntry, ...] = field(default_factory=tuple)

    def override(self, **values: Any) -> Config:
        """A copy with every value that is not None replaced (command-line flags)."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})


# --- value parsers: each takes the constructed YAML value and returns the setting, or
# raises ValueError with a message that completes "KEY: ...".  Command-line flags use
# the same parsers, so a flag and the file accept exactly the same values.


def parse_size(value: object) -> int:
    """Bytes from an integer or a size string such as ``512K`` or ``1MiB`` (``drivers.sizes``)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size such as 1MiB, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return sizes.parse_size(value)
        except ImageError:
            pass
    raise ValueError(f"expected a size such as 1MiB or 1048576, got {value!r}")


def parse_host_port(value: object) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port); an empty host is 127.0.0.1.

    The one address grammar of tapdisk: ``metrics_listen`` and ``--metrics-listen``
    here, ``tapdisk serve --tcp`` in ``cli``.  PORT is decimal, 0 to 65535.
    """
    if isinstance(value, str):
        host, sep, port = value.rpartition(":")
        if sep and port.isascii() and port.isdigit() and int(port) <= 65535:
            return host.strip("[]") or "127.0.0.1", int(port)
    raise ValueError(f"expected HOST:PORT or [IPV6]:PORT, PORT 0 to 65535, got {value!r}")


def _integer(low: int, high: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"must be between {low} and {high}, got {value}")
        return value

    return parse


def _seconds(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    if not 0 < value <= MAX_SECONDS:
        raise ValueError(f"must be more than 0 and at most {MAX_SECONDS} seconds, got {value}")
    return float(value)


def _merge_size(value: object) -> int:
    size = parse_size(value)
    if size != 0 and not 4096 <= size <= 32 << 20:
        raise ValueError(f"must be 0 (no merging) or from 4KiB to 32MiB, got {size} bytes")
    return size


def _directory(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a directory path, got {value!r}")
    if not os.path.isabs(value):
        raise ValueError(f"must be an absolute path, got {value!r}")
    return os.path.normpath(value)


@dataclass(frozen=True)
class ListOf:
    """A schema entry whose value is a list; each item is checked (and blamed) on its own line."""

    item: Callable[[object], Any]

    def __call__(self, value: object) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise ValueError(f"expected a list, got {value!r}")
        return tuple(self.item(v) for v in value)


def _log_level(value: object) -> str:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ValueError(f"expected one of {', '.join(LOG_LEVELS)}, got {value!r}")
    return value.lower()


def image_path(spec: str) -> str | None:
    """The file a spec finally names (after any ``layer:OPTIONS:`` prefixes), if absolute."""
    start = spec.find(":/")
    return os.path.normpath(spec[start + 1 :]) if start >= 0 else None


def _spec(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected an image spec TYPE:PATH, got {value!r}")
    try:
        kind, _ = parse_spec(value)
    except ImageError as exc:
        raise ValueError(str(exc)) from None
    if image_path(value) is None and kind not in REMOTE:
        raise ValueError(f"the image path must be absolute, got {value!r}")
    return value


def _tls_mode(value: object) -> TLSMode:
    if isinstance(value, bool):  # YAML 1.1 reads a bare on or off as true or false
        value = "on" if value else "off"
    try:
        return TLSMode(value)
    except ValueError:
        raise ValueError(f"expected off, on or require, got {value!r}") from None


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _device_index(value: object) -> int:
    return _integer(0, MAX_DEVICE_INDEX)(value)


def _file(value: object) -> str:
    if not isinstance(value, str) or not os.path.isabs(value):
        raise ValueError(f"expected an absolute file path, got {value!r}")
    return os.path.normpath(value)


def _ceph_id(value: object) -> str:
    if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
        raise ValueError(f"expected a cephx client name such as admin, got {value!r}")
    return value


def open_defaults(config: Config) -> OpenOptions:
    """What every image of a daemon is opened with before per-device flags."""
    return OpenOptions(
        ceph_conf=config.ceph_conf, ceph_id=config.ceph_id, remote_backing=config.remote_backing
    )


def is_remote(spec: str) -> bool:
    """Whether ``spec`` names no local file (an NBD export, an image in a cluster), which no
    allowed_dirs limits."""
    return spec.partition(":")[0] in REMOTE


#: Top-level key -> parser of its value.  ``devices`` is handled by ``_devices``.
SCHEMA: dict[str, Callable[[object], Any]] = {
    "retry_deadline": _seconds,
    "queue_depth": _integer(1, 65536),
    "merge_size": _merge_size,
    "busy_poll": _integer(0, BUSY_POLL_MAX_US),
    "control_dir": _directory,
    "allowed_dirs": ListOf(_directory),
    "remote_backing": _boolean,
    "remote_images": _boolean,
    "metrics_listen": parse_host_port,
    "log_level": _log_level,
    "tls": _tls_mode,
    "tls_certificates": _directory,
    "tls_verify_peer": _boolean,
    "ceph_conf": _file,
    "ceph_id": _ceph_id,
}

#: Key of an entry under ``devices`` -> parser of its value.
DEVICE_SCHEMA: dict[str, Callable[[object], Any]] = {
    "spec": _spec,
    "read_only": _boolean,
    "device": _device_index,
}


class _Reader:
    """Walks the composed node tree, turning nodes into settings with line-marked errors."""

    def __init__(self, path: str, loader: yaml.SafeLoader) -> None:
        self.path = path
        self.loader = loader

    def error(self, node: yaml.Node, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: line {node.start_mark.line + 1}: {key}: {problem}")

    def value(self, node: yaml.Node) -> object:
        return self.loader.construct_object(node, deep=True)

    def mapping(self, node: yaml.Node, where: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
        """(key, key node, value node) for a mapping node with string keys and no duplicates."""
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, where, "expected a mapping of key: value")
        seen: dict[str, int] = {}
        items = []
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if not isinstance(key, str):
                raise self.error(key_node, where, f"keys must be names, got {key!r}")
            if key in seen:
                raise self.error(key_node, key, f"given twice (first on line {seen[key]})")
            seen[key] = key_node.start_mark.line + 1
            items.append((key, key_node, value_node))
        return items

    def parse(
        self,
        schema: dict[str, Callable[[object], Any]],
        prefix: str,
        key: str,
        key_node: yaml.Node,
        value_node: yaml.Node,
    ) -> Any:
        name = prefix + key
        if key not in schema:
            known = ", ".join(sorted(schema))
            raise self.error(key_node, name, f"unknown key (known keys: {known})")
        parser = schema[key]
        if isinstance(parser, ListOf) and isinstance(value_node, yaml.SequenceNode):
            return tuple(
                self.check(parser.item, f"{name}[{i}]", item)
                for i, item in enumerate(value_node.value)
            )
        return self.check(parser, name, value_node)

    def check(self, parser: Callable[[object], Any], name: str, node: yaml.Node) -> Any:
        try:
            return parser(self.value(node))
        except ValueError as exc:
            raise self.error(node, name, str(exc)) from None

    def devices(self, node: yaml.Node, allowed: Sequence[str]) -> tuple[DeviceEntry, ...]:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null":
            return ()
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, "devices", "expected a list of devices")
        devices: list[DeviceEntry] = []
        indexes: dict[int, int] = {}
        for i, item in enumerate(node.value):
            where = f"devices[{i}]"
            values: dict[str, Any] = {}
            for key, key_node, value_node in self.mapping(item, where):
                values[key] = self.parse(DEVICE_SCHEMA, where + ".", key, key_node, value_node)
                outside = (
                    key == "spec"
                    and not is_remote(values[key])
                    and not is_inside(image_path(values[key]) or "", allowed)
                )
                if allowed and outside:
                    raise self.error(
                        value_node, where + ".spec", "image is outside every allowed_dirs entry"
                    )
                if key == "device":
                    line = value_node.start_mark.line + 1
                    if values[key] in indexes:
                        raise self.error(
                            value_node,
                            where + ".device",
                            f"nbd{values[key]} is already used on line {indexes[values[key]]}",
                        )
                    indexes[values[key]] = line
            if "spec" not in values:
                raise self.error(item, where, "missing the required key spec")
            devices.append(DeviceEntry(**values))
        return tuple(devices)


def parse(text: str, path: str = "<config>") -> Config:
    """Parse and validate configuration text; ``path`` is only used in messages."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return Config()
        reader = _Reader(path, loader)
        values: dict[str, Any] = {}
        devices_node: yaml.Node | None = None
        for key, key_node, value_node in reader.mapping(root, "top level"):
            if key == "devices":
                devices_node = value_node
                continue
            values[key] = reader.parse(SCHEMA, "", key, key_node, value_node)
        if devices_node is not None:
            values["devices"] = reader.devices(devices_node, values.get("allowed_dirs", ()))
        return Config(**values)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(f"{path}: {line}not valid YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def load(path: str | None = None) -> Config:
    """Load the file at ``path``; with no path, the default file if it exists, else defaults."""
    if path is None:
        if not os.path.exists(DEFAULT_PATH):
            return Config()
        path = DEFAULT_PATH
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse(text, path)


# --- command line ---------------------------------------------------------------------


#: How a flag's text becomes the value its schema parser expects (text by default).
_FLAG_TEXT: dict[str, Callable[[str], object]] = {
    "retry_deadline": float,
    "queue_depth": int,
    "busy_poll": int,
}


def _flag(key: str, parser: Callable[[object], Any]) -> Callable[[str], Any]:
    """An argparse type that accepts exactly what the file accepts for ``key``."""

    def convert(text: str) -> Any:
        try:
            value = _FLAG_TEXT.get(key, str)(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return parser(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def add_arguments(parser: argparse.ArgumentParser, *, keys: Sequence[str]) -> None:
    """Add ``--config`` and one override flag per setting in ``keys`` to ``parser``.

    ``keys`` are among retry_deadline, queue_depth, merge_size, busy_poll, control_dir,
    allowed_dirs and metrics_listen; log_level has its own flag, before the subcommand.

    Every flag defaults to None so that only flags actually given override the file.
    """
    parser.add_argument(
        "--config",
        metavar="PATH",
        help=f"configuration file (default {DEFAULT_PATH}, if it exists)",
    )
    helps = {
        "retry_deadline": ("-t", "SECS", "retry failing requests for up to SECS seconds"),
        "queue_depth": (None, "N", "requests in flight per device"),
        "merge_size": (None, "SIZE", "largest merged request, e.g. 1MiB"),
        "control_dir": (None, "DIR", "directory of the control and NBD sockets and the minors"),
        "metrics_listen": (None, "HOST:PORT", "address of the Prometheus endpoint"),
    }
    for key in keys:
        if key == "allowed_dirs":
            add_allowed_dirs_argument(parser)
            continue
        if key == "busy_poll":
            add_busy_poll_argument(parser, None)
            continue
        short, metavar, text = helps[key]
        flags = [f"--{key.replace('_', '-')}"] + ([short] if short else [])
        parser.add_argument(
            *flags, dest=key, metavar=metavar, type=_flag(key, SCHEMA[key]), help=text
        )


def add_allowed_dirs_argument(parser: argparse.ArgumentParser) -> None:
    """``--allowed-dir DIR``, repeatable; given at all, it replaces the file's allowed_dirs."""
    parser.add_argument(
        "--allowed-dir",
        dest="allowed_dirs",
        metavar="DIR",
        action="append",
        type=_flag("allowed_dirs", _directory),
        help="directory images and their parents may be opened from "
        "(repeatable; replaces the configuration's allowed_dirs)",
    )


def add_busy_poll_argument(parser: argparse.ArgumentParser, default: int | None) -> None:
    """``--busy-poll USECS`` (serve, daemon, service), checked like the file's busy_poll;
    with a None default the configuration's value applies."""
    shown = default if default is not None else f"the configuration's, else {DEFAULT_MAX_US}"
    parser.add_argument(
        "--busy-poll",
        dest="busy_poll",
        metavar="USECS",
        type=_flag("busy_poll", SCHEMA["busy_poll"]),
        default=default,
        help="spin up to USECS for a client's next request before sleeping: faster at queue "
        f"depth 1; adapts, and stops for clients slower than that; 0 disables (default {shown})",
    )


def from_arguments(args: argparse.Namespace, keys: Sequence[str]) -> Config:
    """The configuration file named by ``args.config`` with the given flags applied."""
    config = load(args.config)
    values = {key: getattr(args, key, None) for key in keys}
    if values.get("allowed_dirs") is not None:
        values["allowed_dirs"] = tuple(values["allowed_dirs"])
    return config.override(**values)
