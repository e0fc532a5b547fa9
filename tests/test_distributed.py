"""Two CPU processes over gloo, each with its own shard, hold the W of one process fed the whole batch."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from contract import decaying_features

from fastpred import DirectPredictor

SHARD_ROWS = (24, 40)  # unequal shards: the global mean must weight rows, not ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, batches: list[torch.Tensor], out_dir: str, kwargs: dict | None = None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        pred = DirectPredictor(batches[0].shape[1], **(kwargs or dict(rho=0.99, freq=2)))
        start = sum(SHARD_ROWS[:rank])
        for z in batches:
            pred(z[start : start + SHARD_ROWS[rank]])
        torch.save({"F": pred.F, "W": pred.W, "folds": pred.num_folds}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_on_the_concatenated_batch(tmp_path):
    batches = decaying_features(sum(SHARD_ROWS), 16, steps=12, seed=12)
    mp.spawn(_rank_main, args=(_free_port(), batches, str(tmp_path)), nprocs=2, join=True)
    single = DirectPredictor(16, rho=0.99, freq=2)
    for z in batches:
        single(z)
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(state["F"], single.F, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["W"], single.W, rtol=1e-5, atol=1e-6)
        assert int(state["folds"]) == 12
