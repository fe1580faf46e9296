"""Trainer integrations: the library's pieces as callbacks of the trainers people use.

Each integration lives in its own module and needs its optional extra; importing this
package imports neither framework:

* :mod:`torch_recal.integrations.lightning`: Lightning callbacks
  (``pip install "torch-recal[lightning]"``).
* :mod:`torch_recal.integrations.transformers`: Hugging Face ``Trainer`` callbacks and a
  ``Trainer`` subclass that adds GGR's term (``pip install "torch-recal[hf]"``).

Both modules offer the same pieces under the same names: ``CalibrateCallback``,
``CoherentRegCallback``, ``RifleCallback``, ``RandomLayerCallback``, ``DenseRefitCallback``
and ``GGRCallback``.
``accelerate`` needs no module: every stateful object works with
``accelerator.register_for_checkpointing`` as it is (see ``docs/integrations.md``).
"""

from __future__ import annotations

__all__: list[str] = []
