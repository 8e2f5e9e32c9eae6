"""QCOW2 images, split by concern like qemu's driver.

``format`` (header, extensions, snapshot entries), ``cluster`` (L2 entry
decoding), ``refcount`` (refcounts and allocation), ``compress`` (compressed
clusters), ``image`` (the ``Image``), ``check`` (consistency check, refcount
repair), ``create`` (new images).  What QCOW v1 shares with it lives in
``drivers/``: ``l2tables`` (table codec and L2 cache), ``deflate`` and
``backing`` (safe backing-file opening).
"""
