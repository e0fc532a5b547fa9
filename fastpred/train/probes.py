"""The online linear probe, trained alongside SSL training on the step's detached features.

The evaluations of frozen features (extraction, the kNN monitor, the final linear probe) live in `fastpred.eval`,
shared with `python -m fastpred.eval`. Labels < 0 mean "unlabelled" (STL-10's unlabeled split): they are left out
of the probe's loss and counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class OnlineProbe(nn.Module):
    """A linear classifier on detached backbone features, trained by its own optimizer during SSL training.

    The features go through ``BatchNorm1d(affine=False)`` first, so the probe sees standardised inputs
    whatever the backbone's feature scale (which drifts during training), then ``Linear(feat_dim,
    num_classes)``. The optimizer is Adam (scale-free, so one default ``lr=1e-3`` serves a small CNN and a
    ResNet-50); it never touches the backbone, and no gradient reaches the backbone (features are detached).

    Resuming: ``probe_state()`` returns the module's ``state_dict`` and the optimizer's state together;
    ``load_probe_state`` restores both, so a resumed probe takes bitwise the same next step. (A plain
    ``state_dict`` has no optimizer state; nn.Module's is left as is, so nesting this module stays standard.)

    Construct it on its device (``device=``), or move it before the first ``step``: Adam's state is
    created on the parameters' device at the first step.
    """

    def __init__(
        self,
        feat_dim: int,
        num_classes: int,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.feat_dim, self.num_classes = feat_dim, num_classes
        self.norm = nn.BatchNorm1d(feat_dim, affine=False, device=device)
        self.head = nn.Linear(feat_dim, num_classes, device=device)
        self.optimizer = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)

    def extra_repr(self) -> str:
        return f"{self.feat_dim}, {self.num_classes}"

    def forward(self, features: Tensor) -> Tensor:
        """Logits (B, num_classes) of the features (B, feat_dim), computed in fp32."""
        return self.head(self.norm(features.float()))

    def step(self, features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One training step on a batch; returns ``(loss, correct, counted)`` as 0-dim device tensors.

        ``loss`` is the mean cross-entropy over the labelled samples (0 when there are none), detached;
        ``correct`` counts labelled samples classified right (before this step's update) and ``counted``
        the labelled samples (labels >= 0). Nothing is read on the host. The step puts the probe in
        training mode. Unlabelled samples still enter BatchNorm's batch statistics (they are features of
        the same distribution). A batch without labels still advances Adam by a step with zero gradient,
        which moves the weights a little along the momentum; with STL-10's 5k labelled of 105k images and
        batch 256 such batches have probability ~1e-6.
        """
        self.train()
        features = features.detach()
        labels = labels.to(features.device, torch.int64, non_blocking=True)  # cross_entropy wants int64
        labelled = labels >= 0
        # Autocast off: the probe's loss and update are in fp32 whatever the training step's precision.
        with torch.autocast(device_type=features.device.type, enabled=False):
            logits = self(features)
            losses = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")
            counted = labelled.sum()
            loss = (losses * labelled).sum() / counted.clamp(min=1)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        correct = ((logits.detach().argmax(dim=1) == labels) & labelled).sum()
        return loss.detach(), correct, counted

    def probe_state(self) -> dict:
        """Everything a resume needs: ``{"module": state_dict(), "optimizer": optimizer.state_dict()}``."""
        return {"module": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_probe_state(self, state: dict) -> None:
        """Restores what ``probe_state`` returned (module and optimizer)."""
        self.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
