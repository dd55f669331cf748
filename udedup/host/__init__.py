"""The host layer: every read of /proc and /sys goes through here (roots are parameters), with the
one errno table; pure parsers of the kernel's text formats; pagemap, kpageflags, kpagecount and the
zero page's PFNs; reads of another process's memory."""
