"""The distilled student as a deployable file (ONNX, torch.export or TorchScript), checked against PyTorch."""

from __future__ import annotations

import importlib.util
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from kdrun.core.errors import KdrunError
from kdrun.core.io import atomic_path

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2", "torchscript")
FILES = {"onnx": "student.onnx", "pt2": "student.pt2", "torchscript": "student.torchscript.pt"}


def check_formats(formats: Any) -> list[str]:
    """The requested formats, or a one-line error naming a bad one or a missing package."""
    if isinstance(formats, str):
        formats = [formats]
    formats = list(formats or [])
    for fmt in formats:
        if fmt not in FORMATS:
            raise KdrunError(f"export={fmt!r} is invalid; choose any of: {', '.join(FORMATS)} (e.g. export=[onnx,pt2])")
    if "onnx" in formats:
        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise KdrunError(f"export=onnx needs the {' and '.join(missing)} package(s): pip install 'kdrun[export]'")
    return formats


def export_student(model: nn.Module, example: torch.Tensor, run_dir: Path, formats: list[str]) -> dict[str, Any]:
    """Write ``model`` (fp32, eval mode, on CPU) in each format, reload it, and compare its logits with PyTorch's
    on ``example`` (a normalised batch): ``{format: {"path", "max_abs_diff", "checked_with"}}``."""
    model = model.float().eval().to("cpu").to(memory_format=torch.contiguous_format)
    example = example.float().cpu().contiguous()
    with torch.no_grad():
        reference = model(example)
    out = {}
    for fmt in formats:
        path = run_dir / FILES[fmt]
        try:
            with atomic_path(path, suffix=path.suffix) as tmp:  # torch.export.load wants the .pt2 suffix
                got, checked_with = EXPORTERS[fmt](model, example, tmp)(example)
        except KdrunError:
            raise
        except Exception as e:  # noqa: BLE001 - exporters fail in many ways; the user needs one line
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            raise KdrunError(f"export={fmt} failed ({type(e).__name__}: {reason}); the run's results are saved") from e
        diff = (torch.as_tensor(got).float() - reference).abs().max().item()
        out[fmt] = {"path": path.name, "max_abs_diff": diff, "checked_with": checked_with}
        log.info("exported the student to %s: max |logit difference| %.2e (%s)", path, diff, checked_with)
    return out


def _onnx(model: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    batch = torch.export.Dim("batch", min=1)
    torch.onnx.export(
        model,
        (example,),
        str(path),
        input_names=["images"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        dynamo=True,
        external_data=False,  # one self-contained file (students are far below ONNX's 2 GB limit)
        verbose=False,
    )
    import onnx

    onnx.checker.check_model(str(path))
    if importlib.util.find_spec("onnxruntime") is None:
        log.warning("onnxruntime is not installed: student.onnx is checked by PyTorch's ONNX program only")
        program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
        assert program is not None  # dynamo=True returns the program
        return lambda x: (program(x)[0].detach(), "torch.onnx ONNXProgram")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: (
        torch.from_numpy(session.run(None, {"images": x.numpy()})[0]),
        f"onnxruntime {onnxruntime.__version__}",
    )


def _pt2(model: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    program = torch.export.export(model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    torch.export.save(program, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda x: (loaded(x).detach(), f"torch.export.load (torch {torch.__version__})")


def _torchscript(model: nn.Module, example: torch.Tensor, path: Path) -> Callable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # still what many C++ and mobile runtimes load
        warnings.filterwarnings("ignore", message=".*is deprecated.*")
        traced = torch.jit.trace(model, example)
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
    return lambda x: (loaded(x).detach(), f"torch.jit.load (torch {torch.__version__})")


EXPORTERS = {"onnx": _onnx, "pt2": _pt2, "torchscript": _torchscript}
