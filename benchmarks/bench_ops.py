"""Kernel microbenchmarks; see srm_ext/benchmark.py for what is measured.

    python benchmarks/bench_ops.py --out benchmarks/results            # CPU, CIFAR shapes
    python benchmarks/bench_ops.py --shapes imagenet --device cuda --dtype bfloat16 \\
        --out benchmarks/results
"""

import sys

from srm_ext.benchmark import main

if __name__ == "__main__":
    sys.exit(main())
