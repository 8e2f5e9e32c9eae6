"""Logging for tapdisk processes: stderr, journald priorities, device names, rate limits.

- Under systemd (stderr is the stream named by ``$JOURNAL_STREAM``) every line starts
  with a syslog priority prefix such as ``<3>`` so the journal records the right level
  and no timestamp or program name is repeated; elsewhere lines read
  ``tapdisk[PID]: error: nbd0: ...``.
- ``device_logger("nbd0")`` returns a logger whose every message starts with the
  device name, so ``journalctl -u tapdisk | grep nbd0`` finds everything about it.
- ``RateLimit`` lets through a few identical messages (info and above) per interval
  and counts the rest, so a failing disk retrying thousands of requests cannot flood
  the journal.  "Identical" means the same logger, level, message template and
  subject, the subject being the device of ``device_logger`` or else the message's
  first argument (by convention the device or peer: ``log.info("%s: ...", name)``).
  So "%s: read at %d failed" for a thousand offsets of nbd0 is one repeated message,
  while the same failure on nbd1 is another.  Suppressed counts are reported with
  the next message that gets through, and at exit for messages that never came back.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

#: Python level -> syslog priority (sd-daemon(3) prefixes).
PRIORITIES = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

#: Identical messages let through per interval, and the interval in seconds.
BURST = 10
INTERVAL = 60.0


def priority(levelno: int) -> int:
    """Syslog priority of a Python logging level (levels in between round down)."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return PRIORITIES[level]
    return PRIORITIES[logging.DEBUG]


def stderr_is_journal() -> bool:
    """True when stderr is the journald stream systemd connected (``$JOURNAL_STREAM``).

    The variable holds ``DEVICE:INODE`` of that stream; comparing it with stderr
    avoids prefixes when a child of a systemd service has its stderr redirected.
    """
    dev, sep, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (sep and dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """``<PRIORITY>message`` on every line, tracebacks included."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.splitlines() or [""])


class DeviceAdapter(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefixes every message with the device name and records it as ``record.device``."""

    def __init__(self, logger: logging.Logger, device: str) -> None:
        super().__init__(logger, {"device": device})
        self.device = device

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**kwargs.get("extra", {}), "device": self.device}
        return f"{self.device}: {msg}", kwargs


def device_logger(device: str, name: str = "tapdisk") -> DeviceAdapter:
    """A logger for one device (``nbd0``, ``td1234.0``...): its messages name it."""
    return DeviceAdapter(logging.getLogger(name), device)


@dataclass
class _Window:
    levelno: int
    start: float
    count: int
    suppressed: int
    text: str


class RateLimit(logging.Filter):
    """Lets ``burst`` identical records at ``level`` or above through per ``interval``.

    The rest are counted; the next record of the same kind after the interval
    carries the count, and ``drain()`` returns what is still unreported.  At
    most ``max_keys`` kinds are tracked (least recently seen dropped first), so
    the filter's memory is bounded even when every message differs.
    """

    def __init__(
        self,
        burst: int = BURST,
        interval: float = INTERVAL,
        level: int = logging.INFO,
        max_keys: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.level = level
        self.max_keys = max_keys
        self.clock = clock
        self._windows: OrderedDict[tuple[object, ...], _Window] = OrderedDict()
        # Filters run outside the handler's lock; the exporter logs from several threads.
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level:
            return True
        with self._lock:
            return self._filter(record)

    def _filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, _subject(record), str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window.start >= self.interval:
            suppressed = window.suppressed if window else 0
            self._windows[key] = _Window(record.levelno, now, 1, 0, "")
            self._windows.move_to_end(key)
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
            if suppressed:
                _append(record, f" ({suppressed} identical messages suppressed before this one)")
            return True
        self._windows.move_to_end(key)
        window.count += 1
        if window.count < self.burst:
            return True
        if window.count == self.burst:
            left = window.start + self.interval - now
            _append(record, f" (repeating; identical messages suppressed for {left:.0f} s)")
            return True
        window.suppressed += 1
        window.text = record.getMessage()
        return False

    def drain(self) -> list[tuple[int, int, str]]:
        """(level, suppressed count, last suppressed message) not yet reported; forgets all."""
        with self._lock:
            pending = [
                (w.levelno, w.suppressed, w.text) for w in self._windows.values() if w.suppressed
            ]
            self._windows.clear()
        return pending


def _subject(record: logging.LogRecord) -> object:
    """What a record is about: its device, else its first argument when that is a scalar."""
    device = getattr(record, "device", None)
    if device is not None:
        return device
    args = record.args
    if isinstance(args, tuple) and args and isinstance(args[0], str | int):
        return args[0]
    return None


def _append(record: logging.LogRecord, note: str) -> None:
    """Append a note to a record's message, keeping its arguments formatted once."""
    record.msg = record.getMessage() + note
    record.args = None


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler with rate limiting; reports what it suppressed when closed."""

    def __init__(self, journal: bool, program: str) -> None:
        super().__init__(sys.stderr)
        self.limit = RateLimit()
        self.addFilter(self.limit)
        if journal:
            self.setFormatter(JournalFormatter("%(message)s"))
        else:
            self.setFormatter(PlainFormatter(f"{program}[{os.getpid()}]"))

    def close(self) -> None:
        for levelno, count, text in self.limit.drain():
            record = logging.LogRecord(
                "tapdisk",
                levelno,
                __file__,
                0,
                "%s (%d identical messages suppressed)",
                (text, count),
                None,
            )
            logging.StreamHandler.emit(self, record)
        super().close()


class PlainFormatter(logging.Formatter):
    """``program[pid]: level: message`` for terminals and plain files."""

    def __init__(self, prefix: str) -> None:
        super().__init__("%(message)s")
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.prefix}: {record.levelname.lower()}: {super().format(record)}"


def setup(level: str | int = "info", program: str = "tapdisk") -> StderrHandler:
    """Send the root logger to stderr for a process; call once, early, from main()."""
    handler = StderrHandler(stderr_is_journal(), program)
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
