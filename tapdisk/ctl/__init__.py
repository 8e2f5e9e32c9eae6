"""The control socket: its wire protocol, the client that tools use to call a daemon, and
the minors that tools and daemons share."""
