"""One process of the CUDA-step rehearsal (`test_cuda_rehearsal.py`), started by torchrun with gloo on the CPU.

Builds the trainer as `python -m fastpred.train --cuda-rehearsal` would (bf16 autocast, channels-last, the sync-free
BatchNorm over both processes, DirectPredictor on the triton backend, interpreted), warms up, then counts the ops
that would wait on the host in later steps. Writes one JSON file per process, OUT/rank<r>.json.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from host_syncs import HostSyncCounter

from fastpred.alerts import CounterAlert
from fastpred.core import distributed
from fastpred.data.augment import BYOLAugment
from fastpred.train import config as train_config
from fastpred.train.logs import compile_counts
from fastpred.train.loop import Trainer
from fastpred.train.run_dir import RunDir
from fastpred.train.sync_bn import SyncBatchNorm


def _run_paused(counter, fn, *args):
    with counter.paused():
        return fn(*args)


def main(out: str) -> None:
    cfg = train_config.resolve({
        "data": "synthetic", "preset": "cifar10", "backbone": "resnet18_small", "proj_hidden": 32, "proj_dim": 16,
        "batch_size": 4, "resolution": 8, "synthetic_steps": 6, "epochs": 1, "backend": "triton",
        "cuda_rehearsal": True, "spectrum_every": 0, "progress": "plain", "out": out,
    })
    rank, world_size, device = distributed.setup("cpu")
    run = RunDir.create(out, writer=rank == 0)
    trainer = Trainer(cfg, run, rank=rank, world_size=world_size, device=device)
    trainer.augment = BYOLAugment(backend="triton")  # what "auto" picks on CUDA; its CPU reference path syncs
    batches = iter(trainer.sources.train_views)
    for _ in range(2):  # the first steps allocate optimizer state and make DirectPredictor's cold solve
        trainer.train_step(*next(batches))
    counter = HostSyncCounter()
    # A CounterAlert reads its counter directly on the CPU; on CUDA it reads a copy queued a step earlier, without
    # waiting (tests/test_direct_predictor_triton.py counts that on CUDA).
    poll = CounterAlert.poll
    CounterAlert.poll = lambda self, c: _run_paused(counter, poll, self, c)
    # The online probe's Adam reads its step count with .item(): torch.optim keeps that count in a CPU tensor even
    # for CUDA parameters (unless capturable), so on a GPU those reads do not wait for the device.
    adam_step = trainer.probe.optimizer.step
    trainer.probe.optimizer.step = lambda *a, **k: _run_paused(counter, adam_step, *a, **k)
    with counter:
        for _ in range(2):
            trainer.train_step(*next(batches))
    CounterAlert.poll, trainer.probe.optimizer.step = poll, adam_step
    # torch.compile as `--compile` does it. Graph breaks are Dynamo's, before any backend: "aot_eager" also traces
    # the backward and the functional collectives, and spares the test inductor's CPU code generation.
    trainer.compile_modules(backend="aot_eager")
    for _ in range(2):
        trainer.train_step(*next(batches))
    loss = trainer._read_accumulators(interval_s=0.0)["loss"]
    pred = trainer.online.predictor
    F_sum = pred.F.double().sum().reshape(1)
    F_all = [torch.zeros_like(F_sum) for _ in range(world_size)]
    dist.all_gather(F_all, F_sum)
    first_conv = trainer.online.backbone.conv1.weight
    result = {
        "rank": rank,
        **compile_counts(),
        "host_syncs": counter.hits,
        "sync_bn_layers": sum(isinstance(m, SyncBatchNorm) for m in trainer.model.modules()),
        "target_sync_bn_layers": sum(isinstance(m, SyncBatchNorm) for m in trainer.target.modules()),
        "channels_last": first_conv.is_contiguous(memory_format=torch.channels_last),
        "amp": trainer.amp,
        "F_dtype": str(pred.F.dtype), "W_dtype": str(pred.W.dtype),
        "F_equal_on_ranks": all(torch.equal(F_all[0], f) for f in F_all),
        "loss_finite": bool(torch.isfinite(torch.tensor(loss))),
        "unconverged_solves": int(pred.unconverged_solves),
    }
    # One file per rank: lines printed by two processes at once can interleave.
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1])
