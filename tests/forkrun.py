"""Run the repository's command lines fast: a server process imports the heavy libraries once,
then forks one child per command, which runs the script as ``__main__`` with that argv.

Why: the error-voice tests drive ~50 real command lines; each would spend 2–4 CPU-seconds
importing torch before its argument check. A forked child starts with those modules already in
memory, so a case costs what the command itself does. Each case still runs in its own process
(exit status, stdout, stderr, working directory and file-system effects are the command's own);
what differs from ``python script.py`` is only that imports were done before ``main`` (a module's
import-time output, if any, is not seen). ``tests/test_cli.py`` keeps real ``subprocess`` runs.

The server runs this file: ``python tests/forkrun.py``; requests and answers are JSON lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Imported by the server before any fork: what every entry point pulls in first. Nothing here may
# start a thread (a fork copies only the calling thread): torch, numpy and Ray do not on import.
PRELOAD = (
    "numpy", "torch", "torch.nn.functional", "safetensors.torch", "zarr", "PIL.Image", "tqdm", "timm", "ray",
    "sfd.cli", "sfd.config", "sfd.checkpoint", "sfd.loading", "sfd.samplers", "sfd.guidance", "sfd.encoding",
    "sfd.models.lightningdit", "sfd.models.autoencoder", "sfd.data.cache", "sfd.data.reader", "sfd.metrics",
)


def _child(req: dict) -> None:
    """In the forked child: become the command (cwd, argv, std streams) and run it; never return."""
    import runpy
    import traceback

    code = 1
    try:
        os.chdir(req["cwd"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            f = os.open(req[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 — the process ends with os._exit
        sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
        os.environ.update(req.get("env", {}))
        argv = req["argv"]
        try:
            if argv[0] == "-m":
                sys.argv = [argv[1], *argv[2:]]
                sys.path[0] = os.getcwd()  # as `python -m` sets it
                runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            else:
                script = str(REPO / argv[0])
                sys.argv = [script, *argv[1:]]
                sys.path[0] = str(Path(script).parent)  # as `python script.py` sets it
                runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:  # what the interpreter does with it
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    sys.path[0] = str(REPO)  # this file's folder (tests/) is no entry point's; each child sets its own
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(req)
        _, status = os.waitpid(pid, 0)
        rc = os.waitstatus_to_exitcode(status)
        print(json.dumps({"rc": rc}), flush=True)


class ForkRunner:
    """A pool of ``workers`` servers; ``run(cwd, *argv)`` returns a CompletedProcess like subprocess.run."""

    def __init__(self, env: dict[str, str], workers: int = 2) -> None:
        self._free: list[subprocess.Popen] = []
        self._lock = threading.Condition()
        self._all = []
        for _ in range(workers):
            p = subprocess.Popen([sys.executable, __file__], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
            self._all.append(p)
        for p in self._all:
            assert p.stdout is not None
            ready = p.stdout.readline()
            if not ready:
                raise RuntimeError("the fork server died while importing (run `python tests/forkrun.py` to see why)")
            self._free.append(p)

    def run(self, cwd: Path, *argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        with self._lock:
            while not self._free:
                self._lock.wait()
            p = self._free.pop()
        try:
            cwd = Path(cwd)
            # Outside cwd: the tests compare the folder's listing before and after.
            out = cwd.parent / f".{cwd.name}.forkrun.out"
            err = cwd.parent / f".{cwd.name}.forkrun.err"
            assert p.stdin is not None and p.stdout is not None
            req = {"cwd": str(cwd), "argv": list(argv), "stdout": str(out), "stderr": str(err), "env": env or {}}
            p.stdin.write(json.dumps(req) + "\n")
            p.stdin.flush()
            answer = p.stdout.readline()
            if not answer:
                raise RuntimeError(f"the fork server died running {argv}")
            rc = json.loads(answer)["rc"]
            res = subprocess.CompletedProcess(list(argv), rc, out.read_text(), err.read_text())
            out.unlink()
            err.unlink()
            return res
        finally:
            with self._lock:
                self._free.append(p)
                self._lock.notify()

    def close(self) -> None:
        for p in self._all:
            assert p.stdin is not None
            p.stdin.close()
            p.wait(timeout=30)


if __name__ == "__main__":
    serve()
