"""One module per ``udedup`` subcommand (see udedup/cli.py for the protocol)."""
