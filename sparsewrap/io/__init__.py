"""Files: one-file checkpoints, model recipes, atomic writes."""
