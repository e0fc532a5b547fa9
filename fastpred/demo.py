"""Smoke run of DirectPredictor in a tiny BYOL on the embedded 8x8 digits, on the CPU in seconds.

    python -m fastpred.demo [--epochs 15] [--seed 0]

It trains an MLP encoder with BYOL's loss, a DirectPredictor head and an EMA target, then prints a
linear-probe accuracy of the frozen features on held-out digits against the same probe on a random
encoder, and the spectrum of F that set the predictor. The full trainer (`fastpred.train`, FFCV data,
ResNets) replaces this once it lands.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as nnf
from torch import nn

from fastpred import DirectPredictor


def load_digits_tensors(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # the embedded default data: 1797 real 8x8 handwritten digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(labels)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return x[:split], y[:split], x[split:], y[split:]


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random 1-pixel shifts, contrast jitter and pixel noise, drawn per image."""
    n = x.shape[0]
    padded = nnf.pad(x, (1, 1, 1, 1))
    dx, dy = torch.randint(0, 3, (2, n))
    rows = (dy[:, None] + torch.arange(8))[:, None, :, None].expand(n, 1, 8, 10)
    shifted = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(8))[:, None, None, :].expand(n, 1, 8, 8)
    shifted = shifted.gather(3, cols)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.6, 1.4)
    return (shifted * contrast + 0.1 * torch.randn_like(shifted)).clamp(0, 1.5)


def probe_accuracy(encoder: nn.Module, train: tuple, test: tuple) -> float:
    from sklearn.linear_model import LogisticRegression

    encoder.eval()
    with torch.no_grad():
        f_train, f_test = encoder(train[0]).numpy(), encoder(test[0]).numpy()
    probe = LogisticRegression(max_iter=2000).fit(f_train, train[1].numpy())
    return float(probe.score(f_test, test[1].numpy()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15, help="passes over the 1437 training digits")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be >= 1 and --batch-size >= 2")
    torch.manual_seed(args.seed)

    x_train, y_train, x_test, y_test = load_digits_tensors(args.seed)
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 128))
    projector = nn.Sequential(nn.Linear(128, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 64))
    predictor = DirectPredictor(64, rho=0.3, eps=0.1)
    online = nn.Sequential(encoder, projector)
    target = copy.deepcopy(online).requires_grad_(False)
    baseline = probe_accuracy(copy.deepcopy(encoder), (x_train, y_train), (x_test, y_test))

    opt = torch.optim.SGD(online.parameters(), lr=0.05, momentum=0.9, weight_decay=4e-4)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        online.train()
        perm = torch.randperm(len(x_train))
        for i in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            x = x_train[perm[i : i + args.batch_size]]
            v1, v2 = augment(x), augment(x)
            p = predictor(online(torch.cat([v1, v2])))  # both views in one call, as in the paper
            with torch.no_grad():
                t = target(torch.cat([v2, v1]))  # each view predicts the other view's target
            loss = 2 - 2 * nnf.cosine_similarity(p, t, dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for po, pt in zip(online.parameters(), target.parameters(), strict=True):
                    pt.lerp_(po, 0.01)  # target EMA 0.99
        if epoch == 0 or (epoch + 1) % 5 == 0 or epoch + 1 == args.epochs:
            print(f"epoch {epoch + 1:3d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start

    s = torch.linalg.eigvalsh(predictor.F[0].double()).flip(0)
    accuracy = probe_accuracy(encoder, (x_train, y_train), (x_test, y_test))
    print(
        f"trained {args.epochs} epochs in {elapsed:.1f} s; predictor folds {int(predictor.num_folds)}, "
        f"skipped {int(predictor.skipped_updates)}"
    )
    shown = ", ".join(f"{v:.3g}" for v in [*s[:4].tolist(), *s[-2:].tolist()])
    print(f"F eigenvalues, largest 4 and smallest 2: {shown}")
    print(f"linear probe on held-out digits: {accuracy:.3f} (random encoder: {baseline:.3f})")


if __name__ == "__main__":
    main()
