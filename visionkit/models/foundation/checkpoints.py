"""Where the foundation-model weights come from, and how a local copy is read into a model.

visionkit never downloads: every checkpoint is a local file the user gives. This module knows where each official
file can be obtained (so that a missing file raises an error that says so), reads OpenAI's TorchScript CLIP
archives, and loads a state dict strictly, listing every missing, unexpected or mis-shaped key.

Reading OpenAI's ``.pt`` files: they are TorchScript archives, which ``torch.load(weights_only=True)`` refuses.
They are opened with ``torch.jit.load(map_location="cpu")`` and only their ``state_dict()`` is kept. That is safe
in the sense the weights-only loader is: a TorchScript archive holds TorchScript IR (a restricted language compiled
by the TorchScript compiler, not Python) and tensor data read by TorchScript's own C++ unpickler, which only builds
TorchScript types and never resolves arbitrary Python globals or calls ``__reduce__``. Nothing in the archive runs
unless one of its methods is called, and none is: the module is dropped once its tensors are copied out.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import torch
from open_clip.pretrained import get_pretrained_cfg
from torch import Tensor

from visionkit.weights import CheckpointError

__all__ = [
    "SAM_CHECKPOINTS",
    "clip_checkpoint_hint",
    "is_torchscript_archive",
    "read_torchscript_state_dict",
    "require_checkpoint",
    "sam_checkpoint_hint",
]

#: Official SAM checkpoints, variant -> (file name, URL) (facebookresearch/segment-anything README, "Model
#: Checkpoints").
SAM_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "vit_h": ("sam_vit_h_4b8939.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth"),
    "vit_l": ("sam_vit_l_0b3195.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth"),
    "vit_b": ("sam_vit_b_01ec64.pth", "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"),
}

#: Entries of OpenAI's TorchScript state dicts that are not weights (open_clip ``build_model_from_openai_state_dict``).
OPENAI_NON_WEIGHT_KEYS: tuple[str, ...] = ("input_resolution", "context_length", "vocab_size")


def clip_checkpoint_hint(arch: str, pretrained_tag: str = "openai") -> str:
    """Say where the weights of an open_clip architecture can be obtained, from open_clip's pretrained table.

    Args:
        arch: open_clip architecture name, e.g. ``"ViT-B-16"`` or ``"RN50x64"``.
        pretrained_tag: open_clip pretrained tag, e.g. ``"openai"``.

    Returns:
        A sentence naming the download URL and/or Hugging Face hub repository, or a generic pointer when open_clip
        knows no source for the pair.
    """
    cfg = get_pretrained_cfg(arch, pretrained_tag)
    sources = []
    if cfg.get("url"):
        sources.append(f"{cfg['url']} (a TorchScript archive, loadable as is)")
    if cfg.get("hf_hub"):
        sources.append(f"the Hugging Face hub repository {cfg['hf_hub'].rstrip('/')} (open_clip_model.safetensors)")
    if not sources:
        return (
            f"open_clip lists no '{pretrained_tag}' weights for {arch}; see open_clip.list_pretrained() for the "
            "architecture/tag pairs and where each is published."
        )
    return f"Download the {pretrained_tag} {arch} weights from " + " or ".join(sources) + " and pass the file's path."


def sam_checkpoint_hint(variant: str) -> str:
    """Say where the official SAM checkpoint of ``variant`` can be downloaded.

    Args:
        variant: ``"vit_h"``, ``"vit_l"`` or ``"vit_b"``; other names get a generic pointer.

    Returns:
        A sentence naming the file and its URL.
    """
    if variant not in SAM_CHECKPOINTS:
        return "See https://github.com/facebookresearch/segment-anything#model-checkpoints for the official files."
    name, url = SAM_CHECKPOINTS[variant]
    return f"Download the official SAM {variant} checkpoint {name} from {url} and pass the file's path."


def require_checkpoint(path: str | os.PathLike[str], hint: str) -> Path:
    """Return ``path`` as a :class:`~pathlib.Path` if it exists, else raise an error that says where to get it.

    Args:
        path: The checkpoint file (or a folder holding one weight file).
        hint: Where the file can be obtained (see :func:`clip_checkpoint_hint`, :func:`sam_checkpoint_hint`).

    Returns:
        The expanded path.

    Raises:
        FileNotFoundError: ``path`` does not exist; the message names it and carries ``hint``.
    """
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise FileNotFoundError(f"Checkpoint not found: {resolved}. {hint}")
    return resolved


def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with a ``constants.pkl`` record) rather than a state dict.

    Args:
        path: A file.

    Returns:
        ``True`` for files written by ``torch.jit.save`` (OpenAI's CLIP ``.pt`` files), ``False`` otherwise.
    """
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.rsplit("/", 1)[-1] == "constants.pkl" for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def read_torchscript_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Copy the tensors out of a TorchScript archive (see the module docstring for why this is safe).

    Args:
        path: A file written by ``torch.jit.save``.

    Returns:
        ``{name: tensor}`` on the CPU, with OpenAI's non-weight entries (``input_resolution``, ``context_length``,
        ``vocab_size``) removed.

    Raises:
        CheckpointError: The archive cannot be read.
    """
    try:
        with warnings.catch_warnings():
            # torch.jit.load is deprecated in favour of torch.export, but OpenAI's files are TorchScript archives.
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu")
    except RuntimeError as error:
        raise CheckpointError(f"{path} could not be read as a TorchScript archive: {error}") from error
    state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
    del module
    for key in OPENAI_NON_WEIGHT_KEYS:
        state.pop(key, None)
    return state
