"""visionkit: a computer-vision foundation-model toolkit on PyTorch and Lightning.

The top level exposes the model registry and the safe weight loader. Importing it imports ``visionkit.models``, which
registers every visionkit backbone with timm, so ``timm.create_model("<visionkit model>")`` works after
``import visionkit`` (the price is timm's import time). Data, evaluation, tasks and methods live in their subpackages
(``visionkit.data``, ``visionkit.eval``, ``visionkit.tasks``, ...).
"""

from visionkit import models
from visionkit.registry import create_model, list_models, register_model
from visionkit.weights import load_state_dict, save_state_dict

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "create_model",
    "list_models",
    "load_state_dict",
    "models",
    "register_model",
    "save_state_dict",
]
