"""QCOW2 images, split by concern like qemu's driver.

``format`` (header, extensions, snapshot entries), ``cluster`` (L2 mapping and
cache), ``refcount`` (refcounts and allocation), ``compress`` (compressed
clusters), ``image`` (the ``Image``), ``check`` (consistency check, refcount
repair), ``create`` (new images), ``backing`` (safe backing-file opening).
"""
