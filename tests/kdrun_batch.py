"""Run the ``kdrun`` console entry point once per argument list, all in this one process.

For tables of refused inputs, where each row ends in validation and a process per row would spend most of its
time importing torch and Hydra. Each call starts as the ``kdrun`` script does: ``sys.argv`` set, ``main()`` called,
its exit status and stderr recorded; in the row's own working directory, with Hydra's global state cleared and
every warning shown again, as in a fresh process. Reads a JSON list of ``{"args": [...], "cwd": "..."}`` on stdin and
writes a JSON list of ``{"returncode": int, "stderr": str}`` to the file named by its one argument.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import traceback
import warnings


def run_one(args: list[str], cwd: str) -> dict:
    from hydra.core.global_hydra import GlobalHydra

    from kdrun.cli.main import main

    os.chdir(cwd)
    os.environ.pop("HYDRA_FULL_ERROR", None)  # main() sets it for its own use
    GlobalHydra.instance().clear()
    sys.argv = ["kdrun", *args]
    err, code = io.StringIO(), 0
    with warnings.catch_warnings(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("default")  # a changed filter shows the warnings an earlier row already showed
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what would end a kdrun process with a traceback
            traceback.print_exc()
            code = 1
    return {"returncode": code, "stderr": err.getvalue()}


if __name__ == "__main__":
    out = os.path.abspath(sys.argv[1])  # before the calls set sys.argv and the working directory
    results = [run_one(call["args"], call["cwd"]) for call in json.load(sys.stdin)]
    with open(out, "w") as f:
        json.dump(results, f)
