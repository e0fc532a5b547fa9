"""The commands in README.md and docs/*.md work.

Every fenced bash block is read as shell lines; each `python -m <module>` of this repository (fastpred, bench) in
it, also behind `torchrun` or `python -m fastpred.train.torchrun`, is checked:
- the module exists (`importlib.util.find_spec`);
- its flags are accepted: by `fastpred.train.config.build_parser()` and then `config.resolve` (so a flag that
  does not apply to the preset or predictor fails too), by the `build_parser()` of `fastpred.eval` (and its flag
  checks) and `fastpred.dynamics`, by torchrun's own parser for the launchers, and for every other module by the
  options its `--help` lists (one subprocess per module);
- a block marked with `<!-- run-in-tests -->` on the line before it is run, command by command, on the digits, in
  a temporary folder with a temporary FASTPRED_CACHE, with OVERRIDES appended (two training steps, a one-epoch
  probe). Its commands run in one Python process, one after the other, as `python -m` would run them (runpy), so
  that torch, FFCV and numba's compiled loaders are paid for once; a non-zero exit fails the test.
Blocks that need data this machine lacks (imagenet.beton) are left unmarked: their flags are checked only.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- run-in-tests -->"
OWN = ("fastpred", "bench")  # top-level packages whose commands are checked
#: Modules whose parser the test builds itself; every other module's options come from its --help.
PARSED = frozenset({"fastpred.train", "fastpred.eval", "fastpred.dynamics"})
#: Appended to a marked block's commands: the documented command, made short (argparse keeps the last value).
OVERRIDES = {
    "fastpred.train": ["--max-steps", "2", "--final-probe-epochs", "1"],
    "fastpred.data.check": ["--batches", "2"],
}


@dataclass(frozen=True)
class Command:
    where: str  # page:line of the block's first line
    module: str
    args: tuple[str, ...]
    launcher: tuple[str, ...] | None  # (name, *its args) when started by torchrun or fastpred.train.torchrun

    def __str__(self) -> str:
        return f"{self.where}: python -m {self.module} {shlex.join(self.args)}"


@dataclass(frozen=True)
class Block:
    where: str
    run: bool
    commands: tuple[Command, ...]


def _simple_commands(line: str) -> list[list[str]]:
    """The words of each simple command on one shell line: split at && || ; | &, redirections dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, skip = [], [], False
    for token in lexer:
        if skip:
            skip = False
        elif token in (">", ">>", "<", "2>"):
            skip = True
        elif token in ("&&", "||", ";", "|", "&"):
            commands.append(words)
            words = []
        else:
            words.append(token)
    return [c for c in commands + [words] if c]


def _module_commands(words: list[str], where: str) -> list[Command]:
    """`python -m M ARGS`, `torchrun ... -m M ARGS`, with env assignments and `srun` in front."""
    while words and (re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]) or words[0] == "srun"):
        words = words[1:]
    if words[:1] == ["torchrun"]:
        return [_launched(("torchrun", *words[1:]), where)]
    if len(words) >= 3 and words[0] in ("python", "python3") and words[1] == "-m":
        module, args = words[2], tuple(words[3:])
        if module == "fastpred.train.torchrun":
            return [_launched((module, *args), where)]
        if module.split(".")[0] in OWN:
            return [Command(where, module, args, None)]
    return []


def _launched(launcher: tuple[str, ...], where: str) -> Command:
    """The module a torchrun command starts; its arguments are parsed by torchrun's own parser (as both do)."""
    from torch.distributed.run import get_args_parser

    ns = _parse(get_args_parser(), list(launcher[1:]), f"{where}: {shlex.join(launcher)}")
    assert ns.module, f"{where}: {launcher[0]} runs a script; the docs start modules with -m"
    return Command(where, ns.training_script, tuple(ns.training_script_args), launcher)


def _blocks(page: Path) -> list[Block]:
    lines = page.read_text().splitlines()
    name = page.relative_to(ROOT).as_posix()
    blocks, i = [], 0
    while i < len(lines):
        fence = re.fullmatch(r"\s*```\s*(\w*)\s*", lines[i])
        if not fence:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].strip().startswith("```"))
        if fence.group(1) in ("bash", "sh", "shell", "console"):
            where = f"{name}:{i + 1}"
            marked = any(lines[k].strip() == RUN_MARK for k in range(max(i - 1, 0), i))
            text = "\n".join(lines[i + 1:end]).replace("\\\n", " ")
            commands = [c for line in text.splitlines() for words in _simple_commands(line)
                        for c in _module_commands(words, where)]
            blocks.append(Block(where, marked, tuple(commands)))
        i = end + 1
    return blocks


def _parse(parser, args: list[str], what: str):
    """argparse's result, or a test failure with its one-line error (argparse exits on a bad flag)."""
    from contextlib import redirect_stderr
    from io import StringIO

    err = StringIO()
    try:
        with redirect_stderr(err):
            return parser.parse_args(args)
    except SystemExit:
        pytest.fail(f"{what}: {err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else 'rejected'}")


