"""One CLI voice: every flag of every entry point has help, every ``--help`` example parses against
its script as written and uses the README's default paths, the ones that can run on a CPU run
(as ``--dry-run``), and user errors are one ``error:`` line with exit status 2."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# script -> importable module exposing build_parser()
SCRIPTS = {
    "train/main.py": "train.main",
    "pipeline/encode.py": "pipeline.encode",
    "pipeline/train_semvae.py": "pipeline.train_semvae",
    "pipeline/verify_cache.py": "pipeline.verify_cache",
    "sample/grid.py": "sample.grid",
    "eval/fid.py": "eval.fid",
    "eval/plot.py": "eval.plot",
    "eval/paper_fid.py": "eval.paper_fid",
    "eval/posthoc_ema.py": "eval.posthoc_ema",
    "pipeline/demo.py": "pipeline.demo",
    "pipeline/study.py": "pipeline.study",
}
# Paths an example may name: the README's defaults (and the paths a user names for their own data).
DEFAULT_ROOTS = ("data/", "weights/", "runs/", "$(python -m sfd.weights")
LEGACY = re.compile(r"\.\./|imagenet256-sfd|demo-cache|sfd_xl_4m|sfd_autoguidance_b\.pt|/shared/")


def parser_of(script: str) -> argparse.ArgumentParser:
    return importlib.import_module(SCRIPTS[script]).build_parser()


def all_parsers(p: argparse.ArgumentParser):
    yield p
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            for sub in a.choices.values():
                yield from all_parsers(sub)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_flag_has_help(script: str) -> None:
    missing = [
        f"{p.prog}: {'/'.join(a.option_strings) or a.dest}"
        for p in all_parsers(parser_of(script)) for a in p._actions
        if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help
    ]
    assert not missing, "flags without help:\n" + "\n".join(missing)


def help_examples(script: str) -> list[list[str]]:
    """The commands of the Examples section of ``script --help`` (and its sub-commands' help):
    continuation lines joined, comments dropped, each as argv after the script's path."""
    texts = []
    for p in all_parsers(parser_of(script)):
        texts.append(p.format_help())
    cmds = []
    for text in texts:
        m = re.search(r"^\s*[Ee]xamples?:\s*$(.*)", text, flags=re.M | re.S)
        if not m:
            continue
        joined = re.sub(r"\\\n\s*", " ", m.group(1))
        for line in joined.splitlines():
            line = line.strip()
            if line.split(" ", 1)[0] not in ("python", "python3", "torchrun", "ray"):
                continue  # comments, `just` recipes (the README's), and the options text below
            tokens = shlex.split(line.split(" # ")[0], posix=True)
            if "--" in tokens:  # `ray job submit ... -- python $PWD/script ...`
                tokens = tokens[tokens.index("--") + 1:]
            tokens = [t.replace("$PWD/", "") for t in tokens]
            at = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
            if at is None or tokens[at] != script:
                continue
            cmds.append(tokens[at + 1:])
    return cmds


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_help_examples_parse_and_use_default_paths(script: str) -> None:
    examples = help_examples(script)
    assert examples, f"{script} --help has no example"
    parser = parser_of(script)
    for argv in examples:
        line = " ".join(argv)
        assert not LEGACY.search(line), f"{script} example uses a path the README does not: {line}"
        for flag, value in zip(argv, argv[1:]):
            if flag in ("--cache", "--out", "--ckpt", "--stats", "--images", "--init-from", "--guide", "--out-dir"):
                assert value.startswith(DEFAULT_ROOTS), f"{script}: {flag} {value} is not under data/, weights/ or runs/"
        try:
            parser.parse_args(argv)
        except SystemExit as e:
            pytest.fail(f"{script} example does not parse (exit {e.code}): {line}")


def test_train_examples_run_as_dry_runs(tmp_path: Path) -> None:
    """Every trainer example, run from a folder laid out as the README says (the demo's cache at
    runs/demo/cache), with --dry-run: configs resolve, the tiny preset fits the demo cache."""
    from tests.test_train import make_cache
    from tests.test_weights import published_layout

    make_cache(tmp_path / "runs" / "demo" / "cache")
    published_layout(tmp_path / "weights")  # --init-from names a released checkpoint
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    for argv in help_examples("train/main.py"):
        argv = [a for a in argv if a != "--dry-run"] + ["--dry-run"]
        res = subprocess.run([sys.executable, str(REPO / "train" / "main.py"), *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, f"{argv}:\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        if "runs/demo/cache" in argv:  # the model's data shape came from the cache
            assert "(from the cache)" in res.stdout


def test_paper_fid_example_runs_as_written(tmp_path: Path) -> None:
    from tests.test_weights import published_layout

    published_layout(tmp_path / "weights")
    (argv,) = [a for a in help_examples("eval/paper_fid.py") if "--dry-run" in a]
    res = subprocess.run([sys.executable, str(REPO / "eval" / "paper_fid.py"), *argv], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("cmd, needle", [
    (["sample/grid.py", "--ckpt", "nope", "--guide", "gone.pt"], "2 input(s) not found: --ckpt nope; --guide gone.pt"),
    (["eval/fid.py", "calc", "nope.npz"], "3 input(s) not found"),
    (["eval/fid.py", "gen", "--ckpt", "nope", "--out", "x"], "--ckpt nope"),
    (["eval/plot.py", "."], "nothing to plot"),
    (["train/main.py", "--preset", "tiny", "--cache", "nope"], "nope"),
    (["pipeline/encode.py", "--images", "nope", "--out", "c"], "nope"),
    (["pipeline/verify_cache.py", "nope"], "nope"),
    (["eval/paper_fid.py", "xl-4m"], "file(s) missing"),
])
def test_user_errors_are_one_line_with_status_2(tmp_path: Path, cmd: list[str], needle: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, str(REPO / cmd[0]), *cmd[1:]], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, (cmd, res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and res.stderr.startswith("error: "), res.stderr[-2000:]
    assert needle in res.stderr
    assert not (tmp_path / "c").exists()  # a refused run leaves nothing behind
