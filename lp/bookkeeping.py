"""The bookkeeping config keys, defined once: the settings that do not define a run.

Where a job writes and reads (``paths``, ``data.root``), how it reports (``tracker``; any key named
``progress``: tqdm bars), how many threads it uses (``runtime``: only the float summation order) and
the sweep machinery itself (``hydra``, ``sweeps``, ``sweep_name``, ``resume``, ``force``). Two jobs
that differ only in them compute the same numbers. Every user derives its form from
:data:`BOOKKEEPING` and :data:`PROGRESS`:

* :func:`lp.callbacks.config_hash` drops them from the config it hashes (resume of finished jobs);
* :func:`lp.run.run_name` leaves their overrides out of the run name (it also leaves out
  ``model.name`` and ``pruner.n``, which are settings but already parts of the name);
* :func:`lp.report.results.override_keys` leaves them out of the summary's setting columns.

``hydra`` and ``sweeps`` are never keys of a composed job config (Hydra keeps its own node apart;
``sweeps`` presets are ``_global_``), so listing them changes no config hash. Imports nothing.
"""

from __future__ import annotations

# Dotted config paths from the top; a key below one of them is bookkeeping too.
BOOKKEEPING = ("paths", "data.root", "tracker", "runtime", "hydra", "sweeps", "sweep_name", "resume", "force")
PROGRESS = "progress"  # a key of this name at any depth (tqdm bars)


def is_bookkeeping(key: str) -> bool:
    """Whether the dotted config path ``key`` (an override's key; ``+``/``~`` prefixes ignored) is
    bookkeeping: one of :data:`BOOKKEEPING`, below one, or with a :data:`PROGRESS` part."""
    key = key.lstrip("+~")
    return PROGRESS in key.split(".") or any(key == b or key.startswith(b + ".") for b in BOOKKEEPING)
