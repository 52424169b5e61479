"""The built-in demo: MNIST data, small models (its figure: sparsewrap/train/figure.py)."""
