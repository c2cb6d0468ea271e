"""The one safe way visionkit reads and writes weights.

Reading: ``.safetensors`` goes to :func:`safetensors.torch.load_file` (a format that cannot carry code); everything
else goes to ``torch.load(map_location=..., weights_only=True)``. A pickle that needs globals outside PyTorch's
allowlist is refused with :class:`UnsafeCheckpointError`; there is no fallback to ``weights_only=False``, ever.
Containers (``state_dict`` / ``model`` / ``module`` / ``model_state``, Lightning ``.ckpt``) are unwrapped and the
``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) prefixes are stripped.

Writing: :func:`save_state_dict` and :func:`atomic_torch_save` go through :func:`visionkit.utils.atomic_write`
(temporary file in the destination folder, fsync, ``os.replace``), so a crash or a full disk never leaves a
half-written file under the final name.

This module is part of the models layer: it imports torch, safetensors and ``visionkit.utils`` only (no Lightning, no
timm).
"""

from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import warnings
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO, Any

import safetensors
import safetensors.torch
import torch
from torch import Tensor, nn

from visionkit.utils.io import atomic_write

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "describe_key_mismatch",
    "extract_state_dict",
    "find_weight_file",
    "key_mismatch",
    "load_metadata",
    "load_state_dict",
    "load_state_dict_into",
    "mismatch_message",
    "save_state_dict",
]

