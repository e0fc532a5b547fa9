"""SyncBatchNorm over two gloo processes against nn.BatchNorm fed the concatenated batch in one process.

One spawn of two ranks runs every distributed scenario (process start-up and compilation dominate the time)
and saves what each rank saw; the tests below compare those results with single-process references.
"""

import copy
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from host_syncs import HostSyncCounter
from torch import nn

from fastpred.train.sync_bn import SyncBatchNorm, convert_sync_batchnorm

# name: (BatchNorm class, its kwargs, per-sample shape (C, ...), rows of rank 0 and rank 1, steps, own group)
CASES = {
    "2d": (nn.BatchNorm2d, {}, (4, 5, 3), (3, 5), 3, False),
    "1d_cumulative": (nn.BatchNorm1d, {"momentum": None}, (6,), (1, 6), 3, False),  # 1 row: local BN would fail
    "1d_seq_empty_shard": (nn.BatchNorm1d, {"affine": False}, (3, 7), (0, 4), 2, True),
    "3d": (nn.BatchNorm3d, {"eps": 1e-3, "momentum": 0.3}, (2, 2, 3, 3), (2, 3), 2, False),
}
BF16_SHARDS = (3, 5)
OFFSET = 1000.0  # mean / std of the offset case: the plain E[x^2] - mean^2 in fp32 loses ~6% of the variance


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(shards: tuple[int, int], rank: int) -> slice:
    return slice(sum(shards[:rank]), sum(shards[: rank + 1]))


