"""``tap-ctl``: the command line (``cli``), its subcommands (``commands``) and the tapdisk
processes they start and stop (``processes``)."""
