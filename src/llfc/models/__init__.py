"""Architectures by name: ``create_model("mlp", input_shape=(1, 28, 28), num_classes=10)``.

Importing this package registers every built-in architecture.
"""

from llfc.models import lenet, mlp, resnet, transformer, vgg  # noqa: F401  (importing them registers the architectures)
from llfc.models.registry import create_model, list_models, model_factory, register_model

__all__ = ["create_model", "list_models", "model_factory", "register_model"]
