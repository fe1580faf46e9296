"""CoherentStrongReg: the strength-sweep protocol (a slot the lead fills; issue 14, items 2-3).

Until it is written this module is a stub: ``python examples/reproduce.py coherent`` raises
``NotImplementedError`` and ``all`` skips it. To fill it, provide what the other protocol
modules provide (see ``repro/common.py``): ``CARD``, ``protocol(quick, seeds)``,
``tasks(proto)``, the task functions, ``premise(proto, seeds, infos)`` and
``describe(proto)`` (optionally ``finish`` and ``extra_panels``), set ``STUB = False``, and add
the markers ``<!-- repro:coherent:begin -->`` / ``<!-- repro:coherent:end -->`` to the card.
"""

from __future__ import annotations

from typing import Any

STUB = True
STUB_REASON = "the coherent protocol is designed by the lead (issue 14)"
CARD = "coherent.md"


def protocol(quick: bool, seeds: int | None) -> dict[str, Any]:
    raise NotImplementedError(
        "coherent: the strength-sweep protocol is not written yet; the lead fills this slot "
        "(examples/repro/coherent.py)"
    )
