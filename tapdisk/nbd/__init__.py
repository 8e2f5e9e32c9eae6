"""The NBD protocol, sans-IO: constants, handshake state machine, request/reply codec."""
