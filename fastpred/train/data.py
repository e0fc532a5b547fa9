"""The trainer's data: two uint8 views per image from a .beton (FFCV, one JPEG decode) or a named source (the
embedded digits, Fashion-MNIST: `fastpred.data.named`), or synthetic images made on the device; and the labelled
sets of the probes (the held-out split of `fastpred.data.split`, read by `fastpred.eval.ProbeSets`).

Every source is deterministic given (seed, epoch, batch): FFCV's order and crops are seeded per sample
(`fastpred.data.decode`), the device-resident views (`fastpred.data.resident`, for sets that fit in memory) take
the same order and seed their crops per batch, synthetic batches come from a generator seeded per batch, so a
resumed run reads exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastpred.data.resident import batch_seed
from fastpred.data.split import held_out_split

SYNTHETIC_CLASSES = 10  # the labels of --data synthetic: random, nothing for a probe to learn


class SyntheticViews:
    """Random uint8 views made on the device at the training resolution: the step without a loader.

    Batch b of epoch e comes from a generator seeded with (seed, e, b), so the data do not depend on
    where a run was resumed."""

    def __init__(self, batch_size: int, resolution: int, steps: int, *, seed: int, rank: int, device):
        self.batch_size, self.resolution, self.steps = batch_size, resolution, steps
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.num_samples = batch_size * steps
        self._epoch, self._skip = 0, 0

    def __len__(self) -> int:
        return self.steps

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self._epoch, self._skip = epoch, skip_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, skip = self._epoch, self._skip
        self._epoch, self._skip = epoch + 1, 0
        g = torch.Generator(self.device)
        shape = (self.batch_size, 3, self.resolution, self.resolution)
        for b in range(skip, self.steps):
            g.manual_seed(batch_seed(self.seed, self.rank, epoch, b))
            x1 = torch.randint(0, 256, shape, generator=g, device=self.device, dtype=torch.uint8)
            x2 = torch.randint(0, 256, shape, generator=g, device=self.device, dtype=torch.uint8)
            y = torch.randint(0, SYNTHETIC_CLASSES, (self.batch_size,), generator=g, device=self.device)
            yield x1, x2, y


class Sources:
    """Where a run's images come from: the training views, and the labelled sets of the probes.

    `train_views` iterates (x1, x2, y) uint8 batches on the device. `probes` (`fastpred.eval.ProbeSets`; `None`
    for synthetic data, which has nothing to probe) holds the labelled sets of the probes, of which
    `probe_train()` and `probe_val()` iterate this rank's shard as (x, y) uint8 centre crops; `held_out_note`
    says which held-out set the probes use, `views_note` which path the training views take and why.

    The training views of a set whose images share one size and fit `--resident-max-mb` are device-resident
    (`fastpred.data.resident`: no decode, no loader thread; every rank holds the whole set and iterates its shard);
    other sets, and `--resident off`, read through FFCV. Both give the same batches in the same order.
    """

    def __init__(self, cfg, *, rank: int, world_size: int, device: torch.device):
        self.device = device
        self.probes = None
        if cfg.data == "synthetic":
            steps = cfg.synthetic_steps
            self.train_views = SyntheticViews(cfg.batch_size, cfg.resolution, steps, seed=cfg.seed, rank=rank,
                                              device=device)
            self.held_out_note = "none (synthetic data)"
            self.views_note = "synthetic images made on the device"
            self._train_path = self._val_path = None
            return
        split = held_out_split(cfg.data, cfg.val, rank)
        self._train_path, self._val_path = split.train, split.val
        train_indices, self.held_out_note = split.train_indices, split.note
        from fastpred.data.resident import ResidentViews, choose_path

        choice = choose_path(cfg.resident, self._train_path, train_indices, device, cfg.resident_max_mb)
        self.views_note = choice.note
        views = dict(scale=(cfg.crop_scale, 1.0), seed=cfg.seed, rank=rank, world_size=world_size, device=device)
        if choice.resident:
            self.train_views = ResidentViews.from_beton(self._train_path, cfg.batch_size, cfg.resolution,
                                                        indices=train_indices, **views)
        else:
            from fastpred.data.loader import TwoViewLoader

            self.train_views = TwoViewLoader(self._train_path, cfg.batch_size, cfg.resolution,
                                             num_workers=cfg.workers, indices=train_indices, **views)
        from fastpred.eval import ProbeSets

        # The held-out file and both sets' labels are checked now (not after the first epoch), on every rank;
        # each rank's loaders read its own shard and are built at the first evaluation.
        self.probes = ProbeSets(
            split.train, split.train_indices, split.val, split.val_indices, resolution=cfg.resolution,
            batch_size=max(cfg.batch_size, 256), workers=cfg.workers, device=device, rank=rank,
            world_size=world_size,
        )

    @property
    def has_probes(self) -> bool:
        return self.probes is not None

    def probe_train(self):
        return self.probes.loader("train")

    def probe_val(self):
        return self.probes.loader("val")

