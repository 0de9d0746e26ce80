"""Cached teacher logits: the same loss as running the teacher, paired by sample index, shared through the cache."""

import json

import safetensors.torch
import torch
import torch.nn as nn
from hydra import compose, initialize_config_module

from kdrun.data import build_data
from kdrun.losses import LossInput, Objective, build_objective
from kdrun.models import build_model
from kdrun.pipeline.run import run
from kdrun.training.loop import Stage, fit
from kdrun.training.predict import predict
from kdrun.training.runtime import resolve_runtime
from kdrun.training.teacher import CachedLogits, OnlineTeacher

CPU = resolve_runtime("cpu", "off", False)


def config(*overrides):
    """The composed config, without the report: nothing here reads it."""
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        return compose("config", overrides=["train.progress=false", "report.enabled=false", *overrides])


def digits_and_teacher():
    data = build_data({"name": "digits", "val_fraction": 0.2})
    torch.manual_seed(0)
    teacher = build_model({"name": "lenet5"}, data.spec).eval()
    return data, teacher


def test_cached_logits_give_the_same_loss_as_the_online_teacher():
    data, teacher = digits_and_teacher()
    cached, _ = predict(teacher, data.train, data, CPU, batch_size=256)
    objective = build_objective({"name": "kd"}, 4.0, 0.3)
    student = build_model({"name": "mlp"}, data.spec)
    online, from_cache = OnlineTeacher(teacher), CachedLogits(cached)
    for source in (online, from_cache):
        source.attach(student, objective, data, CPU, mixes=False)
    images, labels, idx = next(data.train.batches(64, shuffle=True, generator=torch.Generator().manual_seed(1)))
    x = data.transform(images, train=True)
    logits = student(x)
    online_loss, online_terms = objective(LossInput(logits, labels, online(x, idx)[0], index=idx))
    cached_loss, cached_terms = objective(LossInput(logits, labels, from_cache(x, idx)[0], index=idx))
    torch.testing.assert_close(cached_loss, online_loss)
    torch.testing.assert_close(cached_terms["kd"], online_terms["kd"])


class PairingSpy(Objective):
    """Checks, batch by batch, that the teacher logits handed to the objective are those of the batch's images."""

    needs_teacher = True

    def __init__(self, teacher: nn.Module, data):
        super().__init__()
        online = OnlineTeacher(teacher)  # the teacher run on the batch itself: the reference
        online.attach(nn.Identity(), self, data, CPU, mixes=False)
        self.reference = [online]  # in a list: not a submodule, so its weights are not trained
        self.batches = self.samples = 0

    def forward(self, inputs: LossInput):
        # objectives do not get the batch's images: the student's forward pre-hook recorded them
        expected, _ = self.reference[0](self.last_input, inputs.index)
        assert torch.allclose(inputs.teacher, expected, atol=1e-5), f"batch {self.batches}: logits of other samples"
        self.batches += 1
        self.samples += len(inputs.labels)
        return nn.functional.cross_entropy(inputs.student, inputs.labels), {}


def test_shuffled_epochs_with_cached_logits_pair_every_sample_with_its_own_logits():
    data, teacher = digits_and_teacher()
    cached, _ = predict(teacher, data.train, data, CPU, batch_size=256)
    student = build_model({"name": "mlp"}, data.spec)
    spy = PairingSpy(teacher, data)
    student.register_forward_pre_hook(lambda module, args: setattr(spy, "last_input", args[0]))
    cfg = config("train.student.epochs=3", "train.student.batch_size=50")
    recipe = cfg.train.student
    stage = Stage("student", recipe.epochs, recipe.batch_size, recipe.lr, cfg.optim, cfg.sched, seed=0)
    fit(stage, student, spy, data, CachedLogits(cached), CPU)
    assert spy.samples == 3 * len(data.train) and spy.batches == 3 * data.train.num_batches(50, shuffle=True)


def test_pipeline_caches_logits_once_for_a_sweep_and_matches_online(tmp_path):
    quick = ["train.teacher.epochs=2", "train.student.epochs=3", "teacher=lenet5"]
    results = {}
    for name, extra in (("a", ["T=2"]), ("b", ["T=6", "alpha=0.7"]), ("online", ["train.teacher_logits=online"])):
        cfg = config(*quick, *extra, f"cache.dir={tmp_path / 'cache'}")
        run(cfg, tmp_path / name)
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())["student"]
    assert results["a"]["teacher_logits"] == results["b"]["teacher_logits"] != "online"
    assert results["online"]["teacher_logits"] == "online"
    entries = list((tmp_path / "cache" / "teacher_logits").glob("[0-9a-f]*[0-9a-f]"))
    assert len(entries) == 1
    stored = safetensors.torch.load_file(entries[0] / "model.safetensors")  # tensors only, no pickle
    assert stored["logits"].shape == (100, 10)  # the student's 100 labelled images (digits default)
    # the default experiment with cached logits trains the very same student as with the online teacher
    cfg = config(*quick, f"cache.dir={tmp_path / 'cache'}")
    run(cfg, tmp_path / "default")
    cached = json.loads((tmp_path / "default" / "metrics.json").read_text())["student"]
    assert cached["test_acc"] == results["online"]["test_acc"]
    assert cached["val_acc_best"] == results["online"]["val_acc_best"]


def test_random_augmentation_keeps_the_teacher_online(tmp_path):
    cfg = config(
        "dataset=fake",
        "dataset.train_size=96",
        "dataset.augment.flip=true",
        "student=mlp",
        "teacher=lenet5",
        "train.teacher.epochs=1",
        "train.student.epochs=1",
        f"cache.dir={tmp_path / 'cache'}",
    )
    run(cfg, tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["student"]["teacher_logits"] == "online"
    assert metrics["student"]["peak_mem_mb"] > 0
    assert not (tmp_path / "cache" / "teacher_logits").exists()


def test_a_jittered_teacher_still_gives_cached_logits_to_a_plain_student(tmp_path):
    """The teacher's own augmentation shapes the teacher, not the student's inputs: its logits stay cached, and the
    logits' key names the teacher (whose key holds its augmentation), not the augmentation itself."""
    quick = ["student=mlp", "teacher=lenet5", "train.teacher.epochs=1", "train.student.epochs=1"]
    results = {}
    for name, crop in (("plain", 0), ("jittered", 2)):
        cfg = config(*quick, f"train.teacher.augment.crop_pad={crop}", f"cache.dir={tmp_path / 'cache'}")
        run(cfg, tmp_path / name)
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
        assert results[name]["student"]["teacher_logits"].startswith("cached (")
    assert results["plain"]["teacher"]["cache_key"] != results["jittered"]["teacher"]["cache_key"]
    assert results["plain"]["baseline"]["cache_key"] == results["jittered"]["baseline"]["cache_key"]
    assert results["jittered"]["baseline"]["source"] == "cache"  # one baseline for both teachers
    entries = [p for p in (tmp_path / "cache" / "teacher_logits").iterdir() if p.is_dir()]
    assert len(entries) == 2  # one set of logits per teacher


def test_the_students_own_augmentation_or_mixing_puts_the_teacher_online(tmp_path):
    quick = ["student=mlp", "teacher=lenet5", "train.teacher.epochs=1", "train.student.epochs=1"]
    for name, override in (("crop", "train.student.augment.crop_pad=1"), ("mix", "train.student.augment.mix=cutmix")):
        run(config(*quick, override, "baseline=false", f"cache.dir={tmp_path / 'cache'}"), tmp_path / name)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert metrics["student"]["teacher_logits"] == "online", name
