"""The VHD format: driver, and the create/snapshot/check/coalesce operations tools share.

Split by concern: ``format`` (on-disk structures), ``meta`` (loading and
validation), ``chain`` (parent lookup), ``bitmap``, ``alloc`` (block map and
crash-ordered allocation), ``image`` (the driver), ``create``, ``check``,
``coalesce`` and ``edit`` (the operations behind ``vhd-util``).
"""
