"""IsoLoss (Halvagal, Laborieux, Zenke, NeurIPS 2023, "Implicit variance regularization in non-contrastive SSL").

With a predictor W = U diag(p) U^T, the cosine loss's gradient reaches the projection z through W^T: eigenmode j
of z learns at p_j times the rate of the loss at the prediction, so weak modes are slow to be recruited. IsoLoss
gives z the loss's gradient at the prediction itself, dL/dz = dL/dp, so every eigenmode learns at one rate.

The authors' `isoloss_func` (fmi-basel/implicit-var-reg, solo/losses/isoloss.py, used by
solo/methods/directpred.py with `iso: True`) writes it for a fixed symmetric W, row by row, with t the other
view's target:

    sim = <z, t> / sg(|p| |t|)  -  1/2 sg(<p, t> / (|p|^3 |t|)) |z W^(1/2)|^2,    loss = -2 mean(sim)

whose gradient in z is -2 (t/|t| - cos(p, t) p/|p|) / |p| per row, the gradient of 2 - 2 cos(p, t) in p. Its value is
not a cosine. `iso_term` gives z that same gradient without W^(1/2) (so for any head, not only a symmetric one)
and adds nothing to the value: the trainer logs the method's cosine loss under either `--loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as nnf

#: The cosine loss per row is SCALE * (const - cos): BYOL's 2 - 2 cos and SimSiam's -cos.
SCALE = {"byol": 2.0, "simsiam": 1.0}


def iso_term(z: torch.Tensor, p: torch.Tensor, t: torch.Tensor, method: str) -> torch.Tensor:
    """A scalar of value 0 whose gradient in z (2B, d) is the gradient in p (2B, d) of the method's mean cosine
    loss against t (2B, d), whose rows are [view 1; view 2] and each view predicts the other's target.

    Added to that loss with the predictor fed `z.detach()`, the encoder learns by IsoLoss and a trained head by the
    cosine loss as before (its input gradient is the only one dropped). In fp32 whatever the autocast."""
    with torch.no_grad():
        p = p.float()
        norm = p.norm(dim=1, keepdim=True).clamp_min(1e-12)  # nnf.normalize's floor
        p_hat = p / norm
        t_hat = nnf.normalize(torch.cat(t.float().chunk(2)[::-1]), dim=1)
        cos = (p_hat * t_hat).sum(dim=1, keepdim=True)
        # d/dp of mean_i SCALE * (const - cos_i): the cosine's gradient (t_hat - cos p_hat) / |p|, per row.
        grad_p = -(SCALE[method] / p.shape[0]) * (t_hat - cos * p_hat) / norm
    s = (z.float() * grad_p).sum()
    return s - s.detach()


__all__ = ["iso_term", "SCALE"]
