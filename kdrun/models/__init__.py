"""The model catalogue shared by teacher and student: the CIFAR zoo of the KD tables (ResNets, WRNs, VGGs,
MobileNetV2, ShuffleNets), small nets, torchvision models, ensembles; their feature taps; and model files."""

from kdrun.models import (  # noqa: F401 - registers them
    cifar_resnet,
    cifar_resnetv2,
    ensemble,
    mobilenet_cifar,
    shufflenet_cifar,
    small,
    torchvision_models,
    vgg_cifar,
    wrn,
)
from kdrun.models.registry import MODELS, architecture_cfg, build_model, check_model_cfg, count_params, model_name

__all__ = ["MODELS", "architecture_cfg", "build_model", "check_model_cfg", "count_params", "model_name"]
