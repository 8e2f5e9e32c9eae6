"""QCOW2 images, split by concern like qemu's driver.

``format`` (header, extensions, snapshot entries), ``metadata`` (the open
file's tables in memory, guest lookups), ``overlap`` (which clusters hold
metadata, corruption), ``cluster`` (L2 entry decoding),
``allocate`` (cluster allocation, L2 updates, the crash-safe flush order),
``refcount`` (refcounts and host cluster allocation), ``compress``
(compressed clusters), ``image`` (the ``Image``), ``check`` (consistency
check, refcount repair), ``create`` (new images).  What QCOW v1 shares with
it lives in ``drivers/``: ``l2tables`` (table codec and L2 cache),
``deflate`` and ``backing`` (safe backing-file opening).
"""
