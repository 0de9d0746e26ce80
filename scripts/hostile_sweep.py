"""Every numeric leaf of the composed default config x hostile values, each as a real ``kdrun`` subprocess.

    python scripts/hostile_sweep.py [--values nan -inf -1 0 1e30 abc] [--out outputs/hostile] [--jobs 2]

Prints one row per case (exit code, seconds, whether training started, the first stderr line) and a summary; exits 1
if any case exits with a code other than 0 or 2, prints a traceback, trains before refusing, or writes to the cache
before refusing.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

TRAINING = "epoch 1/"  # a stage's first epoch line: training started


def numeric_leaves() -> list[str]:
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config")
    plain = OmegaConf.to_container(cfg, resolve=True)
    out = []

    def walk(node, prefix):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        elif isinstance(node, int | float) and not isinstance(node, bool):
            out.append(prefix.rstrip("."))

    walk(plain, "")
    return out


def run_case(key: str, value: str, out: Path) -> dict:
    folder = re.sub(r"[^\w.-]", "_", f"{key}-{value}")  # Hydra's override grammar takes no '=' in a path
    run_dir, cache = out / folder, out / f"cache-{folder}"
    command = [str(Path(sys.executable).parent / "kdrun"), f"{key}={value}", f"hydra.run.dir={run_dir}"]
    command += [f"cache.dir={cache}", "train.progress=false"]
    started = time.perf_counter()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
        code, stderr = result.returncode, result.stderr
    except subprocess.TimeoutExpired:
        code, stderr = "timeout", ""
    log = (run_dir / "kdrun.log").read_text() if (run_dir / "kdrun.log").is_file() else ""
    trained = TRAINING in log
    lines = [line for line in stderr.splitlines() if line.strip()]
    bad = code not in (0, 2) or "Traceback" in stderr or (code == 2 and (trained or cache.exists() or len(lines) != 1))
    shutil.rmtree(cache, ignore_errors=True)
    return {
        "case": f"{key}={value}",
        "code": code,
        "s": time.perf_counter() - started,
        "trained": trained,
        "line": lines[-1][:160] if lines else "",
        "bad": bad,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--values", nargs="+", default=["nan", "-inf", "-1", "0", "1e30", "abc"])
    parser.add_argument("--out", type=Path, default=Path("outputs/hostile"))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args()
    cases = [(k, v) for k in numeric_leaves() for v in args.values]
    leaves = len(cases) // len(args.values)
    print(f"{len(cases)} cases: {leaves} numeric leaves x {len(args.values)} values", flush=True)
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda c: run_case(*c, args.out), cases))
    for r in rows:
        flag = "BAD " if r["bad"] else ""
        print(f"{flag}{r['case']:45} exit {r['code']!s:7} {r['s']:5.1f}s trained={r['trained']!s:5} {r['line']}")
    codes = collections.Counter(str(r["code"]) for r in rows)
    bad = [r for r in rows if r["bad"]]
    print("cases per exit code: " + ", ".join(f"{c}: {n}" for c, n in sorted(codes.items())))
    print(f"{len(bad)} bad cases of {len(rows)}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
