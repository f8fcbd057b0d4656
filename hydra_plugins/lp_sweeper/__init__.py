"""Hydra plugin: the grid sweeper with dense twins first (logic in :mod:`lp.sweeper`)."""

from __future__ import annotations

from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from lp.sweeper import with_dense_jobs, without_width_patches


class DenseFirstSweeper(BasicSweeper):
    """:class:`BasicSweeper` whose first jobs are the grid's dense twins (``dense=true``)."""

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None,
                 dense: bool = True) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.dense = dense
        self.default_pruner: str | None = None

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.default_pruner = config.hydra.runtime.choices.get("pruner")

    def split_arguments(self, overrides, max_batch_size):  # noqa: D102 - see BasicSweeper
        grid = without_width_patches(BasicSweeper.split_arguments(overrides, None)[0])
        jobs = with_dense_jobs(grid, self.default_pruner) if self.dense else grid
        if max_batch_size is None:
            return [jobs]
        return list(BasicSweeper.split_overrides_to_chunks(jobs, max_batch_size))
