"""The ways an NBD client can end a connection, raised by the handshake and request codecs."""


class ProtocolError(Exception):
    """The peer broke a rule that leaves no way to answer: hard-disconnect."""


class ClientAborted(Exception):
    """The client ended negotiation with NBD_OPT_ABORT (already acknowledged)."""
