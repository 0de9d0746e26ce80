"""The runtime's speed paths on CPU: bf16 autocast, channels_last, torch.compile and its fallback, fused optimizers."""

import logging
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf

import kdrun.training.runtime
from kdrun.core.errors import KdrunError
from kdrun.data import build_data
from kdrun.losses import CrossEntropy, build_objective
from kdrun.models import build_model
from kdrun.training.loop import Stage, fit
from kdrun.training.optim import build_optimizer
from kdrun.training.predict import predict
from kdrun.training.runtime import CompiledOrEager, Runtime, determinism_errors, resolve_runtime
from kdrun.training.teacher import OnlineTeacher, TeacherSource

SGD = OmegaConf.create({"name": "sgd", "momentum": 0.9})
NO_SCHED = OmegaConf.create({"name": "none"})
STAGE = Stage("student", epochs=2, batch_size=64, lr=0.05, optim=SGD, sched=NO_SCHED, seed=0)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return build_data({"name": "digits", "val_fraction": 0.2})


def train(data, runtime, model_cfg=None, seed=0):
    torch.manual_seed(seed)
    model = build_model(model_cfg or {"name": "small_cnn", "channels": [8, 16], "hidden": 32}, data.spec)
    result = fit(replace(STAGE, seed=seed), model, CrossEntropy(), data, TeacherSource(), runtime)
    return model, result


def test_amp_auto_on_cpu_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    monkeypatch.setattr(kdrun.training.runtime, "cpu_has_native_bf16", lambda: True)
    assert resolve_runtime("cpu", "auto").amp == "bf16"
    monkeypatch.setattr(kdrun.training.runtime, "cpu_has_native_bf16", lambda: False)
    assert resolve_runtime("cpu", "auto").amp == "off"
    assert resolve_runtime("cpu", "off").amp == "off"


def test_channels_last_choices():
    assert resolve_runtime("cpu").channels_last is True  # auto: on, except on MPS
    assert resolve_runtime("cpu", channels_last=False).channels_last is False
    with pytest.raises(KdrunError, match="channels_last='sometimes' is invalid; choose one of: auto, true, false"):
        resolve_runtime("cpu", channels_last="sometimes")


def test_channels_last_computes_the_same_function(digits):
    torch.manual_seed(0)
    model = build_model({"name": "small_cnn"}, digits.spec)
    plain, nhwc = Runtime(CPU, "off", channels_last=False), Runtime(CPU, "off", channels_last=True)
    reference, labels = predict(model, digits.test, digits, plain, 256)
    logits, same_labels = predict(model, digits.test, digits, nhwc, 256)
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(labels, same_labels)
    torch.testing.assert_close(logits, reference, atol=1e-4, rtol=1e-4)
    fresh = build_model({"name": "small_cnn"}, digits.spec)
    fresh.load_state_dict(model.state_dict())  # a channels_last checkpoint loads into a plain model
    torch.testing.assert_close(predict(fresh, digits.test, digits, plain, 256)[0], reference, atol=1e-5, rtol=1e-5)


def test_bf16_autocast_with_channels_last_trains_on_cpu(digits):
    _, bf16 = train(digits, Runtime(CPU, "bf16", channels_last=True))
    _, fp32 = train(digits, Runtime(CPU, "off"))
    assert bf16.history[-1]["train/loss"] < bf16.history[0]["train/loss"]
    assert bf16.val_acc_best > 0.5 and abs(bf16.val_acc_best - fp32.val_acc_best) < 0.05


def test_compile_on_cpu_trains_a_tiny_model(digits, caplog):
    pytest.importorskip("torch._inductor")
    runtime = Runtime(CPU, "off", compile=True)
    with caplog.at_level(logging.WARNING):
        model, result = train(digits, runtime, {"name": "mlp", "hidden": [32]})
    compiled = runtime.forward(model)
    assert isinstance(compiled, CompiledOrEager) and not compiled.eager, caplog.text
    assert "torch.compile failed" not in caplog.text
    assert result.val_acc_best > 0.8
    eager_logits, _ = predict(model, digits.test, digits, Runtime(CPU, "off"), 256)
    torch.testing.assert_close(predict(model, digits.test, digits, runtime, 256)[0], eager_logits, atol=1e-4, rtol=1e-4)


def test_compile_failure_falls_back_to_eager_with_one_warning(digits, monkeypatch, caplog):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no C++ compiler on this machine")

    monkeypatch.setattr(kdrun.training.runtime, "COMPILE_BACKEND", broken_backend)
    runtime = Runtime(CPU, "off", compile=True)
    with caplog.at_level(logging.WARNING):
        compiled_model, compiled = train(digits, runtime)
    warnings = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler" in warnings[0].getMessage()
    assert runtime.forward(compiled_model).eager
    eager_model, eager = train(digits, Runtime(CPU, "off"))
    assert [row["train/loss"] for row in compiled.history] == [row["train/loss"] for row in eager.history]


