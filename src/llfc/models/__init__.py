"""Architectures by name: ``create_model("mlp", input_shape=(1, 28, 28), num_classes=10)``.

Importing this package registers every built-in architecture.
"""

from llfc.models.registry import create_model, list_models, model_factory, register_model
from llfc.models import mlp  # noqa: F401  (registers)
from llfc.models import lenet, resnet, transformer, vgg  # noqa: F401  (register)

__all__ = ["create_model", "list_models", "model_factory", "register_model"]
