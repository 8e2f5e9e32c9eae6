"""How a control request fails: ``ControlError``, a kind from the control protocol and a message."""

from __future__ import annotations


class ControlError(Exception):
    """A request that fails with a protocol error kind and a message."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
