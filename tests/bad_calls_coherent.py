"""Bad-call rows (tests/test_bad_calls.py): CoherentStrongReg, compression_report, the coherence
functional forms.
"""

from __future__ import annotations

from tests.badcalls import Bad

CASES: list[Bad] = []
