"""``kdrun-eval <run dir>``: the report again from a run's saved models, on another device or split, no training."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdrun.core.errors import KdrunError
from kdrun.core.io import write_json
from kdrun.data import build_data
from kdrun.models.checkpoint import find_model_file, load_model
from kdrun.pipeline.run import run_config
from kdrun.reporting.evaluation import evaluate_models
from kdrun.reporting.report import write_report
from kdrun.training.runtime import AMP_CHOICES, Runtime, determinism_errors, resolve_runtime

log = logging.getLogger("kdrun.eval")


def evaluate_run(
    run_dir: Path, split: str, device: str, amp: str | None, data_root: str | None, out: Path | None
) -> Path:
    """Evaluate the run's teacher, baseline and student model files (``<stage>.safetensors``, or the ``<stage>.pt`` of
    an earlier kdrun) on ``split``; return the folder of the report."""
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise KdrunError(f"{run_dir} is not a kdrun run dir: it has no .hydra/config.yaml")
    cfg = OmegaConf.load(saved)
    assert isinstance(cfg, DictConfig)
    if data_root is not None:
        cfg.dataset.root = data_root
    files = {s: find_model_file(run_dir, s) for s in ("teacher", "baseline", "student")}
    if not files["student"].is_file():
        raise KdrunError(
            f"{run_dir} has no student.safetensors (nor student.pt): the run did not finish "
            f"(resume it with kdrun resume={run_dir})"
        )
    runtime = resolve_runtime(
        device,
        amp or cfg.amp,
        progress=False,
        channels_last=cfg.get("channels_last", "auto"),
        compile=cfg.get("compile", False),
        deterministic=cfg.get("deterministic", False),  # absent from the runs of earlier kdrun versions
    )
    with determinism_errors(runtime.deterministic):
        return _evaluate(run_dir, cfg, files, split, runtime, out)


def _evaluate(
    run_dir: Path, cfg: DictConfig, files: dict[str, Path], split: str, runtime: Runtime, out: Path | None
) -> Path:
    """``evaluate_run`` once the run's config, model files and runtime are known."""
    data = build_data(cfg.dataset, runtime.device)
    models = {
        stage: load_model(path, cfg.teacher if stage == "teacher" else cfg.student, data.spec, key=stage)
        for stage, path in files.items()
        if path.is_file()
    }
    evaluation, outputs = evaluate_models(models, data, split, runtime, run_dir, cfg)
    metrics_file = run_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    metrics = {"config": metrics.get("config") or run_config(cfg, runtime, len(data.test)), "evaluation": evaluation}
    out = out or run_dir / f"eval-{split}-{runtime.device.type}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "evaluation.json", metrics)
    write_report(out, metrics, outputs)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kdrun-eval", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("run_dir", type=Path, help="a kdrun run dir (with .hydra/ and the stages' model files)")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps (default: auto)")
    parser.add_argument("--amp", choices=AMP_CHOICES, default=None, help="default: the run's setting")
    parser.add_argument("--data-root", default=None, help="where the dataset is now, if not the run's dataset.root")
    parser.add_argument("--out", type=Path, default=None, help="default: <run dir>/eval-<split>-<device type>")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        out = evaluate_run(
            args.run_dir.expanduser().resolve(), args.split, args.device, args.amp, args.data_root, args.out
        )
    except KdrunError as e:
        print(f"kdrun-eval: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
