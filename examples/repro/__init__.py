"""The reproduction suite behind ``examples/reproduce.py`` (see that file and ``common.py``).

One module per method (``calibration``, ``rifle``, ``ggr``, ``coherent``, ``refit``); each
declares its protocol, its tasks, its premise checks and its card. ``common`` runs the tasks
(paired seeds, two one-thread processes, resumable parts, cached artefacts) and computes the
paired statistics; ``cards`` renders the JSON as tables and plots; ``train`` holds the
training helpers shared by the protocols.
"""

METHODS = ("calibration", "rifle", "ggr", "coherent", "refit")