_HELP = r"""
import contextlib, io, json, runpy, sys, warnings
warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
texts = {}
for module in sys.argv[1:]:
    sys.argv, out = [module, "--help"], io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    texts[module] = [code, out.getvalue()]
print(json.dumps(texts))
"""


@functools.cache
def _help_texts() -> dict[str, list]:
    """`python -m M --help` of every documented module whose parser is built inside main(), all in one subprocess
    (each would import torch again on its own)."""
    modules = sorted({c.module for c in COMMANDS} - PARSED)
    done = subprocess.run([sys.executable, "-c", _HELP, *modules], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.splitlines()[-1])


def _help_options(module: str) -> frozenset[str]:
    """The option strings `python -m MODULE --help` lists."""
    code, text = _help_texts()[module]
    assert code == 0, f"python -m {module} --help exited {code}"
    options = set()
    for line in text.splitlines():
        if re.match(r"\s{2,}-", line):
            invocation = re.split(r"\s{2,}", line.strip())[0]
            options.update(part.split()[0] for part in invocation.split(", "))
    assert options, f"python -m {module} --help lists no options"
    return frozenset(options)


def _check_flags(cmd: Command) -> None:
    what = str(cmd)
    if cmd.module == "fastpred.train":
        from fastpred.train import config

        given = vars(_parse(config.build_parser(), list(cmd.args), what))
        try:
            config.resolve(given)
        except config.ConfigError as e:
            pytest.fail(f"{what}: {e}")
    elif cmd.module == "fastpred.eval":
        from fastpred.eval import __main__ as eval_cli

        args = _parse(eval_cli.build_parser(), list(cmd.args), what)
        try:
            eval_cli._check_flags(args)  # protocol-specific flags: --epochs with knn, --data without --val
        except ValueError as e:
            pytest.fail(f"{what}: {e}")
    elif cmd.module == "fastpred.dynamics":
        from fastpred.dynamics.__main__ import build_parser

        _parse(build_parser(), list(cmd.args), what)
    else:
        known = _help_options(cmd.module)
        for word in cmd.args:
            if word.startswith("-") and not re.fullmatch(r"-[\d.,]+", word):  # a negative number is a value
                assert word.split("=")[0] in known, f"{what}: {word} is not an option of python -m {cmd.module}"


BLOCKS = [b for page in PAGES for b in _blocks(page)]
COMMANDS = [c for b in BLOCKS for c in b.commands]


def test_pages_start_with_a_command():
    """Each docs page opens, after its title, with the command a user runs; the front page's commands are found."""
    assert len(PAGES) > 1, "docs/*.md pages are missing"
    for page in PAGES[1:]:
        body = [line for line in page.read_text().splitlines()[1:] if line.strip()]
        assert body and body[0].startswith("```bash"), f"{page.name} does not start with a bash block"
    assert {"fastpred.train", "fastpred.eval", "fastpred.data.write"} <= {
        c.module for c in COMMANDS if c.where.startswith("README.md:")}


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", page.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_links_resolve():
    """Every relative link and image of the pages (docs/figures/..., other pages, #anchors) points at something."""
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not followed here
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: {target} does not exist"
            if anchor:
                assert anchor in _anchors(file), f"{page.name}: {target}: no heading with that anchor"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[f"{c.where}-{c.module}" for c in COMMANDS])
def test_command_module_exists_and_takes_its_flags(cmd: Command, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))  # bench/ is importable from the repository root, where it is run
    assert importlib.util.find_spec(cmd.module) is not None, f"{cmd}: no module {cmd.module}"
    _check_flags(cmd)


_RUNNER = r"""
import json, os, runpy, sys, traceback, warnings
warnings.filterwarnings("ignore", message=".*found in sys.modules.*", category=RuntimeWarning)
for folder, module, args in json.loads(sys.argv[1]):
    os.makedirs(folder, exist_ok=True)
    os.chdir(folder)
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        traceback.print_exc()
        code = 1
    print("RESULT " + json.dumps([module, args, code]), flush=True)
    if code:
        break
"""


def test_marked_blocks_run_on_the_digits(tmp_path):
    marked = [b for b in BLOCKS if b.run]
    assert marked, f"no block is marked {RUN_MARK}"
    plan = []
    for n, block in enumerate(marked):
        assert block.commands, f"{block.where}: a marked block without a python -m fastpred command"
        for cmd in block.commands:
            assert cmd.launcher is None and cmd.module.startswith("fastpred"), f"{cmd}: cannot run in a test"
            plan.append([str(tmp_path / f"block{n}"), cmd.module, [*cmd.args, *OVERRIDES.get(cmd.module, [])]])
    env = {**os.environ, "FASTPRED_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(plan)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    results = [json.loads(line[len("RESULT "):]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0, done.stderr[-3000:]
    for module, args, code in results:
        assert code == 0, f"python -m {module} {shlex.join(args)} exited {code}:\n{done.stderr[-3000:]}"
    assert len(results) == len(plan), f"ran {len(results)} of {len(plan)} commands:\n{done.stderr[-3000:]}"
