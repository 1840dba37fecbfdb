"""Few-shot methods and backbones. Importing this package registers all of them."""

from fewshot_studio.models import backbones as _backbones  # noqa: F401  (registers)
from fewshot_studio.models import maml as _maml  # noqa: F401
from fewshot_studio.models import protonet as _protonet  # noqa: F401
from fewshot_studio.models import relation as _relation  # noqa: F401
from fewshot_studio.models.base import FewShotClassifier, Predictor
from fewshot_studio.models.registry import (
    BACKBONES,
    METHODS,
    build_model,
    create_backbone,
    create_method,
    create_model,
    model_spec,
)

__all__ = [
    "BACKBONES",
    "METHODS",
    "FewShotClassifier",
    "Predictor",
    "build_model",
    "create_backbone",
    "create_method",
    "create_model",
    "model_spec",
]
