"""Modality imbalance on AV-Digits: ``python benchmarks/imbalance.py [--seeds 3] [overrides ...]``.

The same as ``harmonia bench imbalance``; writes ``bench-results/imbalance/imbalance.{md,json,png}``.
"""

import sys

from harmonia.app.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "imbalance", *sys.argv[1:]]))
