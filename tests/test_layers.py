"""The package's layers: `fastpred.core` under both `fastpred.train` and `fastpred.eval`, evaluation importing nothing
of the trainer, and the trainer using evaluation through its public functions only. Read from the source (every
import, including those inside functions), and checked once in a fresh interpreter through sys.modules."""

import ast
import subprocess
import sys
from pathlib import Path

import fastpred.eval

PACKAGE = Path(fastpred.eval.__file__).resolve().parents[1]


def _imports(path: Path, package: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names) of every import statement in `path` (a module of `package`, by default the
    one its place under fastpred/ gives), relative ones resolved."""
    if package is None:
        package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _offences(subpackage: str, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in sorted((PACKAGE / subpackage).rglob("*.py")):
        for line, module, names in _imports(path):
            # `from fastpred import train` names the package through its names, not its module.
            targets = [module] + [f"{module}.{name}" for name in names if module == "fastpred"]
            if any(_within(t, f) for t in targets for f in forbidden):
                out.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module} {names}")
    return out


def test_the_checker_resolves_relative_and_nested_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("import torch\nfrom . import knn\ndef f():\n    from ..train.loop import Trainer\n")
    assert _imports(module, "fastpred.eval") == [
        (1, "torch", []), (2, "fastpred.eval", ["knn"]), (4, "fastpred.train.loop", ["Trainer"])]


def test_eval_imports_nothing_of_the_trainer():
    assert _offences("eval", ("fastpred.train",)) == []


def test_core_imports_neither_the_trainer_nor_evaluation():
    assert _offences("core", ("fastpred.train", "fastpred.eval")) == []


def test_the_trainer_uses_evaluation_through_its_public_functions_only():
    public = set(fastpred.eval.__all__)
    bad = []
    for path in sorted((PACKAGE / "train").rglob("*.py")):
        for line, module, names in _imports(path):
            if _within(module, "fastpred.eval") and (module != "fastpred.eval" or not set(names) <= public):
                bad.append(f"{path.name}:{line} imports {module} {names}")
    assert bad == []


def test_python_m_fastpred_eval_loads_no_trainer_module():
    code = ("import sys; import fastpred.eval.__main__, fastpred.eval.linear, fastpred.eval.source; "
            "print(sorted(m for m in sys.modules if m == 'fastpred.train' or m.startswith('fastpred.train.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
