"""Convert a checkpoint into a plain ``.safetensors`` state dict that every visionkit loader reads safely.

    python tools/convert_checkpoint.py outputs/run/checkpoints/last.ckpt backbone.safetensors --strip-prefix model.
    python tools/convert_checkpoint.py official.pth official.safetensors --key model
    python tools/convert_checkpoint.py trusted_old_pickle.pth out.safetensors --trust-pickle
    python tools/convert_checkpoint.py outputs/openus/pretrain_synthetic/checkpoints/last.ckpt backbone.safetensors \
        --select-prefix teacher.backbone.          # one sub-network of a method's checkpoint (OpenUS: the teacher)

Without ``--trust-pickle`` the input is read exactly as visionkit reads weights (safetensors, or
``torch.load(weights_only=True)``), so a file that carries code is refused. ``--trust-pickle`` is the explicit, one-time
opt-in for a file whose origin you trust: it is unpickled with ``weights_only=False`` (which can run code stored in
it), and only its tensors are written out.
"""

import argparse
import sys
from pathlib import Path

import torch

from visionkit.weights import (
    DEFAULT_STRIP_PREFIXES,
    UnsafeCheckpointError,
    extract_state_dict,
    load_state_dict,
    save_state_dict,
)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", type=Path, help="checkpoint to convert (.ckpt, .pth, .pt, .bin, .safetensors)")
    parser.add_argument("dst", type=Path, help="output file (.safetensors recommended)")
    parser.add_argument("--key", default=None, help="entry to take first, e.g. state_dict_ema, model_ema, model")
    parser.add_argument(
        "--strip-prefix", action="append", default=[], help="key prefix to remove (repeatable), e.g. model."
    )
    parser.add_argument(
        "--select-prefix",
        default=None,
        help="keep only the keys under this prefix and remove it, e.g. teacher.backbone. (a sub-network)",
    )
    parser.add_argument(
        "--trust-pickle", action="store_true", help="unpickle with weights_only=False (only for files you trust)"
    )
    ns = parser.parse_args(argv)
    prefixes = (*DEFAULT_STRIP_PREFIXES, *ns.strip_prefix)
    try:
        state = load_state_dict(ns.src, key=ns.key, strip_prefixes=prefixes)
    except UnsafeCheckpointError as error:
        if not ns.trust_pickle:
            sys.exit(f"{error}\n\nRe-run with --trust-pickle only if you trust where {ns.src} comes from.")
        obj = torch.load(ns.src, map_location="cpu", weights_only=False)  # explicit opt-in, see --trust-pickle
        state = extract_state_dict(obj, ns.src, key=ns.key, strip_prefixes=prefixes)
    if ns.select_prefix:
        selected = {k[len(ns.select_prefix) :]: v for k, v in state.items() if k.startswith(ns.select_prefix)}
        if not selected:
            prefixes_found = sorted({k.split(".", 1)[0] + "." for k in state})
            sys.exit(
                f"error: {ns.src} has no keys under {ns.select_prefix!r}; its keys start with: "
                f"{', '.join(prefixes_found[:20])}"
            )
        state = selected
    out = save_state_dict(state, ns.dst, metadata={"converted_from": ns.src.name})
    total = sum(t.numel() for t in state.values())
    print(f"wrote {out}: {len(state)} tensors, {total:,} values")
    return out


if __name__ == "__main__":
    main()