#: Containers unwrapped by default, in this order (timm, torchvision, DDP and Lightning conventions).
DEFAULT_CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model", "module", "model_state")
#: Wrapper prefixes stripped by default: DDP (``module.``) and ``torch.compile`` (``_orig_mod.``).
DEFAULT_STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")
#: Suffixes of pickle checkpoints recognised in a directory, after ``*.safetensors``.
PICKLE_SUFFIXES: tuple[str, ...] = (".pth", ".pt", ".bin", ".ckpt")
#: Globals allowed on top of PyTorch's own allowlist: training scripts (timm's included) store their
#: ``argparse.Namespace``; it only holds attributes and runs no code when unpickled (timm ``_helpers._torch_load``).
EXTRA_SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
#: How many keys of each kind a mismatch message lists.
MAX_KEYS_SHOWN = 10


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read, or does not hold a state dict. The message names the file."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A pickle checkpoint references globals outside the weights-only allowlist and was refused for safety.

    Also a :class:`pickle.UnpicklingError`, the type ``torch.load(weights_only=True)`` itself raises, so existing
    handlers keep working.

    Attributes:
        path: The refused file.
        unsafe_globals: The offending globals, ``module.qualname`` (e.g. ``posix.system``).
    """

    def __init__(self, path: Path, unsafe_globals: list[str]) -> None:
        self.path = path
        self.unsafe_globals = unsafe_globals
        super().__init__(
            f"Refusing to load {path}: it is a pickle that references non-allowlisted globals "
            f"({', '.join(unsafe_globals)}). Unpickling it could execute arbitrary code, so it is refused for safety "
            "(torch.load(weights_only=True); visionkit never falls back to weights_only=False). If you trust where "
            "the file comes from, convert it once: "
            f"`python tools/convert_checkpoint.py {path} model.safetensors --trust-pickle`, or "
            "in Python unpickle it with `torch.load` and `weights_only=False`, then save its tensors with "
            "`visionkit.weights.save_state_dict(..., 'model.safetensors')`; load the converted file."
        )


class CheckpointMismatchError(CheckpointError):
    """A state dict does not fit a model: missing or unexpected keys, or shape mismatches."""


def describe_key_mismatch(
    missing: Iterable[str], unexpected: Iterable[str], other: Iterable[str] = (), limit: int = MAX_KEYS_SHOWN
) -> str:
    """Summarise a failed state-dict load in a few lines, listing the first ``limit`` keys of each kind.

    Args:
        missing: Keys the model has and the state dict lacks.
        unexpected: Keys the state dict has and the model lacks.
        other: Further problems, one line each (for example PyTorch's ``size mismatch for ...`` lines).
        limit: Number of entries shown per kind; the rest are counted.

    Returns:
        The summary; empty when all three are empty.
    """
    lines = []
    for title, items in (("missing keys", list(missing)), ("unexpected keys", list(unexpected))):
        if items:
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            lines.append(f"{title} ({len(items)}): {', '.join(items[:limit])}{more}")
    other = list(other)
    if other:
        more = [f"... ({len(other) - limit} more)"] if len(other) > limit else []
        lines.append(f"other problems ({len(other)}): " + "; ".join(other[:limit] + more))
    return "\n".join(lines)


def key_mismatch(model: nn.Module, state: Mapping[str, Tensor]) -> tuple[list[str], list[str], list[str]]:
    """``(missing, unexpected, shape problems)`` of loading ``state`` into ``model`` (empty lists: it fits)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    return missing, unexpected, shapes


def mismatch_message(
    source: str | os.PathLike[str],
    what: str,
    missing: list[str],
    unexpected: list[str],
    other: Iterable[str] = (),
    classifiers: Iterable[str] = (),
) -> str:
    """The error message of a checkpoint that does not fit a model, with a hint where the cause is recognisable.

    Args:
        source: The checkpoint file.
        what: A short name of the model (``"model 'resnet18'"``, ``"open_clip ViT-B-16"``).
        missing: Keys the model has and the checkpoint lacks.
        unexpected: Keys the checkpoint has and the model lacks.
        other: Further problems, one line each (shape mismatches).
        classifiers: Module names of the model's classifier head (timm's ``pretrained_cfg["classifier"]``), for the
            "checkpoint without a head" hint.

    Returns:
        A header line, the summary of :func:`describe_key_mismatch`, then the hints.
    """
    lines = [f"Checkpoint {source} does not fit {what}:", describe_key_mismatch(missing, unexpected, other)]
    head_keys = {f"{c}.{p}" for c in classifiers for p in ("weight", "bias")}
    if missing and set(missing) <= head_keys and not unexpected:
        lines.append("The checkpoint has no classifier: pass num_classes=<n> for a new head, or num_classes=0.")
    prefix = _common_extra_prefix(missing, unexpected)
    if prefix:
        lines.append(
            f"Its keys carry an extra {prefix!r} prefix (a LightningModule attribute?): convert it once with "
            f"save_state_dict(load_state_dict(path, strip_prefixes=('module.', '_orig_mod.', {prefix!r})), out)."
        )
    return "\n".join(lines)


def _common_extra_prefix(missing: list[str], unexpected: list[str]) -> str | None:
    """``"model."`` if every unexpected key is ``"model." + <a missing key>``, else ``None``."""
    if not missing or not unexpected:
        return None
    prefixes = {key.split(".", 1)[0] + "." for key in unexpected if "." in key}
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    stripped = {key[len(prefix) :] for key in unexpected}
    return prefix if set(missing) <= stripped else None


def load_state_dict_into(
    model: nn.Module,
    state: Mapping[str, Tensor],
    source: str | os.PathLike[str],
    what: str,
    classifiers: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``model`` strictly, or raise an error that lists every problem.

    Args:
        model: The module to fill.
        state: Its state dict, keys already in the model's layout.
        source: Where ``state`` came from (a file), named in the error.
        what: A short name of the model (``"open_clip ViT-B-16"``), named in the error.
        classifiers: The model's classifier module names, for the error's hint (see :func:`mismatch_message`).

    Raises:
        CheckpointMismatchError: Missing or unexpected keys, or shape mismatches; all are listed.
    """
    missing, unexpected, shapes = key_mismatch(model, state)
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(mismatch_message(source, what, missing, unexpected, shapes, classifiers))
    model.load_state_dict(state, strict=True)


def find_weight_file(directory: str | os.PathLike[str]) -> Path:
    """Pick the one weight file in ``directory``: a ``*.safetensors`` if there is one, else a pickle checkpoint.

    Args:
        directory: Folder to look in (not recursive).

    Returns:
        The path of the weight file.

    Raises:
        CheckpointError: Several candidates of the preferred kind (the choice would be a guess).
        FileNotFoundError: No ``*.safetensors``, ``*.pth``, ``*.pt``, ``*.bin`` or ``*.ckpt`` file in the folder.
    """
    directory = Path(directory)
    safetensors_files = sorted(directory.glob("*.safetensors"))
    pickle_files = sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    for candidates in (safetensors_files, pickle_files):
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            names = ", ".join(p.name for p in candidates)
            raise CheckpointError(f"{directory} holds several weight files ({names}); pass the path of one of them.")
    raise FileNotFoundError(
        f"No weight file in {directory}: expected one *.safetensors or one of *{', *'.join(PICKLE_SUFFIXES)}."
    )


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip_prefixes: Iterable[str] = DEFAULT_STRIP_PREFIXES,
    map_location: str | torch.device = "cpu",
    hint: str | None = None,
) -> dict[str, Tensor]:
    """Read a flat state dict from a weight file or a folder holding one, safely.

    ``*.safetensors`` is read with safetensors; every other file with ``torch.load(weights_only=True)``. The loaded
    object is unwrapped: ``key`` if given (e.g. ``"state_dict_ema"`` or ``"model_ema"``; EMA weights are only used
    when asked for), then the first of ``state_dict``, ``model``, ``module``, ``model_state`` that holds a dict,
    repeatedly, until a flat dict of tensors remains (a Lightning ``.ckpt`` yields its ``state_dict``). Entries that
    are not tensors are dropped with a warning that counts them.

    Args:
        path: A weight file, or a folder with exactly one (see :func:`find_weight_file`).
        key: Entry of the checkpoint dict to take first.
        strip_prefixes: Prefixes removed from every key, repeatedly and in any order (``module._orig_mod.x`` →
            ``x``). Lightning checkpoints prefix keys with the LightningModule attribute (``model.``); add it here.
        map_location: Device the tensors are put on.
        hint: Appended to the :class:`FileNotFoundError` message, e.g. where to download the file.

    Returns:
        ``{name: tensor}`` with the dtypes and shapes stored in the file.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it, plus ``hint``).
        UnsafeCheckpointError: The pickle references non-allowlisted globals (it is never unpickled).
        CheckpointError: Corrupt or truncated file, ``key`` not present, no tensors, or two keys that collide once
            the prefixes are stripped.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}" + (f". {hint}" if hint else ""))
    if path.is_dir():
        path = find_weight_file(path)
    if path.suffix == ".safetensors":
        obj: Any = _load_safetensors(path, map_location)
    else:
        obj = _torch_load_weights_only(path, map_location)
    return extract_state_dict(obj, path, key=key, strip_prefixes=strip_prefixes)


