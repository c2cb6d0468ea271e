"""Model registry: visionkit models live in timm's registry, weights come from local files only.

:func:`register_model` registers an entry function with timm (so ``timm.create_model(name)`` works once the model
file is imported) and records it as a visionkit model. :func:`create_model` builds visionkit and timm models alike;
``checkpoint_path=`` reads the file with :func:`visionkit.weights.load_state_dict` and hands the tensors to timm's own
pretrained machinery (``pretrained_cfg_overlay=dict(state_dict=...)``), so the family's ``checkpoint_filter_fn``,
timm's classifier and input-channel adaptation, and the ``features_only`` wrapping all apply in timm's order (weights
first, wrapper after). timm loads non-strictly whenever it re-initialises a head; visionkit records the outcome of
that load and raises if any key other than a re-initialised classifier key is missing or unexpected.
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import sys
import threading
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import timm
import timm.models
from torch import Tensor, nn
from torch.nn.modules.module import register_module_module_registration_hook

from visionkit.weights import (
    CheckpointError,
    CheckpointMismatchError,
    load_state_dict,
    load_state_dict_into,
    mismatch_message,
)

__all__ = ["create_model", "find_local_weights", "list_models", "local_weights_dirs", "register_model"]

EntryFn = TypeVar("EntryFn", bound=Callable[..., nn.Module])

#: visionkit model name -> module that registered it.
_VISIONKIT_MODELS: dict[str, str] = {}
#: Environment variable naming the folder of local pretrained weights.
WEIGHTS_ENV_VAR = "VISIONKIT_WEIGHTS"
#: Suffixes looked for in the weights folders, in order.
LOCAL_WEIGHT_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth")


def register_model(fn: EntryFn) -> EntryFn:
    """Register a model entry function with timm's registry and as a visionkit model.

    Use it exactly like ``timm.models.register_model`` at the bottom of a model file: the model name is the function
    name, and pretrained cfgs are picked up from the module's ``default_cfgs`` (built with
    ``timm.models.generate_default_cfgs({"arch.tag": _cfg(...)})`` above the entry functions). The function should
    build through ``timm.models.build_model_with_cfg(..., pretrained_filter_fn=checkpoint_filter_fn,
    feature_cfg=...)`` so that ``checkpoint_path`` and ``features_only`` work.

    Args:
        fn: Entry function ``fn(pretrained=False, **kwargs) -> nn.Module``, defined at module level.

    Returns:
        ``fn`` unchanged.

    Raises:
        ValueError: The name is already a timm model that visionkit did not register (visionkit never shadows timm)
            or a visionkit model of another module, or ``fn``'s module is not importable by name (timm looks its
            ``default_cfgs`` up there).
    """
    name = fn.__name__
    if name not in _VISIONKIT_MODELS and timm.models.is_model(name):
        raise ValueError(
            f"register_model: {name!r} (from {fn.__module__}) is already a timm model; a visionkit model must not "
            "shadow it, so rename the entry function."
        )
    if _VISIONKIT_MODELS.get(name, fn.__module__) != fn.__module__:
        raise ValueError(
            f"register_model: {name!r} is registered by {_VISIONKIT_MODELS[name]} already; {fn.__module__} must "
            "use another name."
        )
    if fn.__module__ not in sys.modules:
        raise ValueError(
            f"register_model: module {fn.__module__!r} of {name!r} is not in sys.modules; define entry functions at "
            "module level of an imported module."
        )
    timm.models.register_model(fn)
    _VISIONKIT_MODELS[name] = fn.__module__
    return fn


def list_models(pattern: str = "*", *, include_timm: bool = False) -> list[str]:
    """Names of registered models matching an ``fnmatch`` pattern, sorted.

    Args:
        pattern: Shell-style pattern, e.g. ``"vmamba_*"`` or ``"*_test"``.
        include_timm: Also list timm's models.

    Returns:
        The matching visionkit model names (plus timm's when asked), sorted.
    """
    names = set(fnmatch.filter(_VISIONKIT_MODELS, pattern))
    if include_timm:
        names.update(timm.list_models(pattern))
    return sorted(names)


def local_weights_dirs() -> list[Path]:
    """Folders searched for pretrained weights of visionkit models: ``$VISIONKIT_WEIGHTS`` (if set), then the cache.

    Returns:
        ``[$VISIONKIT_WEIGHTS, ~/.cache/visionkit/weights]`` without the first when the variable is unset.
    """
    dirs = [Path.home() / ".cache" / "visionkit" / "weights"]
    if os.environ.get(WEIGHTS_ENV_VAR):
        dirs.insert(0, Path(os.environ[WEIGHTS_ENV_VAR]).expanduser())
    return dirs


def find_local_weights(name: str) -> Path | None:
    """The local weight file for a model: ``<dir>/<name>.safetensors`` or ``.pth`` in :func:`local_weights_dirs`.

    A name without a pretrained tag also matches the file of its default tag (``vmamba_tiny`` finds
    ``vmamba_tiny.in1k.safetensors`` when ``in1k`` is the default tag); a cfg whose ``file`` exists wins over both.

    Args:
        name: Model name, optionally ``arch.tag``.

    Returns:
        The first existing file, or ``None``.
    """
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.file and Path(cfg.file).expanduser().is_file():
        return Path(cfg.file).expanduser()
    for directory in local_weights_dirs():
        for stem in _weight_file_stems(name, cfg):
            for suffix in LOCAL_WEIGHT_SUFFIXES:
                candidate = directory / f"{stem}{suffix}"
                if candidate.is_file():
                    return candidate
    return None


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike[str] | None = None,
    features_only: bool = False,
    out_indices: Sequence[int] | None = None,
    *,
    checkpoint_key: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model (visionkit or timm), optionally with weights from a local file.

    Weights never come from the network for visionkit models: ``pretrained=True`` looks for
    :func:`find_local_weights` and otherwise raises an error naming the file to download and where to put it. For
    timm models ``pretrained=True`` is passed to timm, which honours ``HF_HUB_OFFLINE=1``.

    ``checkpoint_path`` is applied before any ``features_only`` wrapping, through the family's
    ``checkpoint_filter_fn``. The classifier size defaults to the checkpoint's: a 10-class checkpoint gives a
    10-class model. Passing a different ``num_classes`` (or a checkpoint without a head) gives a freshly initialised
    head of that size; every other parameter must be in the checkpoint, and the checkpoint may hold nothing else.
    ``in_chans`` other than the checkpoint's adapts the stem as timm does.

    Args:
        name: Model name, ``arch`` or ``arch.tag``; ``hf-hub:`` / ``local-dir:`` sources go straight to timm.
        pretrained: Load the pretrained weights (see above).
        checkpoint_path: Weight file or folder to initialise from (see :func:`visionkit.weights.load_state_dict`).
        features_only: Return timm's feature extractor: ``forward`` gives a list of feature maps.
        out_indices: Which feature levels ``features_only`` returns.
        checkpoint_key: Entry of the checkpoint to take first, e.g. ``"state_dict_ema"``.
        **kwargs: Model arguments (``num_classes``, ``in_chans``, ``img_size``, ``drop_path_rate``, ...); ``None``
            values are dropped so that models without such an argument keep working.

    Returns:
        The model (in training mode, on the CPU).

    Raises:
        ValueError: Unknown name (with close matches), a path-like name without source prefix, ``out_indices``
            without ``features_only``, or both ``pretrained`` and ``checkpoint_path``.
        FileNotFoundError: Missing checkpoint, or no local pretrained weights for a visionkit model.
        CheckpointMismatchError: The checkpoint does not fit the model (keys are listed).
        CheckpointError: The checkpoint cannot be read, or is refused as unsafe.
    """
    model_kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if out_indices is not None:
        if not features_only:
            raise ValueError(f"create_model({name!r}): out_indices={out_indices!r} needs features_only=True.")
        model_kwargs["out_indices"] = tuple(out_indices)
    if features_only:
        model_kwargs["features_only"] = True
    if checkpoint_path is not None and pretrained:
        raise ValueError(
            f"create_model({name!r}): pass either pretrained=True or checkpoint_path, not both "
            "(checkpoint_path is the weight source)."
        )
    if _has_source_prefix(name):
        if checkpoint_path is not None:
            raise ValueError(f"create_model({name!r}): a hf-hub:/local-dir: source brings its own weights.")
        return timm.create_model(name, pretrained=pretrained, **model_kwargs)
    arch, _ = timm.models.split_model_name_tag(name)
    if not timm.models.is_model(arch):
        raise ValueError(_unknown_model_message(name))
    if pretrained and arch in _VISIONKIT_MODELS:
        checkpoint_path = find_local_weights(name)
        if checkpoint_path is None:
            raise FileNotFoundError(_missing_weights_message(name))
    if checkpoint_path is None:
        return timm.create_model(name, pretrained=pretrained, **model_kwargs)
    return _create_from_checkpoint(name, Path(checkpoint_path).expanduser(), checkpoint_key, model_kwargs)


def _has_source_prefix(name: str) -> bool:
    if not isinstance(name, str) or not name:
        raise ValueError(f"create_model: the model name must be a non-empty string, got {name!r}.")
    try:
        source, _ = timm.models.parse_model_name(name)
    except ValueError as error:
        raise ValueError(
            f"{error} To initialise a registered architecture from a file, pass its name and checkpoint_path=<file>."
        ) from error
    return source is not None


def _unknown_model_message(name: str) -> str:
    arch, _ = timm.models.split_model_name_tag(name)
    close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
    suggestion = f"Close matches: {', '.join(close)}." if close else "No close match."
    return (
        f"Unknown model {name!r}. {suggestion} visionkit.list_models(include_timm=True) lists every name; a visionkit "
        "model is registered when its model file is imported (import visionkit.models)."
    )


def _weight_file_stems(name: str, cfg: Any) -> list[str]:
    arch, tag = timm.models.split_model_name_tag(name)
    stems = [name]
    if not tag and cfg is not None and cfg.tag:
        stems.append(f"{arch}.{cfg.tag}")
    return stems


def _missing_weights_message(name: str) -> str:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is not None and cfg.url:
        source = f"the checkpoint from {cfg.url}"
    elif cfg is not None and cfg.hf_hub_id:
        source = f"the weights of https://huggingface.co/{cfg.hf_hub_id}"
    else:
        source = "the official checkpoint named in the model's documentation"
    target = local_weights_dirs()[0] / f"{_weight_file_stems(name, cfg)[-1]}{LOCAL_WEIGHT_SUFFIXES[0]}"
    searched = ", ".join(str(d) for d in local_weights_dirs())
    return (
        f"No local pretrained weights for visionkit model {name!r} (visionkit never downloads). Download {source} "
        f"and save it as {target} (or with a .pth suffix); searched: {searched}. Set ${WEIGHTS_ENV_VAR} to the "
        "folder that holds it, or pass checkpoint_path=<file>."
    )


class _ZeroCopyOnDeepcopy(dict[str, Tensor]):
    """A state dict that ``copy.deepcopy`` returns as is.

    timm deep-copies the pretrained cfg that carries the in-memory state dict when it wraps a ``features_only``
    model (``pretrained_cfg_for_features``); sharing avoids one more copy of every tensor.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> _ZeroCopyOnDeepcopy:
        return self


class _LoadResultRecorder:
    """Record the missing / unexpected keys of the last ``load_state_dict`` on modules built in this block.

    timm loads pretrained weights non-strictly whenever it re-initialises a classifier and only logs the outcome. A
    global module-registration hook (active only in this block, on this thread) puts a load post-hook on every
    module that gets children while the model is built; the root's post-hook runs last, with the complete lists.
    """

    def __init__(self) -> None:
        self.missing_keys: list[str] | None = None
        self.unexpected_keys: list[str] = []
        self._thread = threading.get_ident()
        self._hooked: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._handles: list[Any] = []

    @property
    def loaded(self) -> bool:
        """Whether a ``load_state_dict`` ran on a module built in this block."""
        return self.missing_keys is not None

    def __enter__(self) -> _LoadResultRecorder:
        self._handles.append(register_module_module_registration_hook(self._on_register))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _on_register(self, parent: nn.Module, name: str, child: nn.Module | None) -> None:
        if threading.get_ident() == self._thread and parent not in self._hooked:
            self._hooked.add(parent)
            self._handles.append(parent.register_load_state_dict_post_hook(self._on_load))

    def _on_load(self, module: nn.Module, incompatible: Any) -> None:
        if threading.get_ident() == self._thread:
            self.missing_keys = list(incompatible.missing_keys)
            self.unexpected_keys = list(incompatible.unexpected_keys)


def _create_from_checkpoint(name: str, path: Path, checkpoint_key: str | None, kwargs: dict[str, Any]) -> nn.Module:
    state = load_state_dict(path, key=checkpoint_key)
    cfg = timm.models.get_pretrained_cfg(name)
    classifiers = _as_tuple(cfg.classifier) if cfg is not None else ()
    overlay = dict(kwargs.pop("pretrained_cfg_overlay", None) or {})
    overlay.update(state_dict=_ZeroCopyOnDeepcopy(state), file=str(path), custom_load=False)
    checkpoint_classes = _checkpoint_num_classes(state, classifiers)
    if checkpoint_classes is not None:
        # The file's head is in model layout: describe it as is, so timm keeps a head of the same size and does
        # not strip a background class (label_offset) that the file does not have.
        overlay.update(num_classes=checkpoint_classes, label_offset=0)
    cfg_classes = overlay.get("num_classes", cfg.num_classes if cfg is not None else None)
    head_reinitialised = bool(kwargs.get("features_only")) or kwargs.get("num_classes", cfg_classes) != cfg_classes
    # timm drops the classifier from the state dict (and loads non-strictly) when it re-initialises the head.
    allowed_missing = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")} if head_reinitialised else set()

    recorder = _LoadResultRecorder()
    try:
        with recorder:
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except RuntimeError as error:
        if not (recorder.loaded or _raised_in(error, "load_pretrained")):
            raise
        # PyTorch's message is a header plus one "\n\t"-separated line per problem; the recorder has the key lists.
        problems = str(error).split("\n\t")[1:]
        other = [line.strip() for line in problems if not line.startswith(("Missing", "Unexpected"))]
        if not recorder.loaded and not other:
            other = [str(error)]
        missing = [k for k in recorder.missing_keys or [] if k not in allowed_missing]
        raise CheckpointMismatchError(
            mismatch_message(path, f"model {name!r}", missing, recorder.unexpected_keys, other, classifiers)
        ) from error
    finally:
        del overlay
    _forget_state_dict(model)

    if not recorder.loaded:
        # The entry function did not go through timm's pretrained loading (it does not use build_model_with_cfg).
        if kwargs.get("features_only"):
            raise CheckpointError(
                f"create_model({name!r}, checkpoint_path={str(path)!r}, features_only=True): the entry function does "
                "not build through timm.models.build_model_with_cfg, so the checkpoint cannot be applied before the "
                "features_only wrapping."
            )
        load_state_dict_into(model, state, path, f"model {name!r}")
        return model
    missing = [k for k in recorder.missing_keys or [] if k not in allowed_missing]
    if missing or recorder.unexpected_keys:
        raise CheckpointMismatchError(
            mismatch_message(path, f"model {name!r}", missing, recorder.unexpected_keys, [], classifiers)
        )
    return model


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if not value:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _checkpoint_num_classes(state: dict[str, Tensor], classifiers: tuple[str, ...]) -> int | None:
    """Rows of the first classifier weight present in ``state`` (model key layout), ``None`` if there is none."""
    for classifier in classifiers:
        weight = state.get(f"{classifier}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def _raised_in(error: BaseException, function_name: str) -> bool:
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_code.co_name == function_name:
            return True
        traceback = traceback.tb_next
    return False


def _forget_state_dict(model: nn.Module) -> None:
    # timm keeps the pretrained cfg on the model (and a copy on a features wrapper); drop the tensors it carries so
    # they are neither kept alive nor saved with the model's hyper-parameters.
    for module in model.modules():
        for attribute in ("pretrained_cfg", "default_cfg"):
            cfg = module.__dict__.get(attribute)
            if isinstance(cfg, dict):
                cfg.pop("state_dict", None)
