"""Hydra plugin: submitit launchers that wait for every job (logic in :mod:`lp.launchers`)."""

from __future__ import annotations

from hydra_plugins.hydra_submitit_launcher import submitit_launcher as plugin

from lp.launchers import Collecting


class SlurmLauncher(Collecting, plugin.SlurmLauncher):
    """`hydra/launcher=slurm`: the plugin's SLURM launcher, waiting for every job (see lp.launchers)."""


class LocalLauncher(Collecting, plugin.LocalLauncher):
    """`hydra/launcher=local`: the plugin's local launcher (same machinery, this machine), idem."""