def extract_state_dict(
    obj: Any,
    source: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip_prefixes: Iterable[str] = DEFAULT_STRIP_PREFIXES,
) -> dict[str, Tensor]:
    """Unwrap a loaded checkpoint object into a flat ``{name: tensor}`` dict (the second half of ``load_state_dict``).

    Args:
        obj: What the checkpoint file held (a dict, possibly nested in ``state_dict`` / ``model`` / ...).
        source: The file it came from, named in error messages.
        key: Entry to take first (see :func:`load_state_dict`).
        strip_prefixes: Key prefixes to remove.

    Returns:
        The flat state dict.

    Raises:
        CheckpointError: ``key`` not present, no state dict, no tensors, or colliding keys.
    """
    path = Path(source)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            raise CheckpointError(f"{path} has no entry {key!r}; its top-level entries are: {_describe_entries(obj)}.")
        obj = obj[key]
    obj = _unwrap_containers(obj)
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} does not hold a state dict: it holds a {type(obj).__name__}.")
    state = _tensor_leaves(obj, path, key)
    return _strip_prefixes(state, tuple(strip_prefixes), path)


def load_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read the ``metadata`` that :func:`save_state_dict` stored with a state dict.

    Args:
        path: A ``.safetensors`` file (metadata from its header, tensors are not read) or a pickle checkpoint.

    Returns:
        The metadata; empty if the file has none.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: The file cannot be read (see :func:`load_state_dict`).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt") as reader:
                return dict(reader.metadata() or {})
        except safetensors.SafetensorError as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    obj = _torch_load_weights_only(path, "cpu")
    metadata = obj.get("metadata") if isinstance(obj, Mapping) else None
    return dict(metadata) if isinstance(metadata, Mapping) else {}


