"""Run a segmenter over many images into a COCO results JSON: progress, resume, per-image errors.

:func:`run_inference` appends one JSON line per finished image to ``<output>.partial.jsonl`` (its records, or the
error that stopped it), so an interrupted run started again skips every image already there. At the end the records
of all images are written to ``output`` atomically. An image that cannot be read or segmented is reported (file and
error) and skipped; the run goes on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from visionkit.data.image_io import IMAGE_EXTENSIONS, read_image
from visionkit.eval.coco_results import coco_result_records
from visionkit.utils import write_json_atomic

__all__ = ["InferenceSummary", "coco_items", "folder_items", "run_inference"]


@dataclass
class InferenceSummary:
    """What a run did: images segmented now, skipped (already done), failed (with reasons) and records written."""

    done: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    records: int = 0


def folder_items(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Images of a folder (sorted by name) as ``(image_id, path)``, ids 1, 2, ... in that order."""
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return [(i + 1, p) for i, p in enumerate(paths)]


def coco_items(image_dir: str | os.PathLike[str], annotation_file: str | os.PathLike[str]) -> tuple[list, list]:
    """``(items, categories)`` of a COCO split: ``(image_id, path)`` per image and the file's category dicts."""
    content = json.loads(Path(annotation_file).read_text())
    items = [(int(im["id"]), Path(image_dir) / im["file_name"]) for im in content["images"]]
    return items, content.get("categories", [])


def _read_done(partial: Path) -> dict[int, dict[str, Any]]:
    done: dict[int, dict[str, Any]] = {}
    if partial.exists():
        for line in partial.read_text().splitlines():
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that image is simply done again
            done[int(entry["image_id"])] = entry
    return done


def run_inference(
    segment: Callable[[list[np.ndarray]], list[dict[str, torch.Tensor]]],
    items: Sequence[tuple[int, Path]],
    category_ids: Sequence[int],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 1,
    retry_failed: bool = False,
    show_progress: bool = True,
) -> InferenceSummary:
    """Segment every image of ``items`` and write the COCO results JSON.

    Args:
        segment: The segmenter (``ZipSegmenter`` / ``SamClipBaseline`` or any callable with their output).
        items: ``(image_id, path)`` pairs.
        category_ids: COCO category id of each vocabulary index (``labels`` of the segmenter index into it).
        output: The results JSON; progress is kept in ``<output>.partial.jsonl`` next to it.
        batch_size: Images per segmenter call (SAM encodes them in one batch when its prompter allows).
        retry_failed: Try again the images that failed in an earlier run (default: keep their error).
        show_progress: Show a progress bar.

    Returns:
        An :class:`InferenceSummary`.
    """
    output = Path(output)
    partial = output.with_name(output.name + ".partial.jsonl")
    partial.parent.mkdir(parents=True, exist_ok=True)
    done = _read_done(partial)
    if retry_failed:
        done = {k: v for k, v in done.items() if "error" not in v}
    summary = InferenceSummary(skipped=sum(1 for image_id, _ in items if image_id in done))
    todo = [(image_id, path) for image_id, path in items if image_id not in done]
    columns = (TextColumn("zip"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with partial.open("a") as log, Progress(*columns, disable=not show_progress) as progress:
        task = progress.add_task("images", total=len(todo))
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            images, ok = [], []
            for image_id, path in batch:
                try:
                    images.append(read_image(path).permute(1, 2, 0).numpy())
                    ok.append((image_id, path))
                except OSError as error:  # missing or undecodable: the message names the file
                    done[image_id] = {"image_id": image_id, "error": str(error)}
                    log.write(json.dumps(done[image_id]) + "\n")
            try:
                results = segment(images) if images else []
            except Exception as error:  # any failure of one batch is reported, the run goes on
                results = None
                for image_id, path in ok:
                    done[image_id] = {"image_id": image_id, "error": f"{path}: {type(error).__name__}: {error}"}
                    log.write(json.dumps(done[image_id]) + "\n")
            for (image_id, _), out in zip(ok, results or [], strict=False):
                categories = [category_ids[int(label)] for label in out["labels"].tolist()]
                records = coco_result_records(image_id, out["scores"], categories, masks=out["masks"])
                done[image_id] = {"image_id": image_id, "records": records}
                log.write(json.dumps(done[image_id]) + "\n")
                summary.done += 1
            log.flush()
            progress.advance(task, len(batch))
    records = [r for image_id, _ in items if "records" in done.get(image_id, {}) for r in done[image_id]["records"]]
    summary.failed = {i: done[i]["error"] for i, _ in items if "error" in done.get(i, {})}
    summary.records = len(records)
    write_json_atomic(records, output)
    return summary
