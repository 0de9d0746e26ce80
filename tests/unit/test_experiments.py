"""Documented experiment recipes compose: born-again self-distillation."""

from hydra import compose, initialize_config_module


def test_born_again_recipe_composes_a_self_distillation():
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=born_again", "train.teacher.epochs=7"])
    assert cfg.teacher.name == cfg.student.name == "resnet20"
    assert cfg.alpha == 0.0 and cfg.train.student.epochs == 7 and cfg.train.student.max_samples is None
