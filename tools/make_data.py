"""Write the synthetic demo datasets in their real on-disk formats.

Kinds: COCO, ADE20K, image-folder classification and an unlabelled pretraining collection (OpenUS layout).

python tools/make_data.py --root data/demo [--seed 0] [--kinds coco ade20k classification pretraining] [--force]

A kind whose folder already holds a complete set with the same settings is skipped (see
``visionkit.data.synthetic.write_demo_data``); ``--force`` rewrites it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from visionkit.data.synthetic import DEMO_KINDS, DEMO_SIZES, write_demo_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("data/demo"), help="output folder (default: data/demo)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    parser.add_argument("--kinds", nargs="+", choices=DEMO_KINDS, default=list(DEMO_KINDS), help="which sets to write")
    parser.add_argument("--force", action="store_true", help="rewrite sets that are already complete")
    return parser.parse_args(argv)


def describe(name: str, path: Path) -> str:
    """One line saying what ``path`` holds: files (and class folders) in a folder, or the content of a COCO JSON."""
    if path.is_dir():
        files = [p for p in path.rglob("*") if p.is_file()]
        return f"  {name:<18} {path}  ({len(files)} files)"
    if path.suffix == ".json":
        content = json.loads(path.read_text())
        crowd = sum(a["iscrowd"] for a in content["annotations"])
        return (
            f"  {name:<18} {path}  ({len(content['images'])} images, {len(content['annotations'])} annotations "
            f"of which {crowd} crowd, {len(content['categories'])} categories)"
        )
    return f"  {name:<18} {path}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    manifests = {kind: args.root / kind / "visionkit_manifest.json" for kind in args.kinds}
    before = {kind: path.stat().st_mtime_ns if path.is_file() else None for kind, path in manifests.items()}
    try:
        result = write_demo_data(args.root, seed=args.seed, kinds=args.kinds, force=args.force)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for kind, paths in result.items():
        skipped = before[kind] is not None and before[kind] == manifests[kind].stat().st_mtime_ns
        train, val = DEMO_SIZES[kind]
        per_class = " per class" if kind == "classification" else ""
        written = f"{train} train / {val} val images{per_class}"
        if kind == "pretraining":
            written = f"{val} datasets of {train} images"
        state = "already complete, skipped" if skipped else f"written: {written}"
        print(f"{kind}: {paths['root']} ({state}; seed {args.seed})")
        for name, path in paths.items():
            if name not in ("root", "manifest"):
                print(describe(name, path))
    return 0


if __name__ == "__main__":
    sys.exit(main())
