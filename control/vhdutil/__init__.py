"""``vhd-util``: the command table (``cli``), blktap-style option parsing (``args``), the
subcommands that read images (``queries``) and those that change them (``changes``), and
how they follow a chain (``chain``)."""
