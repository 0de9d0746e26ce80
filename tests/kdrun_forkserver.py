"""A fork server for the tests' ``kdrun`` processes: imports what a run imports once, then forks a child per call.

A ``kdrun`` process spends about 7 s of CPU here importing torch, torch._dynamo (which torch.optim pulls in),
Hydra, scikit-learn and torchmetrics before its first step, and a test's run is a few seconds more. Each child is a
process of its own (its own pid, exit status, standard streams, working directory and environment) that runs the
console script's entry point as the script does, ``sys.exit(main())``, and ends as the interpreter ends: Hydra's and
kdrun's state are fresh (this server never runs anything), only the imports are inherited. What a child cannot show
is what an import prints, which happened here once (``PRELOAD`` leaves out the modules that print on import:
torch.utils.benchmark logs a CUDA_HOME warning), and a peak RSS as a cold process has it (a child shares the
imports' pages). tests/e2e/test_cli.py checks children against cold ``kdrun`` processes.

Protocol, one JSON object per line: a call ``{"argv", "entry", "cwd", "env", "stdout", "stderr"}`` on stdin (the
standard streams are files the caller reads); the answers ``{"pid": ...}`` when the child starts and
``{"returncode": ...}`` when it has ended (negative: killed by that signal, as ``subprocess`` reports it).
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import sys

PRELOAD = (
    "kdrun.cli.main",
    "kdrun.pipeline.run",
    "torch._dynamo",
    "sklearn.datasets",
    "sklearn.model_selection",
    "torchmetrics.functional.classification",
    "torch.utils.tensorboard",
)
WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


def serve(script_dir: str) -> dict | None:
    """Answer calls until stdin closes (returns None); in a forked child, return its call."""
    sys.path[0] = script_dir  # as a console script's interpreter has it
    for module in PRELOAD:
        importlib.import_module(module)
    # The imports' objects out of the collector's reach: a child's collections would otherwise walk them all,
    # writing to (and so copying) every page they are on; this made a refused command 2.5 times slower.
    gc.freeze()
    for line in sys.stdin:
        call = json.loads(line)
        pid = os.fork()
        if pid == 0:
            return call
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}), flush=True)
    return None


def become(call: dict):
    """Make this child the call's process: its streams, folder, environment and argv; return its entry point."""
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, call["stdout"], WRITE), (2, call["stderr"], WRITE)):
        opened = os.open(path, flags, 0o644)
        os.dup2(opened, fd)
        os.close(opened)
    os.chdir(call["cwd"])
    os.environ.clear()
    os.environ.update(call["env"])
    sys.argv = call["argv"]
    module, function = call["entry"].split(":")
    return getattr(importlib.import_module(module), function)


if __name__ == "__main__":
    child = serve(sys.argv[1])
    if child is not None:
        sys.exit(become(child)())  # what the console script does; the interpreter then ends as a script's does
