"""Evaluation speed per process: feature extraction (fastpred.eval.extract_features) in images/s, and the kNN's
scoring of queries against a bank shard in similarities/s; the numbers the README's ImageNet time model uses.

- `extract[digits]`: the real path, FFCV's EvalLoader over the embedded digits (1,437 images, 16 px centre crops,
  decoded on the CPU) through the digits preset's small CNN.
- `extract[synthetic224-resnet50]`: uint8 224-pixel images already in memory through ResNet-50 (eval mode; bf16
  autocast and channels-last on CUDA): the backbone's side of extraction, without decoding.
- `knn_scoring`: `fastpred.eval.knn.knn_votes` of Q queries against an N-row bank shard of 2,048-wide features
  (ResNet-50's), block 256, k 20: the fp32 similarity matmuls, the running top-k and the votes.

The CPU sizes are cut so that the file runs in about a minute on 2 cores; on CUDA the sizes are ImageNet's shard
per GPU of 8 (160,000 bank rows) against 10,000 queries.
"""

from __future__ import annotations

import os

import pytest
import torch

from bench.harness import DEVICE, peak_memory, sync

CUDA = DEVICE.type == "cuda"
SYNTH_IMAGES, SYNTH_BATCH = (2048, 256) if CUDA else (16, 8)
BANK, QUERIES = (160_000, 10_000) if CUDA else (20_000, 1_000)


@pytest.fixture(scope="module")
def digits_sets(tmp_path_factory):
    pytest.importorskip("ffcv")
    from fastpred.data.named import digits_betons
    from fastpred.eval.features import ProbeSets

    if not os.environ.get("FASTPRED_CACHE"):
        os.environ["FASTPRED_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    train, test = digits_betons()
    return ProbeSets(train, None, test, None, resolution=16, batch_size=256, workers=1, device=DEVICE, rank=0,
                     world_size=1)


class _InMemory:
    def __init__(self, images: torch.Tensor, batch: int):
        self.images, self.batch, self.num_images = images, batch, len(images)
        self.labels = torch.zeros(len(images), dtype=torch.int64, device=images.device)

    def __iter__(self):
        for s in range(0, self.num_images, self.batch):
            yield self.images[s : s + self.batch], self.labels[s : s + self.batch]


@pytest.mark.parametrize("case", ["digits", "synthetic224-resnet50"])
def test_extract(benchmark, case, request):
    from fastpred.core.models import build_backbone
    from fastpred.data.augment import normalize_uint8
    from fastpred.eval.features import extract_features

    torch.manual_seed(0)
    if case == "digits":
        batches = request.getfixturevalue("digits_sets").loader("train")
        backbone = build_backbone("small_cnn")[0].to(DEVICE)
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (SYNTH_IMAGES, 224, 224, 3), generator=g, dtype=torch.uint8)
        batches = _InMemory(images.to(DEVICE).permute(0, 3, 1, 2), SYNTH_BATCH)  # channels-last, as FFCV's
        backbone = build_backbone("resnet50")[0].to(DEVICE)
    if CUDA:
        backbone.to(memory_format=torch.channels_last)

    def run():
        feats, _ = extract_features(backbone, batches, normalize_uint8, DEVICE, amp=CUDA)
        sync()
        return len(feats)

    rounds = 3 if case == "digits" or CUDA else 2
    n = benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)  # warm-up: numba, cuDNN
    benchmark.extra_info.update(
        images_per_s=n / benchmark.stats.stats.median, images=n, device=str(DEVICE), amp=CUDA,
        torch_threads=torch.get_num_threads(), peak_mem_bytes=peak_memory(run) if CUDA else -1,
    )


def test_knn_scoring(benchmark):
    from fastpred.eval.knn import knn_votes

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(BANK, 2048, generator=g).to(DEVICE)
    queries = torch.randn(QUERIES, 2048, generator=g).to(DEVICE)
    bank_labels = torch.randint(1000, (BANK,), generator=g).to(DEVICE)
    query_labels = torch.randint(1000, (QUERIES,), generator=g).to(DEVICE)

    def run():
        votes, _ = knn_votes(bank, bank_labels, queries, query_labels, k=20, block=256, num_classes=1000)
        sync()
        return votes

    benchmark.pedantic(run, rounds=2 if not CUDA else 3, warmup_rounds=1, iterations=1)
    pairs = BANK * QUERIES
    benchmark.extra_info.update(
        similarities_per_s=pairs / benchmark.stats.stats.median, flops_per_s=2 * 2048 * pairs /
        benchmark.stats.stats.median, bank=BANK, queries=QUERIES, device=str(DEVICE),
        torch_threads=torch.get_num_threads(), peak_mem_bytes=peak_memory(run) if CUDA else -1,
    )
