"""Weighted k-nearest-neighbour accuracy (InstDisc / DINO's monitor), with the bank sharded over the ranks.

Each rank keeps its own shard of the bank, l2-normalised and stored in half precision; the queries (the held-out
features, 1/25 of ImageNet's bank) are gathered to every rank. Every rank scores all queries against its shard
in blocks of `block` bank rows and keeps a running top-k; the ranks' top-k lists are gathered and merged into the
global top-k, from which every rank computes the same votes and accuracy.

Why the result is the one process's: a similarity is the fp32 product of the same two fp16 rows, computed in a
(query chunk x bank block) matmul of the same shape whatever the number of ranks, because the query chunks are
cut from the gathered queries and the bank blocks start at multiples of `block`, which the shards are aligned to
(`fastpred.eval.features.shard_range` with `align` = `block`). The k largest similarities of a row are a
multiset that does not depend on how the bank was split or in which order the blocks were merged, and votes are
summed in descending order of similarity: same neighbours, same votes, same accuracy. The one freedom left is an
exact tie in similarity at the k-th place between neighbours of different classes (duplicate images with
different labels), where which one enters may differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastpred.core import distributed as collective
from fastpred.eval.features import labelled_pair, over_ranks
from fastpred.numerics import full_fp32_matmul


def knn_accuracy(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 4096,
    block: int = 256,
    distributed: bool | None = None,
) -> float:
    """Weighted kNN accuracy of the labelled test rows against the labelled train rows (the bank).

    Features are l2-normalised; each test row takes the `k` most cosine-similar bank rows, and each neighbour
    votes for its class with weight ``exp(similarity / temperature)``; the class with most weight wins. Rows with
    labels < 0 are left out of the bank and the test. Under torch.distributed (default: when a process group of
    more than one process is initialised; `distributed` forces it), the arguments are this rank's shards, and
    every rank returns the accuracy over all ranks' rows.

    Memory per rank: the bank shard as fp16 (N_r x D x 2 bytes, written normalised chunk by chunk: no fp32
    normalised copy, no copy of the labelled rows when all rows are labelled), all queries as fp16, a `chunk` x
    `block` fp32 similarity block, and the top k of every query from every rank. Runs on the train features'
    device.
    """
    votes, query_labels = knn_votes(train_feats, train_labels, test_feats, test_labels, k=k,
                                    temperature=temperature, num_classes=num_classes, chunk=chunk, block=block,
                                    distributed=distributed)
    return int((votes.argmax(dim=1) == query_labels).sum()) / len(query_labels)


def knn_votes(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int = 4096,
    block: int = 256,
    distributed: bool | None = None,
) -> tuple[Tensor, Tensor]:
    """The votes (Q, num_classes) fp32 of every labelled test row of every rank, in rank order, and their labels
    (Q,): what `knn_accuracy` decides from (same arguments), identical on every rank."""
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    many = over_ranks(distributed)
    device = train_feats.device
    bank, bank_labels, queries, query_labels, num_classes, n_bank, _ = labelled_pair(
        train_feats, train_labels, test_feats, test_labels, device=device, many=many, num_classes=num_classes,
        who="knn_accuracy",
    )
    bank = normalized_half(bank)  # (N_r, D) fp16, unit rows
    queries = normalized_half(queries)
    if many:
        queries, query_labels = collective.all_gather_rows(queries), collective.all_gather_rows(query_labels)
    k = min(k, n_bank)
    top_sim, top_label = _shard_top_k(queries, bank, bank_labels, k, chunk, block)  # (Q, k) each
    del bank
    if many:  # every rank's top k of every query, side by side: (world, Q, k) -> (Q, world * k)
        top_sim = collective.all_gather_rows(top_sim[None]).permute(1, 0, 2).reshape(len(queries), -1)
        top_label = collective.all_gather_rows(top_label[None]).permute(1, 0, 2).reshape(len(queries), -1)
    votes = torch.zeros(len(queries), num_classes, device=device)
    for start in range(0, len(queries), chunk):
        sims, pos = top_sim[start : start + chunk].topk(k, dim=1)  # descending: the votes' order of summation
        labels = top_label[start : start + chunk].gather(1, pos)
        # |sim| <= 1, so exp(sim / 0.07) <= e^14.3: no overflow in fp32; -inf (no neighbour) weighs 0.
        votes[start : start + chunk].scatter_add_(1, labels, (sims / temperature).exp())
    return votes, query_labels


def _shard_top_k(queries: Tensor, bank: Tensor, bank_labels: Tensor, k: int, chunk: int, block: int
                 ) -> tuple[Tensor, Tensor]:
    """The k most similar rows of this bank shard for every query: similarities (Q, k) fp32, descending, and their
    labels (Q, k). Where the shard has fewer than k rows the rest is -inf with label 0 (weight 0 in the votes)."""
    device = queries.device
    top_sim = torch.full((len(queries), k), float("-inf"), device=device)
    top_label = torch.zeros((len(queries), k), dtype=torch.int64, device=device)
    with full_fp32_matmul():  # TF32 would round the similarities to 10 bits and tie neighbours that are not tied
        for qs in range(0, len(queries), chunk):
            q = queries[qs : qs + chunk].float()  # (c, D)
            best_sim, best_label = top_sim[qs : qs + chunk], top_label[qs : qs + chunk]
            for bs in range(0, len(bank), block):
                sims = q @ bank[bs : bs + block].float().T  # (c, b)
                sim, idx = sims.topk(min(k, sims.shape[1]), dim=1)
                merged_sim = torch.cat([best_sim, sim], dim=1)
                merged_label = torch.cat([best_label, bank_labels[bs + idx]], dim=1)
                best_sim, pos = merged_sim.topk(k, dim=1)
                best_label = merged_label.gather(1, pos)
            top_sim[qs : qs + chunk], top_label[qs : qs + chunk] = best_sim, best_label
    return top_sim, top_label


def normalized_half(x: Tensor, chunk: int = 16384) -> Tensor:
    """l2-normalised rows of x as fp16, written chunk by chunk into the one output array (no fp32 copy of x).
    Unit vectors have components in [-1, 1], well inside fp16's range; its 11-bit mantissa moves a cosine
    similarity by ~1e-3 at most."""
    out = torch.empty(x.shape, dtype=torch.float16, device=x.device)
    for start in range(0, len(x), chunk):
        out[start : start + chunk] = F.normalize(x[start : start + chunk].float(), dim=1)
    return out
