"""The long-running tapdisk process, steered through its control socket.

One daemon holds any number of VBDs.  Each has a *minor* (unique on the host:
the daemon holds an ``flock`` on ``<dir>/minor<N>.lock`` for as long as the
VBD is open, so minors of crashed processes are reclaimed), is served over
NBD on ``<dir>/nbd<pid>.<minor>``, and may be attached to the kernel as
``/dev/nbdN`` through ``tapdisk.kernel``.  The control socket
``<dir>/ctl<pid>`` speaks ``tapdisk.ctl.protocol``; requests on one
connection are answered in order.

The pieces, each importing only those below it:

- ``command``: ``tapdisk daemon``'s flags, ``main``, and ``run`` (listen, serve
  until shutdown or a signal); ``tapdisk service`` calls ``run`` too.
- ``operations``: ``Daemon``, the control socket and one handler per operation.
- ``handoff``: attach, takeover, release and detach of ``/dev/nbdN``.
- ``minors``: the minor locks.
- ``device``: ``Device``, one opened VBD; ``errors``: ``ControlError``.
"""
