"""The built-in demo: MNIST data, small models, the figure."""
