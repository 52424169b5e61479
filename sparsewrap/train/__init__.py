"""Training: the loop, its resumable state, history, distributed helpers, RNG state."""
