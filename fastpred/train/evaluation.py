"""When the trainer evaluates its backbone, and with what: the kNN monitor every --knn-every epochs on the probes'
held-out set, and at the end the final kNN, the linear probe on frozen features and the same probe on the backbone
at random initialisation (the baseline it must beat).

The evaluations themselves are `fastpred.eval`'s, shared with `python -m fastpred.eval`, and run on every rank: each
extracts its shard of the probes' sets, the kNN scores every query against each rank's part of the bank, the final
probe trains data-parallel. Features are extracted once per evaluation point: a monitor at the last step hands its
features to the final evaluation.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpred.data.augment import normalize_uint8
from fastpred.eval import extract_features, knn_accuracy, linear_probe_accuracy
from fastpred.train.config import Config
from fastpred.train.data import Sources
from fastpred.train.step import backbone_at_init


class EvalCalendar:
    def __init__(self, cfg: Config, sources: Sources, *, device: torch.device, amp: bool, channels_last: bool,
                 feat_dim: int):
        self.cfg, self.sources, self.device = cfg, sources, device
        self.amp, self.channels_last, self.feat_dim = amp, channels_last, feat_dim
        self._final: tuple | None = None  # (step, features, kNN accuracy) of a monitor that the final evaluation reuses

    def monitor_due(self, epoch: int) -> bool:
        """Whether the end of `epoch` (epochs done) runs the kNN monitor."""
        return bool(self.cfg.knn_every) and self.sources.has_probes and epoch % self.cfg.knn_every == 0

    def monitor(self, backbone: nn.Module, step: int, *, last: bool) -> float:
        """The kNN monitor; its features are kept when the final evaluation follows at this step (`last`)."""
        feats = self.features(backbone)
        knn = self._knn(feats)
        if last:
            self._final = (step, feats, knn)
        return knn

    def final(self, backbone: nn.Module, step: int) -> dict:
        """The summary's evaluations: kNN, linear probe, and the linear probe of the random-init backbone (each None
        when there is nothing to probe or --final-probe is off)."""
        out = {"linear_probe_acc": None, "linear_probe_acc_random_init": None, "knn_acc": None}
        if not self.sources.has_probes:
            return out
        reuse, self._final = self._final, None
        if reuse is not None and reuse[0] == step:
            _, trained, out["knn_acc"] = reuse
        else:
            trained = self.features(backbone)
            out["knn_acc"] = self._knn(trained)
        if self.cfg.final_probe:
            out["linear_probe_acc"] = self._linear_probe(trained)
            del trained, reuse  # the random-init features take their place in memory
            random_init = backbone_at_init(self.cfg)[0].to(self.device)
            if self.channels_last:
                random_init.to(memory_format=torch.channels_last)
            out["linear_probe_acc_random_init"] = self._linear_probe(self.features(random_init))
        return out

    def features(self, backbone: nn.Module) -> tuple:
        """((train features, labels), (held-out features, labels)): this rank's shards, fp32 on the device."""
        train = extract_features(backbone, self.sources.probe_train(), normalize_uint8, self.device, amp=self.amp,
                                 feat_dim=self.feat_dim)
        val = extract_features(backbone, self.sources.probe_val(), normalize_uint8, self.device, amp=self.amp,
                               feat_dim=self.feat_dim)
        return train, val

    def _knn(self, feats: tuple) -> float:
        (xt, yt), (xv, yv) = feats
        return knn_accuracy(xt, yt, xv, yv, k=self.cfg.knn_k, block=self.sources.probes.align)

    def _linear_probe(self, feats: tuple) -> float:
        (xt, yt), (xv, yv) = feats
        return linear_probe_accuracy(xt, yt, xv, yv, epochs=self.cfg.final_probe_epochs, seed=self.cfg.seed,
                                     device=self.device)
