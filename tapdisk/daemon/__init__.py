"""The long-running tapdisk process, steered through its control socket.

One daemon holds any number of minors, blktap's VBDs: a minor (unique on the host,
``tapdisk.ctl.minors``) is attached to the daemon, which holds an ``flock`` on its
marker ``<dir>/tapdisk/tapdisk-<N>`` until it is detached, so a minor is never
attached twice.  An image opened on a minor is served over NBD on
``<dir>/nbd<pid>.<minor>``, and may be connected to the kernel as ``/dev/nbdN``
through ``tapdisk.kernel``.  The control socket ``<dir>/ctl<pid>`` speaks
``tapdisk.ctl.protocol``; requests on one connection are answered in order.

The pieces, each importing only those below it:

- ``command``: ``tapdisk daemon``'s flags, ``main``, and ``run`` (listen, serve
  until shutdown or a signal); ``tapdisk service`` calls ``run`` too.
- ``operations``: ``Daemon``, the control socket and one handler per operation.
- ``handoff``: connect, takeover, release and disconnect of ``/dev/nbdN``.
- ``recovery``: the VBD records (``tapdisk.ctl.records``), and ``adopt`` from the
  records of a tapdisk that died.
- ``minors``: ``Minor``, a minor attached to the daemon.
- ``device``: ``Device``, the VBD opened on a minor; ``errors``: ``ControlError``.
"""
