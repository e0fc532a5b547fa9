"""`kernels/` installs as `fastpred.kernels`, in an editable install and in a built wheel, never as `kernels`."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROBE = (
    "import importlib.util, fastpred.kernels as k; "
    "assert importlib.util.find_spec('kernels') is None, 'a top-level kernels package is importable'; "
    "print(k.__file__)"
)


def _run_python(code: str, cwd: Path, extra_path: str | None = None) -> str:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_path:
        env["PYTHONPATH"] = extra_path
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_installed_package_exposes_fastpred_kernels_only(tmp_path):
    # Run away from the repository root, where the source folder `kernels/` would shadow the install.
    location = Path(_run_python(PROBE, cwd=tmp_path))
    assert location == REPO / "kernels" / "__init__.py"


def test_wheel_holds_fastpred_kernels_and_no_top_level_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), REPO],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("fastpred-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fastpred/kernels/__init__.py" in names
    assert not [n for n in names if n.startswith("kernels/")]
    # Every subpackage is listed in pyproject.toml (a new one missing there would be absent from the wheel).
    packages = {p.relative_to(REPO).as_posix() for p in (REPO / "fastpred").rglob("__init__.py")}
    assert packages <= set(names), sorted(packages - set(names))
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    location = Path(_run_python(PROBE, cwd=tmp_path, extra_path=str(target)))
    assert location == target / "fastpred" / "kernels" / "__init__.py"


def test_kernels_are_the_bottom_layer():
    # fastpred.kernels imports torch, triton and itself only; fastpred's torch code takes shared helpers from it.
    import ast

    for path in sorted((REPO / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                assert not name.startswith("fastpred") or name.startswith("fastpred.kernels"), (path.name, name)


WITHOUT_TRITON = """
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTriton())
import torch
import fastpred
from fastpred import DirectPredictor
from fastpred.numerics import full_fp32_matmul
pred = DirectPredictor(8)
pred(torch.randn(16, 8))
assert int(pred.num_folds) == 1 and "triton" not in sys.modules
try:
    from fastpred.kernels import corr_ema
except ModuleNotFoundError as e:
    print("kernels need", e.name)
"""


def test_import_fastpred_needs_torch_only():
    # DESIGN.md, packaging: the drop-in predictor (torch backend) works where triton is missing; the kernels load
    # on first use, so importing fastpred (which takes torch-only helpers from fastpred.kernels) imports no triton.
    assert _run_python(WITHOUT_TRITON, cwd=REPO) == "kernels need triton"