def save_state_dict(
    state: Mapping[str, Tensor], path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a state dict atomically; ``.safetensors`` by suffix, else a ``torch.save`` pickle of plain tensors.

    For safetensors, tensors are made contiguous and tensors sharing storage (tied weights) are cloned, since the
    format stores each tensor on its own. A pickle holds ``{name: tensor}``, or ``{"state_dict": ..., "metadata":
    ...}`` when ``metadata`` is given; both load back with :func:`load_state_dict` exactly (dtypes including
    bfloat16, shapes, values).

    Args:
        state: ``{name: tensor}``; tensors are detached and saved from their current device.
        path: Destination file; its folder is created if needed. An existing file is replaced only once the new one
            is complete.
        metadata: String key/value pairs stored with the tensors (read back with :func:`load_metadata`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        TypeError: A key is not a string, a value is not a tensor, or metadata is not ``str -> str``.
    """
    path = Path(path).expanduser()
    tensors: dict[str, Tensor] = {}
    for name, value in state.items():
        if not isinstance(name, str):
            raise TypeError(f"save_state_dict({path}): keys must be strings, got {name!r}.")
        if not isinstance(value, Tensor):
            raise TypeError(f"save_state_dict({path}): {name!r} is a {type(value).__name__}, not a tensor.")
        tensors[name] = value.detach()
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not (isinstance(k, str) and isinstance(v, str))]
        if bad:
            raise TypeError(f"save_state_dict({path}): metadata must map str to str; offending keys: {bad}.")
        metadata = dict(metadata)
    if path.suffix == ".safetensors":
        contiguous = _unshare_storage(tensors)
        atomic_write(path, lambda tmp: safetensors.torch.save_file(contiguous, str(tmp), metadata=metadata))
    else:
        payload: dict[str, Any] = tensors if metadata is None else {"state_dict": tensors, "metadata": metadata}
        atomic_write(path, lambda tmp: _torch_save_to(payload, tmp))
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save(obj, path)``, atomically: temporary file in the same folder, fsync, ``os.replace``.

    Args:
        obj: Anything ``torch.save`` accepts (a Lightning checkpoint dict, for instance).
        path: Destination file; its folder must exist.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    atomic_write(path, lambda tmp: _torch_save_to(obj, tmp))
    return path


def _torch_save_to(obj: Any, tmp: Path) -> None:
    with tmp.open("wb") as file:
        torch.save(obj, file)


def _unshare_storage(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous tensors that each own their whole storage (what ``safetensors.torch.save_file`` requires)."""
    storage_users: dict[tuple[str, int], int] = {}
    for tensor in tensors.values():
        if tensor.numel():
            storage = (tensor.device.type, tensor.untyped_storage().data_ptr())
            storage_users[storage] = storage_users.get(storage, 0) + 1
    out = {}
    for name, tensor in tensors.items():
        shared = tensor.numel() and storage_users[(tensor.device.type, tensor.untyped_storage().data_ptr())] > 1
        partial = tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size()
        if shared or partial or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        out[name] = tensor
    return out


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Tensor]:
    try:
        return safetensors.torch.load_file(str(path), device=str(map_location))
    except safetensors.SafetensorError as error:
        raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {error}") from error


def _torch_load_weights_only(path: Path, map_location: str | torch.device) -> Any:
    with torch.serialization.safe_globals(list(EXTRA_SAFE_GLOBALS)):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as error:
            unsafe = _unsafe_globals(path)
            if unsafe:
                raise UnsafeCheckpointError(path, unsafe) from error
            raise CheckpointError(
                f"{path} is not a readable PyTorch checkpoint (corrupt, truncated, or not written by torch.save): "
                f"{_unpickler_reason(error)}"
            ) from error
        except EOFError as error:
            raise CheckpointError(f"{path} is empty or truncated: it ends before the checkpoint does.") from error
        except Exception as error:
            # Damaged input surfaces as almost any exception from the unpickler (KeyError on a bad memo index,
            # RuntimeError from the zip reader, ...); PyTorch's own message says which, and is kept.
            raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint: {_first_line(error)}") from error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    # PyTorch wraps the reason ("Unsupported operand 68") in boilerplate that suggests retrying with
    # weights_only=False; keep only the reason.
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = " ".join(line for line in lines if not line.startswith(boilerplate))
    return reason or type(error).__name__


def _unsafe_globals(path: Path) -> list[str]:
    """Globals that ``path``'s pickle needs and the weights-only unpickler refuses; read without unpickling."""
    if zipfile.is_zipfile(path):
        try:
            return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except (RuntimeError, ValueError, OSError, zipfile.BadZipFile):
            return []  # unreadable archive: reported as corrupt by the caller
    allowed = _allowed_global_names()
    return [name for name in _scan_pickle_globals(path) if name not in allowed]


def _allowed_global_names() -> set[str]:
    # PyTorch exposes the user allowlist publicly; its built-in one only through a private helper. Without the
    # helper every global counts as unsafe, which only lengthens the refusal message.
    names = {f"{g.__module__}.{g.__qualname__}" for g in EXTRA_SAFE_GLOBALS}
    for entry in torch.serialization.get_safe_globals():
        if isinstance(entry, tuple):  # (object, "module.name") entries name themselves
            names.add(entry[1])
        elif hasattr(entry, "__qualname__"):
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    builtin_allowlist = getattr(torch._weights_only_unpickler, "_get_allowed_globals", None)
    if builtin_allowlist is not None:
        names.update(builtin_allowlist())
    return names


_STRING_OPCODES = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_PUT_OPCODES = {"PUT", "BINPUT", "LONG_BINPUT"}
_GET_OPCODES = {"GET", "BINGET", "LONG_BINGET"}


def _scan_pickle_globals(path: Path, max_pickles: int = 8) -> list[str]:
    """``module.name`` of every global referenced by the pickle stream(s) at the start of ``path``.

    Uses :func:`pickletools.genops`, which decodes opcodes without executing them. A file may hold several
    pickles back to back (PyTorch's legacy format does), so streams are read until the first one that is not a pickle.
    """
    found: list[str] = []
    with path.open("rb") as file:
        for _ in range(max_pickles):
            try:
                found.extend(_globals_of_one_pickle(file))
            except (ValueError, EOFError):  # end of the pickles (or not a pickle at all)
                break
    return list(dict.fromkeys(found))


def _globals_of_one_pickle(file: IO[bytes]) -> list[str]:
    found = []
    memo: dict[int, str | None] = {}
    recent: list[str | None] = []  # values of the latest push opcodes, enough to resolve STACK_GLOBAL
    for opcode, arg, _position in pickletools.genops(file):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, _, qualname = str(arg).partition(" ")
            found.append(f"{module}.{qualname}")
        elif name == "STACK_GLOBAL" and len(recent) >= 2 and recent[-2] and recent[-1]:
            found.append(f"{recent[-2]}.{recent[-1]}")
        if name in _STRING_OPCODES:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else str(arg))
        elif name in _GET_OPCODES:
            recent.append(memo.get(int(arg)))
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in _PUT_OPCODES:
            memo[int(arg)] = recent[-1] if recent else None
        elif name != "FRAME":
            recent.append(None)
    return found


