"""Documented experiment recipes compose: born-again self-distillation, whose baseline is its teacher."""

from hydra import compose, initialize_config_module

from kdrun.pipeline.stages import teacher_is_baseline


def test_born_again_recipe_composes_a_self_distillation():
    with initialize_config_module("kdrun.conf", version_base="1.3"):
        cfg = compose("config", overrides=["experiment=born_again", "train.teacher.epochs=7"])
    assert cfg.teacher.name == cfg.student.name == "resnet20"
    assert cfg.alpha == 0.0 and cfg.train.student.epochs == 7 and cfg.train.student.max_samples is None


def test_the_born_again_baseline_is_its_teacher_and_no_other_recipe_is():
    def composed(*overrides):
        with initialize_config_module("kdrun.conf", version_base="1.3"):
            return compose("config", overrides=list(overrides))

    assert teacher_is_baseline(composed("experiment=born_again"), "off")
    assert not teacher_is_baseline(composed(), "off")  # resnet20 -> small_cnn
    assert not teacher_is_baseline(composed("experiment=born_again", "train.student.epochs=3"), "off")
    assert not teacher_is_baseline(composed("experiment=born_again", "train.student.augment.crop_pad=2"), "off")
    assert not teacher_is_baseline(composed("experiment=born_again", "teacher.checkpoint=t.safetensors"), "off")
