"""Zip (or the SAM + CLIP baseline) over an image folder or a COCO split -> a COCO results JSON.

Usage (COCO val2017 with the official weights; see docs/methods/zip.md)::

    python tools/zip_infer.py --coco data/coco --split val2017 \
        --clip-checkpoint weights/ViT-B-16.pt --boundary-checkpoint weights/RN50x64.pt \
        --sam-checkpoint weights/sam_vit_h_4b8939.pth --device cuda --output outputs/zip/val2017.json
    python tools/eval.py coco --gt data/coco/annotations/instances_val2017.json \
        --results outputs/zip/val2017.json --iou-type segm bbox [--class-agnostic]

``--images DIR --classes "cat,dog"`` runs on a folder (image ids 1, 2, ... in sorted path order, category ids 1..C in
the order of ``--classes``). Finished images are kept in ``<output>.partial.jsonl``: running the same command again
skips them. Images that fail are listed at the end and do not stop the run. The records are those ``ZipTask`` writes
(one code path, ``visionkit.methods.zip.inference.batch_records``); for several GPUs use ``tools/eval.py predict
--config configs/zip/zip_coco_val2017.yaml`` (docs/methods/zip.md §10).

Exit status: 0 when every image was segmented; 1 when some images failed (the results JSON holds the others; the
last line gives the number of failures, ``--retry-failed`` runs them again); 2 on bad input, with a one-line error
that names the file: a missing or unusable checkpoint, an annotation file that is not a COCO instances JSON, or a
``.partial.jsonl`` line that is not a progress entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from visionkit.methods.zip.inference import ResumeFileError, coco_items, folder_items, run_inference
from visionkit.methods.zip.segmenter import (
    FOUNDATION_ARGS,
    SamClipBaseline,
    ZipConfig,
    ZipSegmenter,
    build_segmenter,
    load_foundation_models,
)
from visionkit.weights import CheckpointError


def _arch(value: str) -> str | dict:
    """An open_clip architecture name, or a config dict given as JSON (tiny test models)."""
    return json.loads(value) if value.lstrip().startswith("{") else value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco", help="COCO root with <split>/ and annotations/instances_<split>.json")
    source.add_argument("--images", help="a folder of images")
    parser.add_argument("--split", default="val2017")
    parser.add_argument("--classes", help="comma-separated names (default with --coco: the split's categories)")
    parser.add_argument("--output", required=True, help="results JSON to write")
    parser.add_argument("--method", choices=("zip", "baseline"), default="zip")
    parser.add_argument("--clip-checkpoint", required=True, help="OpenAI ViT-B/16 (ViT-B-16.pt or safetensors)")
    parser.add_argument("--clip-arch", default="ViT-B-16", type=_arch, help="open_clip name, or a JSON config")
    parser.add_argument("--boundary-checkpoint", help="OpenAI RN50x64 (RN50x64.pt); needed for --method zip")
    parser.add_argument("--boundary-arch", default="RN50x64", type=_arch, help="open_clip name, or a JSON config")
    parser.add_argument("--sam-checkpoint", required=True, help="SAM, e.g. sam_vit_h_4b8939.pth")
    parser.add_argument("--sam-variant", default="vit_h", choices=("vit_h", "vit_l", "vit_b", "vit_test"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1, help="images per call (SAM encoder batch)")
    parser.add_argument("--limit", type=int, help="only the first N images")
    parser.add_argument("--retry-failed", action="store_true", help="run again the images that failed before")
    parser.add_argument("--class-agnostic", action="store_true", help="one class for every instance")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help=f"ZipConfig overrides, e.g. --set k=20 nms_iou=0.5 (keys: {', '.join(f.name for f in fields(ZipConfig))})",
    )
    return parser


def _config(pairs: list[str], class_agnostic: bool) -> ZipConfig:
    values: dict[str, object] = {"class_agnostic": class_agnostic}
    types = {f.name: f.type for f in fields(ZipConfig)}
    for pair in pairs:
        key, _, raw = pair.partition("=")
        if key not in types:
            raise SystemExit(f"error: unknown ZipConfig key {key!r}; keys: {', '.join(types)}")
        values[key] = json.loads(raw) if raw not in ("raster", "random") else raw
    return ZipConfig(**values)


def _items(args: argparse.Namespace) -> tuple[list, list[str], list[int]]:
    """``(items, class names, category ids)`` of the run."""
    if not args.coco:
        if not args.classes:
            raise SystemExit("error: --images needs --classes")
        names = [n.strip() for n in args.classes.split(",")]
        return folder_items(args.images), names, list(range(1, len(names) + 1))
    items, categories = coco_items(
        Path(args.coco) / args.split, Path(args.coco) / "annotations" / f"instances_{args.split}.json"
    )
    names = [c["name"] for c in categories]
    category_ids = [int(c["id"]) for c in categories]
    if args.classes:
        wanted = [n.strip() for n in args.classes.split(",")]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            raise SystemExit(f"error: {unknown} are not categories of the {args.split} annotations")
        category_ids = [category_ids[names.index(n)] for n in wanted]
        names = wanted
    return items, names, category_ids


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        items, names, category_ids = _items(args)
    except (FileNotFoundError, ValueError) as error:  # COCOFormatError too: the message names the file and entry
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.limit:
        items = items[: args.limit]
    config = _config(args.set, args.class_agnostic)
    try:
        segment = _build(args, names, config)
    except (FileNotFoundError, CheckpointError) as error:  # a missing or unusable checkpoint: say which and why
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        summary = run_inference(
            segment, items, category_ids, args.output, batch_size=args.batch_size, retry_failed=args.retry_failed
        )
    except ResumeFileError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(
        f"{args.output}: {summary.records} records; {summary.done} images segmented, {summary.skipped} already "
        f"done, {len(summary.failed)} failed"
    )
    if not summary.failed:
        return 0
    for image_id, error in summary.failed.items():
        print(f"  image {image_id}: {error}", file=sys.stderr)
    print(
        f"error: {len(summary.failed)} of {len(items)} images failed (listed above; --retry-failed runs them again)",
        file=sys.stderr,
    )
    return 1


def _build(args: argparse.Namespace, names: list[str], config: ZipConfig) -> ZipSegmenter | SamClipBaseline:
    if args.method == "zip" and not args.boundary_checkpoint:
        raise SystemExit("error: --method zip needs --boundary-checkpoint (OpenAI RN50x64)")
    models = load_foundation_models(**{key: getattr(args, key) for key in FOUNDATION_ARGS}, device=args.device)
    return build_segmenter(models, names, config, encoder_batch_size=args.batch_size)


if __name__ == "__main__":
    raise SystemExit(main())
