"""`python -m fastpred.dynamics [--out DIR] [subcommand] [flags]`: the papers' dynamics as figures.

Without a subcommand every figure is drawn with its defaults. Each subcommand prints the paths it writes.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

SUBCOMMANDS = ("phase", "regimes", "sweep", "matrix", "race")


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _pair(text: str) -> tuple[float, float]:
    lo, hi = _floats(text)
    return lo, hi


def _add_dataclass_flags(p: argparse.ArgumentParser, cls) -> None:
    """One --flag per dataclass field, typed by its default (None-defaults take floats)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            kind = float if f.default is None else type(f.default)
            p.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")


def build_parser() -> argparse.ArgumentParser:
    from fastpred.dynamics.matrix import MatrixFlowConfig
    from fastpred.dynamics.race import RaceConfig

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", type=Path, default=Path("figures"), help="folder for the PNGs (default figures/)")
    parser = argparse.ArgumentParser(prog="python -m fastpred.dynamics", description=__doc__, parents=[common])
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("phase", parents=[common], help="Fig. 3: phase portraits of (11)-(12) in the (p, s) plane")
    p.add_argument("--etas", type=_floats, default=[0.0, 0.01, 1.0], help="comma-separated weight decays")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--alpha-p", type=float, default=1.0)
    p.add_argument("--sigma2", type=float, default=0.0)
    p.add_argument("--p-range", type=_pair, default=(-0.4, 1.4), help="lo,hi")
    p.add_argument("--s-range", type=_pair, default=(0.0, 1.6), help="lo,hi")
    p.add_argument("--grid", type=int, default=60, help="streamplot grid points per axis")

    p = sub.add_parser("regimes", parents=[common], help="Fig. 4: the 1-D dynamics of p on the parabola")
    p.add_argument("--etas", type=_floats, default=None, help="default: 0, 0.6 and 1.6 x the collapse threshold")
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--sigma2", type=float, default=0.0)

    p = sub.add_parser("sweep", parents=[common], help="Fig. 5: Euler simulation of (11)-(13), eta and beta sweeps")
    p.add_argument("--lr", type=float, default=0.01, help="Euler step alpha")
    p.add_argument("--beta", type=float, default=0.4, help="EMA rate while sweeping eta")
    p.add_argument("--eta", type=float, default=0.04, help="weight decay while sweeping beta")
    p.add_argument("--etas", type=_floats, default=[0.01, 0.04, 0.1, 0.2, 0.3])
    p.add_argument("--betas", type=_floats, default=[0.04, 0.1, 0.4, 1.0])
    p.add_argument("--alpha-p", type=float, default=1.0)
    p.add_argument("--sigma2", type=float, default=0.0)
    p.add_argument("--p0", type=float, default=0.2)
    p.add_argument("--s0", type=float, default=0.5)
    p.add_argument("--tau0", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=5000)

    p = sub.add_parser("matrix", parents=[common], help="the full-matrix flow (2)-(4) for small n")
    _add_dataclass_flags(p, MatrixFlowConfig)

    p = sub.add_parser("race", parents=[common], help="the feature race (no head, off-diagonal head, DirectPred)")
    _add_dataclass_flags(p, RaceConfig)
    return parser


def run(args: argparse.Namespace) -> list[Path]:
    """Draw the figure of ``args.command``; returns the paths written."""
    from fastpred.dynamics import figures

    out: Path = args.out
    if args.command == "phase":
        return [figures.phase_portraits(out / "phase_portrait.png", args.etas, tau=args.tau, alpha_p=args.alpha_p,
                                        sigma2=args.sigma2, p_range=args.p_range, s_range=args.s_range,
                                        grid=args.grid)]
    if args.command == "regimes":
        return [figures.regimes(out / "regimes.png", args.etas, tau=args.tau, sigma2=args.sigma2)]
    if args.command == "sweep":
        return [figures.sweeps(out / "sweeps.png", lr=args.lr, beta=args.beta, eta=args.eta, etas=args.etas,
                               betas=args.betas, alpha_p=args.alpha_p, sigma2=args.sigma2, p0=args.p0, s0=args.s0,
                               tau0=args.tau0, steps=args.steps)]
    if args.command == "matrix":
        from fastpred.dynamics.matrix import MatrixFlowConfig, simulate_matrix_flow

        cfg = MatrixFlowConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MatrixFlowConfig)})
        traj = simulate_matrix_flow(cfg)
        print(f"matrix: ||[F, W_p]|| {traj.commutator[0]:.3g} -> {traj.commutator[-1]:.3g}, "
              f"asymmetry {traj.asymmetry[0]:.3g} -> {traj.asymmetry[-1]:.3g}, min lambda(K) {traj.k_min.min():.3g}")
        return [figures.matrix_flow(out / "matrix_flow.png", traj, cfg)]
    if args.command == "race":
        from fastpred.dynamics.race import HEADS, RaceConfig, run_race

        cfg = RaceConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RaceConfig)})
        results = [run_race(cfg, head) for head in HEADS]
        for r in results:
            c = r.outcome()
            print(f"race {r.head}: {c['runs_with_v2']} of {c['runs']} runs with a neuron on v2; of "
                  f"{c['neurons']} neurons {c['on_v1']} on v1, {c['on_v2']} on v2, {c['neither']} on neither")
        return [figures.feature_race(out / "feature_race.png", results)]
    raise ValueError(f"unknown command {args.command!r}")


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = [args.command] if args.command else list(SUBCOMMANDS)
    written = []
    for command in commands:
        # without a subcommand, each figure gets its own defaults and the shared --out
        sub_args = args if args.command else parser.parse_args([command, "--out", str(args.out)])
        for path in run(sub_args):
            print(path)
            written.append(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
