"""The model catalogue shared by teacher and student: CIFAR ResNets and WRNs, small nets, torchvision models,
ensembles; their feature taps; and the model files a run writes."""

from kdrun.models import cifar_resnet, ensemble, small, torchvision_models, wrn  # noqa: F401 - registers them
from kdrun.models.registry import MODELS, architecture_cfg, build_model, check_model_cfg, count_params, model_name

__all__ = ["MODELS", "architecture_cfg", "build_model", "check_model_cfg", "count_params", "model_name"]
