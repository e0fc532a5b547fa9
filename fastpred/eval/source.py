"""What `python -m fastpred.eval` evaluates: the backbone of a fastpred checkpoint, or a bare backbone state dict in
torchvision's layout (another project's encoder), loaded without running any code from the file; and the settings
of the run that trained it, read from its config.json."""

from __future__ import annotations

import dataclasses
import json
import types
from pathlib import Path

import torch
from torch import nn

from fastpred.core.files import load_data


class EvalError(ValueError):
    """A request `python -m fastpred.eval` cannot run; printed as one `error:` line."""


@dataclasses.dataclass(frozen=True)
class RunSettings:
    """The settings of a training run that its evaluation follows, by the trainer's names (`fastpred.train.config`
    writes every setting to RUN_DIR/config.json; the others do not matter here)."""

    data: str  # the training .beton, a named source or "synthetic"
    val: str | None  # the held-out .beton, if one was given
    backbone: str
    resolution: int
    batch_size: int  # per process; the probes' batch is max(this, 256)
    workers: int
    seed: int
    amp: bool
    knn_k: int
    final_probe_epochs: int


def read_run_settings(path: Path) -> RunSettings:
    """The RunSettings in a run's config.json; a file that is not one (damaged, another program's) is an EvalError."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EvalError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    values = {}
    for field in dataclasses.fields(RunSettings):
        kinds = field.type.split(" | ")  # the annotations are strings (postponed evaluation)
        allowed = tuple({"str": str, "int": int, "bool": bool, "None": types.NoneType}[k] for k in kinds)
        value = saved.get(field.name) if isinstance(saved, dict) else None
        # bool is an int in Python; a setting's JSON type is the dataclass's exactly.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise EvalError(f"{path} is not a fastpred run's config: {field.name} is {value!r}")
        values[field.name] = value
    return RunSettings(**values)


def read_backbone_state(path: Path) -> tuple[dict[str, torch.Tensor], int | None, str | None]:
    """(backbone state dict, the checkpoint's step or None, the architecture it names or None) of `path`.

    Accepted: a fastpred checkpoint (its "backbone" entry, step and config), or a dict of tensors (a bare
    backbone state dict). Loaded with ``weights_only=True``: a file from elsewhere is data, never code."""
    if not path.is_file():
        raise EvalError(f"no checkpoint at {path}")
    state = load_data(path, EvalError, "checkpoint ")
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        return state, None, None
    if isinstance(state, dict) and _is_state_dict(state.get("backbone")):
        config = state.get("config") if isinstance(state.get("config"), dict) else {}
        step = state.get("step")
        return state["backbone"], int(step) if isinstance(step, int) else None, config.get("backbone")
    raise EvalError(f"{path} has no backbone: expected a fastpred checkpoint (with a 'backbone' entry) or a "
                    "backbone state dict (parameter name -> tensor)")


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def load_backbone(state: dict[str, torch.Tensor], arch: str, path: Path) -> tuple[nn.Module, int]:
    """`arch`'s backbone (`fastpred.core.models.build_backbone`) holding `state`, and its feature width.

    A torchvision classifier's `fc.weight` / `fc.bias` are dropped (the backbone's fc is the identity; the
    protocols train their own head). Any other missing or unexpected key, or a shape that differs, is an
    EvalError naming the first of each."""
    from fastpred.core.models import build_backbone

    backbone, feat_dim = build_backbone(arch)
    expected = backbone.state_dict()
    if arch != "small_cnn":
        state = {k: v for k, v in state.items() if k not in ("fc.weight", "fc.bias")}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {arch}'s keys missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise EvalError(f"the backbone in {path} does not match --arch {arch}: {', '.join(parts)}")
    for key, value in expected.items():
        if state[key].shape != value.shape:
            raise EvalError(f"the backbone in {path} does not match --arch {arch}: {key} has shape "
                            f"{tuple(state[key].shape)}, {arch} needs {tuple(value.shape)}")
    backbone.load_state_dict(state)
    return backbone, feat_dim
