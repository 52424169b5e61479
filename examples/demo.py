"""The sparsewrap demo (what `make demo` runs): LeNet-5 on the built-in MNIST, 90 % channel sparsity, purge.

Same as `sparsewrap demo [--epochs N] [--out DIR]`; see sparsewrap/demo/run.py for the steps. In Python:

    from sparsewrap.demo import DemoConfig, run_demo
    result = run_demo(DemoConfig(epochs=3))
    print(result.before, result.after, result.figure)
"""

from __future__ import annotations

import sys

from sparsewrap.cli import main

if __name__ == "__main__":
    main(["demo", *sys.argv[1:]])
