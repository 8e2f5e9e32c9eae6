"""The control socket: its wire protocol and the client that tools use to call a daemon."""
