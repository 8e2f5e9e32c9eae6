"""Which ``nbd:`` specs a daemon confined by ``allowed_dirs`` accepts from its callers.

``allowed_dirs`` confines the local files a caller of the control socket can make a
tapdisk open.  An ``nbd:`` spec names no image file but a connection: to a Unix
socket, which is a local file like any other (inside ``allowed_dirs`` or refused), or
to a host over TCP, to which every guest write of the device would go.  A confined
daemon therefore refuses TCP exports unless the configuration opts in with
``remote_images: true`` (a live migration to another host needs it).  The files a URI's
``tls-certificates=`` or ``tls-psk-file=`` name are the host's own TLS configuration,
read only by the handshake; they are not checked.
"""

from __future__ import annotations

import urllib.parse

from tapdisk.drivers.paths import is_inside


def remote_refusal(spec: str, allowed_dirs: tuple[str, ...], remote_images: bool) -> str | None:
    """Why a confined daemon refuses the ``nbd:`` spec ``spec``, or None if it accepts it."""
    target = spec.removeprefix("nbd:")
    if target.startswith("/"):
        sockets = [target]
    elif "://" in target:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(target).query)
        sockets = query.get("socket", [])
    else:
        sockets = []
    for socket in sockets:
        if not is_inside(socket, allowed_dirs):
            return f"socket {socket} is outside the allowed directories ({', '.join(allowed_dirs)})"
    if sockets or remote_images:
        return None
    return (
        "a remote NBD export, refused while allowed_dirs is set "
        "(remote_images: true in the configuration allows them)"
    )
