"""fastpred's training step against byol-pytorch's, component by component, in CPU time.

    python -m bench.step_profile                                   # one thread, 6 rounds x 4 steps, interleaved
    python -m bench.step_profile --variant "channels-last=--channels-last true" --rounds 8
    python -m bench.step_profile --profile 3                       # also torch.profiler tables, 3 steps each

The setting is bench.peers' (`python -m bench.peers`): Fashion-MNIST's first `--train-subset` training images held in
memory, small_cnn, projector 128 -> 256 -> 64, batch 256, SGD 0.05 / 0.9 / 4e-4, target EMA 0.99; fastpred with
the flags bench.peers gives `python -m fastpred.train` (the digits preset, 28 px, crop scale 0.3), its training
views device-resident as the trainer makes them; byol-pytorch 0.8.2 as its README shows, its default augmentation.

Why CPU time (`time.process_time`) at one torch thread: the machine this was written on is shared and loaded, so
wall-clock times drift by several times between runs; a single thread's CPU time is what the step costs whatever
the neighbours do. The systems (and fastpred's variants) run in turns, round after round, in one process, so slow
drifts hit all of them alike; the statistic is the median per step over all rounds, warm-up steps excluded.

Components: each system's modules are timed by forward hooks (augmentation, backbones, projectors, predictor),
and its calls by wrappers (backward, optimizer step, target EMA, fastpred's online probe); "data" is fastpred's
resident crop of both views (`ResidentViews`) and byol-pytorch's batch gather and /255; "rest" is the step less
all of these (fastpred: lr schedule, concatenation, loss, metrics and the loop's guard; byol-pytorch: its loss).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from collections import defaultdict

import torch

from bench.peers import Protocol, fashion_mnist, fastpred_command, small_cnn

COMPONENTS = ("data", "augmentation", "online backbone fwd", "online projector+predictor fwd", "target fwd",
              "backward", "optimizer", "target EMA", "online probe", "rest", "step", "wall")


class Sections:
    """CPU seconds per component of the current step; `add` is a context manager around a component."""

    def __init__(self):
        self.now: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self._depth = 0

    @contextlib.contextmanager
    def add(self, name: str):
        # Nested sections (a hook inside a wrapped call) are charged to the outer one only.
        self._depth += 1
        t = time.process_time()
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.now[name] += time.process_time() - t

    def hook(self, module: torch.nn.Module, name: str) -> None:
        starts: list[float] = []

        def pre(*_):
            self._depth += 1
            starts.append(time.process_time())

        def post(*_):
            self._depth -= 1
            t = starts.pop()
            if self._depth == 0:
                self.now[name] += time.process_time() - t

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            with self.add(name):
                return fn(*args, **kwargs)

        setattr(obj, attr, timed)

    def step(self, run, record: bool) -> None:
        self.now = defaultdict(float)
        t, w = time.process_time(), time.perf_counter()
        run()
        total, wall = time.process_time() - t, time.perf_counter() - w
        if record:
            parts = dict(self.now)
            parts["rest"] = total - sum(parts.values())
            parts["step"] = total
            parts["wall"] = wall
            self.steps.append(parts)

    def medians(self) -> dict[str, float]:
        return {k: 1e3 * statistics.median(s.get(k, 0.0) for s in self.steps) for k in COMPONENTS}


class Backward:
    """Times every `Tensor.backward` call into whichever system's Sections is active."""

    active: Sections | None = None
    _orig = torch.Tensor.backward

    @classmethod
    def install(cls) -> None:
        def backward(self, *args, **kwargs):
            if cls.active is None:
                return cls._orig(self, *args, **kwargs)
            with cls.active.add("backward"):
                return cls._orig(self, *args, **kwargs)

        torch.Tensor.backward = backward


