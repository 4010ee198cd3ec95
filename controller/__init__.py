"""Controller: the only privileged process; owns the XDP program, maps and ban store."""
