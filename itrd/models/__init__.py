"""Model zoo for distillation: every model's ``forward(x)`` returns ``(features, logits)``.

``features`` is the pooled ``(n, feature_dim)`` representation that feeds the final linear classifier
(what ITRD distils) and ``logits = classifier(features)``. The CIFAR zoo reproduces the CRD /
RepDistiller architectures of the ITRD paper; ``resnet18``, ``resnet34`` and ``torchvision.<name>``
adapt torchvision classifiers; ``wrap_model`` adapts any other module.
"""

from . import mobilenetv2, resnet, shufflenet, torchvision_models, vgg, wrn
from .common import PooledClassifier
from .registry import ModelEntry, create_model, model_family, model_names, register_model
from .torchvision_models import TorchvisionClassifier
from .wrap import WrappedModel, wrap_model

# The zoo modules register themselves on import; listing them keeps the imports explicit.
_ZOO_MODULES = (resnet, wrn, vgg, mobilenetv2, shufflenet, torchvision_models)

__all__ = [
    "ModelEntry",
    "PooledClassifier",
    "TorchvisionClassifier",
    "WrappedModel",
    "create_model",
    "model_family",
    "model_names",
    "register_model",
    "wrap_model",
]
