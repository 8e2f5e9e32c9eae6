"""Everything a person or script uses to steer a tapdisk. Installed as ``tapdisk.control``."""
