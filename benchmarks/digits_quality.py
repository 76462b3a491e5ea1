"""Judge the embedded digits model with an SVM classifier: DDIM-10, DDIM-50 and DDPM-1000.

    python benchmarks/digits_quality.py --per-class 20 --json benchmarks/results/digits_quality.json

A thin wrapper over ``fastdiff.quality.main`` (also ``python -m fastdiff.quality`` and
``fastdiff quality``); ``--help`` for flags.
"""

import sys
from pathlib import Path

# Run from a checkout without installing: Python puts benchmarks/, not the repo root, on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastdiff.quality import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
