"""The host daemon: the loop, what it observes and does, its state file, metrics, systemd glue,
configuration and the (pure) policy."""