def fastpred_system(p: Protocol, extra: str, images: torch.Tensor, labels: torch.Tensor, seed: int):
    """A fastpred Learner and its resident views, configured as bench.peers runs `python -m fastpred.train`, and
    one step as the trainer's loop takes it (`Trainer._fit`: next views, `train_step`, the divergence guard)."""
    from fastpred.data.resident import ResidentViews
    from fastpred.train.config import build_parser, resolve
    from fastpred.train.guard import DivergenceGuard
    from fastpred.train.step import Learner

    p2 = Protocol(**{**p.__dict__, "fastpred_args": extra})
    cmd = fastpred_command(p2, seed, "unused", "unused", "unused")
    argv = cmd[cmd.index("fastpred.train") + 1:]
    given = vars(build_parser().parse_args(argv))
    given.pop("data"), given.pop("val")
    cfg = resolve({**given, "data": "synthetic"})
    device = torch.device("cpu")
    views = ResidentViews(images, labels, cfg.batch_size, cfg.resolution, scale=(cfg.crop_scale, 1.0), seed=seed,
                          device=device)
    learner = Learner(cfg, rank=0, world_size=1, device=device, num_classes=10, steps_per_epoch=len(views))
    guard = DivergenceGuard.__new__(DivergenceGuard)  # only its device counter: no run folder needed
    guard.nonfinite = torch.zeros(2, device=device)
    sec = Sections()
    sec.hook(learner.augment.view1, "augmentation")
    sec.hook(learner.augment.view2, "augmentation")
    sec.hook(learner.online.backbone, "online backbone fwd")
    sec.hook(learner.online.projector, "online projector+predictor fwd")
    if learner.online.predictor is not None:
        sec.hook(learner.online.predictor, "online projector+predictor fwd")
    sec.hook(learner.target.backbone, "target fwd")
    sec.hook(learner.target.projector, "target fwd")
    sec.wrap(learner.optimizer, "step", "optimizer")
    sec.wrap(learner.probe, "step", "online probe")
    import fastpred.train.step as step_module

    ema = step_module.ema_update_

    def timed_ema(*args, **kwargs):
        with sec.add("target EMA"):
            return ema(*args, **kwargs)

    state = {"it": None, "epoch": 0}

    def next_batch():
        while True:
            if state["it"] is None:
                views.set_epoch(state["epoch"])
                state["it"], state["epoch"] = iter(views), state["epoch"] + 1
            with contextlib.suppress(StopIteration):
                return next(state["it"])
            state["it"] = None

    def run():
        step_module.ema_update_ = timed_ema
        try:
            with sec.add("data"):
                x1, x2, y = next_batch()
            learner.train_step(x1, x2, y)
            guard.after_step(learner.health_count("nonfinite_loss"))
        finally:
            step_module.ema_update_ = ema

    return sec, run, learner


def byol_system(p: Protocol, images: torch.Tensor, seed: int):
    """byol-pytorch's step as bench.peers runs it (`_train_byol_pytorch`)."""
    from byol_pytorch import BYOL

    torch.manual_seed(seed)
    net, _ = small_cnn()
    learner = BYOL(net, image_size=p.resolution, hidden_layer=-1, projection_size=p.proj_dim,
                   projection_hidden_size=p.proj_hidden, moving_average_decay=p.target_ema)
    opt = torch.optim.SGD(learner.parameters(), lr=p.lr, momentum=p.momentum, weight_decay=p.weight_decay)
    sec = Sections()
    sec.hook(learner.augment1, "augmentation")
    if learner.augment2 is not learner.augment1:
        sec.hook(learner.augment2, "augmentation")
    sec.hook(learner.online_encoder.net, "online backbone fwd")
    sec.hook(learner.online_encoder.projector, "online projector+predictor fwd")
    sec.hook(learner.online_predictor, "online projector+predictor fwd")
    sec.hook(learner.target_encoder, "target fwd")
    sec.wrap(opt, "step", "optimizer")
    sec.wrap(learner, "update_moving_average", "target EMA")
    g = torch.Generator().manual_seed(seed)

    def run():
        with sec.add("data"):
            idx = torch.randint(len(images), (p.batch_size,), generator=g)
            x = images[idx].float().div_(255.0)
        loss = learner(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        learner.update_moving_average()

    return sec, run, learner


def profile_table(run, steps: int, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4, help="steps per system per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--train-subset", type=int, default=5120)
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME=FLAGS: a fastpred variant with extra `python -m fastpred.train` flags")
    parser.add_argument("--no-byol", action="store_true", help="fastpred only")
    parser.add_argument("--no-base", action="store_true", help="only the --variant runs of fastpred")
    parser.add_argument("--profile", type=int, default=0, help="torch.profiler tables of this many steps each")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    p = Protocol(train_subset=args.train_subset, threads=args.threads)
    images, labels = fashion_mnist("train", p.train_subset)
    Backward.install()
    systems: dict[str, tuple] = {}
    variants = ([] if args.no_base else [("fastpred", "")]) + [
        (f"fastpred [{v.split('=', 1)[0]}]", v.split("=", 1)[1]) for v in args.variant]
    for name, extra in variants:
        systems[name] = fastpred_system(p, extra, images, labels, seed=0)[:2]
    if not args.no_byol:
        systems["byol-pytorch"] = byol_system(p, images, seed=0)[:2]
    for sec, run in systems.values():
        Backward.active = sec
        for _ in range(args.warmup):
            sec.step(run, record=False)
    loads = [os.getloadavg()[0]]
    names = list(systems)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            sec, run = systems[name]
            Backward.active = sec
            for _ in range(args.steps):
                sec.step(run, record=True)
        loads.append(os.getloadavg()[0])
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps per "
          f"system, interleaved; CPU ms per step, median; load average (1 min) during the run "
          f"{min(loads):.1f}-{max(loads):.1f}")
    medians = {name: systems[name][0].medians() for name in names}
    print("| component | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for c in COMPONENTS:
        print(f"| {c} | " + " | ".join(f"{medians[n][c]:.1f}" for n in names) + " |")
    spread = {n: [1e3 * s["step"] for s in systems[n][0].steps] for n in names}
    print("| step min-max | " + " | ".join(f"{min(v):.0f}-{max(v):.0f}" for v in spread.values()) + " |")
    if args.profile:
        for name in names:
            sec, run = systems[name]
            Backward.active = sec
            print(f"\n## torch.profiler, {name}, {args.profile} steps, {args.threads} thread(s)")
            print(profile_table(run, args.profile, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
