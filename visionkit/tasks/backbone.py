"""The backbone of a task: a registered model name, or a module injected from YAML.

Every task takes ``backbone: str | nn.Module``. A name (``"resnet18"``, ``"vit_tiny_patch16_224"``, a visionkit
model) is built with :func:`visionkit.create_model`; a module, given in YAML as ``{class_path, init_args}``
(Lightning's dependency injection), is used as is::

    model:
      class_path: ClassificationTask
      init_args:
        backbone:
          class_path: timm.models.vision_transformer.VisionTransformer
          init_args: {img_size: 64, patch_size: 16, embed_dim: 192, depth: 12, num_heads: 3}
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn

from visionkit.registry import create_model
from visionkit.weights import DEFAULT_STRIP_PREFIXES, load_state_dict, load_state_dict_into

__all__ = ["load_checkpoint_into", "resolve_backbone"]


def resolve_backbone(
    backbone: str | nn.Module | None,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """The backbone module of a task, built from a registered name or taken as given.

    Args:
        backbone: A model name for :func:`visionkit.create_model`, or an already built ``nn.Module``.
        pretrained: Load the named model's pretrained weights (local files only for visionkit models). Not possible
            for a module.
        checkpoint_path: Initial weights. For a name, passed to :func:`visionkit.create_model` (which runs the
            family's checkpoint filter). For a module, the file is read with :func:`visionkit.load_state_dict` and
            loaded strictly: every key must match.
        **kwargs: Model arguments for a name (``num_classes``, ``features_only``, ``out_indices``, ``img_size``,
            ``drop_path_rate``, ...). A module is already built, so they do not apply to it: they are ignored with a
            warning that names them.

    Returns:
        The backbone (a name gives a freshly built model, in training mode, on the CPU; a module is the same object).

    Raises:
        ValueError: ``pretrained=True`` with a module.
        TypeError: ``backbone`` is neither a string nor a module (``None`` is what a checkpoint of a task built with
            an injected module holds; the message says to pass the module again).
        CheckpointMismatchError: ``checkpoint_path`` does not fit the module (the keys are listed).
    """
    if isinstance(backbone, str):
        return create_model(backbone, pretrained=pretrained, checkpoint_path=checkpoint_path, **kwargs)
    if backbone is None:
        raise TypeError(
            "backbone is None: the task was built with an injected backbone module, which checkpoints do not store "
            "among their hyper-parameters. Pass the module again, e.g. Task.load_from_checkpoint(path, "
            "backbone=module), or run through the CLI with the saved config."
        )
    if not isinstance(backbone, nn.Module):
        raise TypeError(
            f"backbone must be a registered model name or an nn.Module, got {type(backbone).__name__}: {backbone!r}."
        )
    name = f"{type(backbone).__module__}.{type(backbone).__qualname__}"
    if pretrained:
        raise ValueError(
            f"pretrained=True cannot apply to the injected backbone module {name}: give its weights with "
            "checkpoint_path=<file>, or give the backbone by its registered name."
        )
    ignored = sorted(k for k, v in kwargs.items() if v is not None)
    if ignored:
        warnings.warn(
            f"The backbone is an injected module ({name}); the model arguments {ignored} apply only to a backbone "
            "given by name and are ignored. Put them in the module's init_args instead.",
            stacklevel=2,
        )
    if checkpoint_path is not None:
        load_checkpoint_into(backbone, checkpoint_path, f"the injected backbone {name}")
    return backbone


def load_checkpoint_into(
    module: nn.Module,
    checkpoint_path: str | os.PathLike[str],
    what: str,
    strip_prefixes: tuple[str, ...] = DEFAULT_STRIP_PREFIXES,
) -> None:
    """Load a weight file into ``module`` strictly, through the safe loader.

    Args:
        module: The module to fill.
        checkpoint_path: Weight file (safetensors, state dict or Lightning checkpoint; see
            :func:`visionkit.weights.load_state_dict`).
        what: How error messages name the module, e.g. ``"the injected backbone ResNet"``.
        strip_prefixes: Key prefixes removed first (e.g. ``"model."`` for a task's Lightning checkpoint).

    Raises:
        CheckpointMismatchError: Missing, unexpected or mis-shaped keys (listed in the message).
    """
    load_state_dict_into(module, load_state_dict(checkpoint_path, strip_prefixes=strip_prefixes), checkpoint_path, what)