def _bn(cls, kwargs: dict, c: int, seed: int) -> nn.Module:
    """A BatchNorm with non-trivial affine parameters and running statistics."""
    bn = cls(c, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if bn.affine:
            bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
            bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def _case_data(name: str) -> dict:
    cls, kwargs, shape, shards, steps, _ = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    n = sum(shards)
    return {
        "init": _bn(cls, kwargs, shape[0], seed=n).state_dict(),
        "x": [torch.randn(n, *shape, generator=g) * 2 + 0.5 for _ in range(steps)],
        "dy": [torch.randn(n, *shape, generator=g) for _ in range(steps)],
    }


def _small_model(momentum: float | None = 0.1) -> nn.Module:
    """A conv-BN-ReLU backbone and a BYOL-style projector (Linear-BN1d-ReLU-Linear)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8, momentum=momentum), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 16), nn.BatchNorm1d(16, momentum=momentum), nn.ReLU(), nn.Linear(16, 4),
    )


def _train_steps(model: nn.Module, xs: list[torch.Tensor], dys: list[torch.Tensor]) -> list[dict]:
    """Per step: output, input gradient and parameter gradients of sum(model(x) * dy)."""
    seen = []
    for x, dy in zip(xs, dys, strict=True):
        x = x.clone().requires_grad_(True)
        y = model(x)
        (y.float() * dy).sum().backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        seen.append({"y": y.detach(), "dx": x.grad, "grads": grads})
    return seen


# --- the two ranks -------------------------------------------------------------------------------------------
def _rank_main(rank: int, port: int, data: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # A collective that only one rank enters fails after the timeout instead of hanging the test run.
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        out = {}
        for name, (cls, kwargs, shape, shards, _, own_group) in CASES.items():
            d, rows = data[name], _rows(shards, rank)
            group = dist.new_group([0, 1]) if own_group else None
            bn = convert_sync_batchnorm(cls(shape[0], **kwargs), process_group=group)
            bn.load_state_dict(d["init"])
            seen = _train_steps(bn, [x[rows] for x in d["x"]], [dy[rows] for dy in d["dy"]])
            res = {"steps": seen, "state": copy.deepcopy(bn.state_dict())}
            if rank == 1:  # eval on one rank alone: a collective here would time out
                bn.eval()
                plain = cls(shape[0], **kwargs)
                plain.load_state_dict(bn.state_dict())
                plain.eval()
                res["eval"] = (bn(d["x"][-1][rows]), plain(d["x"][-1][rows]))
            out[name] = res

        rows = _rows(BF16_SHARDS, rank)
        bn = convert_sync_batchnorm(_bn(nn.BatchNorm2d, {}, 4, seed=1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            seen = _train_steps(bn, [data["bf16"]["x"][rows]], [data["bf16"]["dy"][rows]])
        out["bf16"] = {"steps": seen, "state": copy.deepcopy(bn.state_dict())}

        rows = _rows((8, 8), rank)
        bn = convert_sync_batchnorm(nn.BatchNorm1d(5, affine=False))
        out["offset"] = [bn(x[rows]) for x in data["offset"]]

        model = convert_sync_batchnorm(_small_model(momentum=None))
        x, dy = data["model"]["x"][0][_rows((3, 5), rank)], data["model"]["dy"][0][_rows((3, 5), rank)]
        with HostSyncCounter() as counter:
            _train_steps(model, [x, x], [dy, dy])
        out["host_syncs"] = counter.hits

        # As the trainer runs it: DDP without buffer broadcast, channels_last activations.
        model = nn.parallel.DistributedDataParallel(convert_sync_batchnorm(_small_model()), broadcast_buffers=False)
        xs = [x[_rows((3, 5), rank)].contiguous(memory_format=torch.channels_last) for x in data["model"]["x"]]
        out["ddp"] = _train_steps(model, xs, [dy[_rows((3, 5), rank)] for dy in data["model"]["dy"]])

        out["compile"] = _compiled_vs_eager(rank, data["model"])
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _compiled_vs_eager(rank: int, data: dict) -> dict:
    """Rank 0 compiled, rank 1 eager (the collectives pair up the same: one compilation instead of two)."""
    import torch._dynamo.utils as dynamo_utils

    eager = convert_sync_batchnorm(_small_model())
    compiled = copy.deepcopy(eager)
    if rank == 0:
        compiled.compile()  # in place, as the trainer compiles: parameter names stay those of the eager model
    rows = _rows((4, 4), rank)
    xs, dys = [x[rows] for x in data["x"]], [dy[rows] for dy in data["dy"]]
    dynamo_utils.counters.clear()
    # Two steps: the second reads the shift and running statistics that the first compiled step wrote.
    seen_compiled = _train_steps(compiled, xs, dys)
    breaks = sum(dynamo_utils.counters["graph_break"].values())
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    seen_eager = _train_steps(eager, xs, dys)
    return {
        "breaks": breaks, "graphs": graphs, "compiled": seen_compiled, "eager": seen_eager,
        "state_compiled": compiled.state_dict(), "state_eager": eager.state_dict(),
    }


@pytest.fixture(scope="module")
def data() -> dict:
    g = torch.Generator().manual_seed(7)
    out = {name: _case_data(name) for name in CASES}
    out["bf16"] = {"x": torch.randn(8, 4, 3, 3, generator=g).bfloat16() * 3 - 1,
                   "dy": torch.randn(8, 4, 3, 3, generator=g)}
    out["offset"] = [torch.randn(16, 5, generator=g) + OFFSET for _ in range(2)]
    out["model"] = {"x": [torch.randn(8, 3, 8, 8, generator=g) for _ in range(2)],
                    "dy": [torch.randn(8, 4, generator=g) for _ in range(2)]}
    return out


@pytest.fixture(scope="module")
def ranks(data, tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_rank_main, args=(_free_port(), data, str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


# --- two ranks against one process ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_match_batchnorm_on_the_concatenated_batch(ranks, data, name):
    cls, kwargs, shape, _, _, _ = CASES[name]
    ref = cls(shape[0], **kwargs)
    ref.load_state_dict(data[name]["init"])
    expected = _train_steps(ref, data[name]["x"], data[name]["dy"])
    for step, want in enumerate(expected):
        got = [r[name]["steps"][step] for r in ranks]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), want["y"])
        torch.testing.assert_close(torch.cat([g["dx"] for g in got]), want["dx"])
        for k, grad in want["grads"].items():  # each rank holds its share; DDP would sum them
            torch.testing.assert_close(got[0]["grads"][k] + got[1]["grads"][k], grad)
    for r in ranks:
        torch.testing.assert_close(r[name]["state"], ref.state_dict(), rtol=1e-6, atol=1e-7)
    eval_sync, eval_plain = ranks[1][name]["eval"]
    assert torch.equal(eval_sync, eval_plain)


def test_bf16_autocast_keeps_fp32_statistics_and_returns_bf16(ranks, data):
    x, dy = data["bf16"]["x"], data["bf16"]["dy"]
    ref = _bn(nn.BatchNorm2d, {}, 4, seed=1)
    want = _train_steps(ref, [x.float()], [dy])[0]  # the same bf16 values, everything in fp32
    got = [r["bf16"]["steps"][0] for r in ranks]
    assert all(g["y"].dtype == torch.bfloat16 and g["dx"].dtype == torch.bfloat16 for g in got)
    # fp32 statistics: the running statistics agree to fp32 precision; bf16 sums would be off by ~1e-2.
    for r in ranks:
        torch.testing.assert_close(r["bf16"]["state"], ref.state_dict(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.cat([g["y"] for g in got]), want["y"].bfloat16())
    torch.testing.assert_close(torch.cat([g["dx"] for g in got]), want["dx"].bfloat16(), rtol=2e-2, atol=2e-2)
    for k, grad in want["grads"].items():
        torch.testing.assert_close(got[0]["grads"][k] + got[1]["grads"][k], grad, rtol=2e-2, atol=2e-2)


def test_statistics_stay_accurate_when_the_mean_dwarfs_the_spread(ranks, data):
    """From the second step on, the shared shift (the previous global mean) removes the cancellation."""
    x = data["offset"][1]
    ref = nn.BatchNorm1d(5, affine=False).double()(x.double())
    torch.testing.assert_close(torch.cat([r["offset"][1] for r in ranks]).double(), ref, rtol=1e-4, atol=1e-4)
    # The data are hard: the plain fp32 formula is off by far more than the tolerance above.
    naive_var = (x * x).mean(0) - x.mean(0) ** 2
    assert ((naive_var.double() - x.double().var(0, unbiased=False)).abs() > 1e-3).any()


def test_training_step_never_waits_on_the_host(ranks):
    assert [r["host_syncs"] for r in ranks] == [[], []]


def test_under_ddp_gradients_are_those_of_the_global_batch(ranks, data):
    want = _train_steps(_small_model(), data["model"]["x"], data["model"]["dy"])
    for step, w in enumerate(want):
        got = [r["ddp"][step] for r in ranks]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), w["y"])
        torch.testing.assert_close(torch.cat([g["dx"] for g in got]), w["dx"])
        for g in got:  # DDP averages the ranks' shares of sum(y * dy): half the one-process gradient
            grads = {k.removeprefix("module."): v for k, v in g["grads"].items()}
            torch.testing.assert_close(grads, {k: v / 2 for k, v in w["grads"].items()}, rtol=1e-5, atol=1e-5)


def test_compiled_model_has_no_graph_break_and_matches_eager(ranks):
    c = ranks[0]["compile"]
    assert c["graphs"] >= 1 and c["breaks"] == 0
    for got, want in zip(c["compiled"], c["eager"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # Inductor reorders fp32 sums
    torch.testing.assert_close(c["state_compiled"], c["state_eager"], rtol=1e-5, atol=1e-6)


# --- one process ---------------------------------------------------------------------------------------------
class _ItemModule(nn.Module):
    def forward(self, x):
        return x * x.abs().max().item()


@pytest.mark.parametrize(
    "fn",
    [
        _ItemModule(),
        lambda x: x[x > 0].sum(),  # boolean mask
        nn.BatchNorm1d(3, momentum=None),  # float(num_batches_tracked) for the cumulative average
    ],
    ids=["item", "bool_mask", "batchnorm_cumulative"],
)
def test_host_sync_counter_catches_syncs(fn):
    x = torch.randn(4, 3, requires_grad=True)
    with HostSyncCounter() as counter:
        fn(x).sum().backward()
    assert counter.hits


def test_host_sync_counter_passes_plain_ops():
    x = torch.randn(4, 3, requires_grad=True)
    with HostSyncCounter() as counter:
        nn.BatchNorm1d(3)(x * 2).sum().backward()
    assert counter.hits == []


@pytest.fixture(params=["no_group", "world_of_one"])
def single_process(request):
    if request.param == "no_group":
        yield
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("name", ["2d", "1d_cumulative", "3d"])
def test_one_process_and_eval_mode_are_batchnorm_exactly(single_process, data, name):
    cls, kwargs, shape, _, _, _ = CASES[name]
    plain = cls(shape[0], **kwargs)
    plain.load_state_dict(data[name]["init"])
    synced = convert_sync_batchnorm(copy.deepcopy(plain))
    assert isinstance(synced, SyncBatchNorm)
    got = _train_steps(synced, data[name]["x"], data[name]["dy"])
    want = _train_steps(plain, data[name]["x"], data[name]["dy"])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    torch.testing.assert_close(synced.state_dict(), plain.state_dict(), rtol=0, atol=0)
    synced.eval()
    plain.eval()
    assert torch.equal(synced(data[name]["x"][0]), plain(data[name]["x"][0]))


def test_convert_keeps_state_dict_keys_values_and_tensors():
    from torchvision.models import resnet18

    from fastpred.core.models import build_projector

    for build in (lambda: resnet18(num_classes=10), lambda: build_projector(32, 64, 16)):
        torch.manual_seed(0)
        plain = build()
        for m in plain.modules():  # non-default statistics, so that a copy is told from a fresh layer
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.num_batches_tracked.fill_(3)
        before = {k: v.clone() for k, v in plain.state_dict().items()}
        bn_count = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
        params = {id(p) for p in plain.parameters()}
        synced = convert_sync_batchnorm(plain)
        assert bn_count > 0 and sum(isinstance(m, SyncBatchNorm) for m in synced.modules()) == bn_count
        assert {id(p) for p in synced.parameters()} == params  # an optimizer built before still applies
        torch.testing.assert_close(synced.state_dict(), before, rtol=0, atol=0)
        torch.manual_seed(1)
        fresh_plain, fresh_synced = build(), convert_sync_batchnorm(build())
        fresh_plain.load_state_dict(synced.state_dict())
        fresh_synced.load_state_dict(fresh_plain.state_dict())
        torch.testing.assert_close(fresh_synced.state_dict(), before, rtol=0, atol=0)


def test_convert_copies_hyperparameters():
    bn = nn.BatchNorm1d(5, eps=1e-3, momentum=None, affine=False, track_running_stats=False).eval()
    synced = convert_sync_batchnorm(bn)
    assert isinstance(synced, SyncBatchNorm) and not synced.training
    assert (synced.eps, synced.momentum, synced.affine, synced.track_running_stats) == (1e-3, None, False, False)
    with pytest.raises(ValueError):
        synced(torch.randn(5))
