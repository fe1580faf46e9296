"""The method tables of README.md and docs/index.md, generated from one list.

Adding a method: its module, its test, its card in docs/methods/, one ``__all__`` line, and one
entry in ``METHODS`` below; then run ``python tools/method_tables.py`` (the test
``tests/test_docs.py`` fails while the tables are out of date).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = [
    {
        "piece": "`ResponseCalibration`, `calibrate(model)`",
        "idea": "per-sample Gaussian calibration of residual-branch responses (ResCNet)",
        "paper": "[Xu et al., arXiv 2411.13582](https://arxiv.org/abs/2411.13582)",
        "card": "calibration.md",
    },
    {
        "piece": "`GenerativeGradientLoss`",
        "idea": "pull the first layer's gradient towards a reference gradient from a generative "
        "decoder (GGR)",
        "paper": "[Reza & Jung, IEEE Access 2025](https://doi.org/10.1109/ACCESS.2025.3534216)",
        "card": "generative.md",
    },
    {
        "piece": "`CoherentStrongReg`",
        "idea": "strong L1/L2 applied only while gradients stay coherent: sparse, compressed nets",
        "paper": "[Park et al., arXiv 1811.08056](https://arxiv.org/abs/1811.08056)",
        "card": "coherent.md",
    },
    {
        "piece": "`RifleScheduler`",
        "idea": "periodically re-initialise the classifier head during fine-tuning (RIFLE)",
        "paper": "[Li et al., ICML 2020](https://arxiv.org/abs/2007.03349)",
        "card": "rifle.md",
    },
    {
        "piece": "`pinv_refit_dense()`",
        "idea": "closed-form ridge refit of dense layers, streamed batch by batch; random "
        "conv-layer training",
        "paper": "[Wu, Zhang, Yang, arXiv 2008.07387](https://arxiv.org/abs/2008.07387)",
        "card": "refit.md",
    },
]
BEGIN, END = "<!-- methods-table:begin -->", "<!-- methods-table:end -->"
TARGETS = {"README.md": "docs/methods/", "docs/index.md": "methods/"}


def table(card_prefix: str) -> str:
    lines = ["| piece | idea | paper | card |", "|---|---|---|---|"]
    for m in METHODS:
        card = f"[card]({card_prefix}{m['card']})"
        lines.append(f"| {m['piece']} | {m['idea']} | {m['paper']} | {card} |")
    return "\n".join(lines)


def regenerate(text: str, card_prefix: str) -> str:
    """``text`` with the region between the markers replaced by the generated table."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + table(card_prefix) + "\n" + text[end:]


def main() -> int:
    check = "--check" in sys.argv
    stale = []
    for name, prefix in TARGETS.items():
        path = ROOT / name
        text = path.read_text()
        new = regenerate(text, prefix)
        if new != text:
            stale.append(name)
            if not check:
                path.write_text(new)
    if check and stale:
        print(f"out of date: {stale}; run python tools/method_tables.py")
        return 1
    print("updated: " + (", ".join(stale) if stale else "nothing"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