def _describe_entries(obj: Any, limit: int = 20) -> str:
    if not isinstance(obj, Mapping):
        return f"none (it holds a {type(obj).__name__})"
    entries = [f"{k} ({type(v).__name__})" for k, v in list(obj.items())[:limit]]
    return ", ".join(entries) + (f", ... ({len(obj) - limit} more)" if len(obj) > limit else "")


def _unwrap_containers(obj: Any, max_depth: int = 4) -> Any:
    for _ in range(max_depth):
        if not isinstance(obj, Mapping) or all(isinstance(v, Tensor) for v in obj.values()):
            return obj
        inner = next((obj[k] for k in DEFAULT_CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            return obj
        obj = inner
    return obj


def _tensor_leaves(obj: Mapping[Any, Any], path: Path, key: str | None) -> dict[str, Tensor]:
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        where = f"entry {key!r} of {path}" if key else str(path)
        raise CheckpointError(
            f"{where} holds no tensors; its entries are: {_describe_entries(obj)}. "
            "Pass key=<entry> to pick the one that holds the state dict."
        )
    dropped = [str(k) for k, v in obj.items() if not isinstance(v, Tensor)]
    if dropped:
        warnings.warn(
            f"{path}: dropped {len(dropped)} non-tensor entries from the state dict: {', '.join(dropped[:10])}"
            + (", ..." if len(dropped) > 10 else ""),
            stacklevel=3,
        )
    bad_keys = [k for k in tensors if not isinstance(k, str)]
    if bad_keys:
        raise CheckpointError(f"{path}: state dict keys must be strings, found {bad_keys[:5]}.")
    return tensors


def _strip_prefixes(state: dict[str, Tensor], prefixes: tuple[str, ...], path: Path) -> dict[str, Tensor]:
    if not prefixes:
        return state
    out: dict[str, Tensor] = {}
    origin: dict[str, str] = {}
    for original, tensor in state.items():
        name = original
        while prefix := next((p for p in prefixes if p and name.startswith(p)), None):
            name = name[len(prefix) :]
        if name in out:
            raise CheckpointError(
                f"{path}: keys {origin[name]!r} and {original!r} both become {name!r} once the prefixes "
                f"{list(prefixes)} are stripped; pass strip_prefixes=() or key=<entry>."
            )
        out[name] = tensor
        origin[name] = original
    return out
