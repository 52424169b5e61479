"""Model analysis: tracing, channel groups and their rules, MACs, target selection."""