def test_a_real_model_error_still_surfaces_under_compile(digits, monkeypatch):
    model = build_model({"name": "mlp"}, digits.spec)
    wrong = torch.zeros(2, 3, 5, 5)  # not the image size the MLP was built for
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        Runtime(CPU, "off", compile=True).forward(model)(wrong)


def test_online_teacher_runs_compiled_in_inference_mode(digits):
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    teacher = build_model({"name": "mlp", "hidden": [16]}, digits.spec)
    objective = build_objective({"name": "kd"}, 4.0, 0.5)
    student = build_model({"name": "mlp", "hidden": [16]}, digits.spec)
    runtime = Runtime(CPU, "off", compile=True)
    result = fit(STAGE, student, objective, digits, OnlineTeacher(teacher), runtime)
    assert torch.isfinite(torch.tensor(result.history[-1]["train/loss"]))
    assert not runtime.forward(teacher).eager and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_builtin_optimizers_use_the_fused_kernel_on_cpu(name):
    params = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(OmegaConf.create({"name": name}), params, 0.1).defaults["fused"] is True
    explicit = build_optimizer(OmegaConf.create({"name": name, "foreach": False}), params, 0.1)
    assert not explicit.defaults["fused"] and explicit.defaults["foreach"] is False


def test_optimizers_without_a_fused_kernel_are_built_plainly():
    params = [torch.nn.Parameter(torch.zeros(3))]
    rmsprop = OmegaConf.create({"_target_": "torch.optim.RMSprop", "name": "rmsprop"})
    assert isinstance(build_optimizer(rmsprop, params, 0.1), torch.optim.RMSprop)
    integer = [torch.zeros(3, dtype=torch.int64)]  # no fused kernel for these: the plain implementation
    assert not build_optimizer(OmegaConf.create({"name": "sgd"}), integer, 0.1).defaults.get("fused")


@pytest.fixture
def determinism_restored():
    yield
    resolve_runtime("cpu", "off", False, deterministic=False)  # the process-wide flags as every other test has them


def test_deterministic_sets_torch_flags_and_a_later_run_unsets_them(monkeypatch, determinism_restored):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert resolve_runtime("cpu", "off", False, deterministic=True).deterministic
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert kdrun.training.runtime.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own deterministic setting is kept
    resolve_runtime("cpu", "off", False, deterministic=True)
    assert kdrun.training.runtime.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert not resolve_runtime("cpu", "off", False).deterministic
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_determinism_left_in_warn_only_mode_is_made_strict(determinism_restored):
    torch.use_deterministic_algorithms(True, warn_only=True)  # as another library in the process may leave it
    resolve_runtime("cpu", "off", False, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    resolve_runtime("cpu", "off", False, deterministic=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert not torch.is_deterministic_algorithms_warn_only_enabled()


def test_an_op_without_a_deterministic_implementation_is_one_line_naming_it(determinism_restored):
    resolve_runtime("cpu", "off", False, deterministic=True)
    index, values = torch.tensor([0, 1]), torch.ones(2)
    with pytest.raises(KdrunError) as e, determinism_errors(True):
        torch.zeros(5).put_(index, values)  # no deterministic CPU kernel in PyTorch (accumulate=False)
    assert str(e.value) == (
        "deterministic=true: put_ has no deterministic implementation on this device; deterministic=false allows it"
    )
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as other, determinism_errors(True):
        torch.zeros(2, 3) @ torch.zeros(2, 3)  # any other error passes through as it was
    assert not isinstance(other.value, KdrunError)
    resolve_runtime("cpu", "off", False, deterministic=False)
    with determinism_errors(False):
        torch.zeros(5).put_(index, values)  # allowed again


class PutNet(torch.nn.Module):
    """A user model whose forward uses an op without a deterministic CPU kernel."""

    def __init__(self, num_classes: int, **options):
        super().__init__()
        self.fc = torch.nn.LazyLinear(num_classes)

    def forward(self, x):
        out = self.fc(x.flatten(1))
        return out.put_(torch.tensor([0]), torch.zeros(1))


def test_the_run_says_which_op_deterministic_true_refused(tmp_path, determinism_restored):
    from kdrun.pipeline.run import run
    from tests.unit.test_engine import config

    cfg = config("deterministic=true", "cache=off", f"+student._target_={__name__}.PutNet")
    with pytest.raises(KdrunError, match=r"^deterministic=true: put_ has no deterministic implementation on this"):
        run(cfg, tmp_path)  # in the pre-training checks' forward pass, not mistaken for an image-size problem
