"""Image formats and stackable layers behind one interface (``base.Image``).

Installed as ``tapdisk.drivers``.
"""
