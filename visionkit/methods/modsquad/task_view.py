"""A one-task view of a multi-task backbone: what a single-task head sees of the shared ``ModSquadViT``.

The generic tasks (Mask R-CNN on a feature pyramid, UperNet, a classification head) call their backbone without a task
(``forward_intermediates(x, ...)``, ``forward_features(x)``). :class:`TaskView` runs the shared model inside
``model.task(name)`` for each such call, so that every task's head can be built by the unchanged task code
(``InstanceSegmentationTask(backbone=TaskView(model, "coco"), ...)``).

The view holds **no parameters**: the shared model is kept outside the module tree (the multi-task module registers
it once, at ``backbone``), so the state dict, the optimiser and DDP see the backbone's weights exactly once. The view
refuses what would change the shared model for one task only (pruning its norm or blocks, a classifier with classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from timm.models._features import feature_take_indices
from torch import Tensor, nn

__all__ = ["TaskView"]


class TaskView(nn.Module):
    """Calls of a multi-task backbone with one task (see the module docstring).

    Args:
        model: The shared multi-task backbone (``ModSquadViT``: a ``task(name)`` context and the timm contract).
        task: The task's name (or index) in ``model``.

    Attributes:
        task_name: The task this view runs.
    """

    def __init__(self, model: nn.Module, task: str | int) -> None:
        super().__init__()
        if not callable(getattr(model, "task", None)):
            raise TypeError(f"TaskView needs a multi-task backbone with a `task(name)` context; got {type(model)}")
        model.task_index(task)  # unknown names fail here, not at the first forward
        self._shared = (model,)  # a tuple: not registered as a submodule
        self.task_name = task

    @property
    def model(self) -> nn.Module:
        """The shared backbone."""
        return self._shared[0]

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # feature_info, patch_embed, num_features, embed_dim, dynamic_img_size, group_matcher, ...
            return getattr(self._shared[0], name)

    def forward(self, x: Tensor) -> Tensor:
        """The shared model's ``forward`` for this task."""
        return self.model(x, task=self.task_name)

    def forward_features(self, x: Tensor) -> Tensor:
        """The shared model's ``forward_features`` for this task: tokens ``(B, 1 + h·w, D)``."""
        return self.model.forward_features(x, task=self.task_name)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """The shared model's ``forward_head`` (task-independent)."""
        return self.model.forward_head(x, pre_logits=pre_logits)

    def forward_intermediates(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        """The shared model's ``forward_intermediates`` for this task (same arguments)."""
        return self.model.forward_intermediates(x, *args, task=self.task_name, **kwargs)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """The kept block indices, without pruning: the other tasks still use every block, the norm and the pooling.

        The feature pyramid asks for pruning to drop parameters that would get no gradient; in a multi-task model
        they get one from the other tasks.
        """
        return feature_take_indices(len(self.model.blocks), indices)[0]

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Accept only what leaves the shared model unchanged: no classes (its own classifier is ``Identity``).

        Raises:
            ValueError: ``num_classes > 0`` or another pooling (each task's classifier lives in its own head).
        """
        if num_classes != 0 or (global_pool is not None and global_pool != self.model.global_pool):
            raise ValueError(
                "a task of a multi-task backbone keeps its classifier in its own head: the shared model is built "
                f"with num_classes=0 (got reset_classifier({num_classes}, {global_pool!r}))"
            )
        self.model.reset_classifier(0)

    def get_classifier(self) -> nn.Module:
        """The shared model's classifier (``Identity``: it has none)."""
        return self.model.get_classifier()

    def extra_repr(self) -> str:  # noqa: D102
        return f"task={self.task_name!r}, model={type(self.model).__name__}"
