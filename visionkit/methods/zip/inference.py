"""Zip's images -> COCO result records, one path for ``ZipTask`` and ``tools/zip_infer.py``; resumable file runs.

:func:`batch_records` is the one function that turns a batch of images into COCO result records: it runs the segmenter
(:func:`segment_batch`: every box becomes its mask's tight box, as pycocotools' ``toBbox`` computes it) and builds the
records with :func:`~visionkit.eval.coco_result_records`. :class:`~visionkit.methods.zip.ZipTask` (validate / test /
predict through Lightning, one shard per rank) and :func:`run_inference` (one process over a list of files) both use
it, so a results JSON written by either reads the same.

:func:`run_inference` appends one JSON line per finished image to ``<output>.partial.jsonl`` (its records, or the
error that stopped it), so an interrupted run started again skips every image already there. A last line cut by the
interruption (not valid JSON) is dropped and that image is done again; any other line that is not a well-formed entry
(``{"image_id": int, "records": [...]}`` or ``{"image_id": int, "error": str}``) is an error naming the file and the
line. At the end the records of all images are written to ``output`` atomically. An image that cannot be read or
segmented is reported (file and error) and skipped; the run goes on.
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

from visionkit.data.coco import COCODataset
from visionkit.data.image_folder import UnlabeledImageFolder
from visionkit.data.image_io import read_image
from visionkit.eval.coco_results import coco_result_records
from visionkit.methods.zip.postprocess import mask_boxes
from visionkit.utils import write_json_atomic

__all__ = [
    "InferenceSummary",
    "ResumeFileError",
    "batch_records",
    "coco_items",
    "folder_items",
    "run_inference",
    "segment_batch",
]

#: A segmenter: ``[H, W, 3]`` uint8 RGB images -> one dict per image (``masks``, ``scores``, ``labels``, ...).
Segmenter = Callable[[list[np.ndarray]], list[dict[str, torch.Tensor]]]


class ResumeFileError(ValueError):
    """A ``.partial.jsonl`` progress file holds a line that is not a well-formed entry (the message names both)."""


@dataclass
class InferenceSummary:
    """What a run did: images segmented now, skipped (already done), failed (with reasons) and records written."""

    done: int = 0
    skipped: int = 0
    failed: dict[int, str] = field(default_factory=dict)
    records: int = 0


def segment_batch(segment: Segmenter, images: Sequence[np.ndarray]) -> list[dict[str, torch.Tensor]]:
    """Run ``segment`` on ``images`` and return its instances on the CPU, each box the tight box of its mask.

    Args:
        segment: ``ZipSegmenter``, ``SamClipBaseline`` or any callable with their output.
        images: ``[H, W, 3]`` uint8 RGB arrays at their original size.

    Returns:
        One dict per image: ``masks`` (K, H, W) bool, ``boxes`` (K, 4) float32 xyxy pixels (exclusive max, zeros for
        an empty mask), ``scores`` (K,) float, ``labels`` (K,) int64 vocabulary indices.
    """
    results = segment(list(images)) if len(images) else []
    out = []
    for result in results:
        masks = result["masks"].detach().cpu().bool()
        out.append(
            {
                "masks": masks,
                "boxes": mask_boxes(masks),
                "scores": result["scores"].detach().cpu().float(),
                "labels": result["labels"].detach().cpu().long(),
            }
        )
    return out


def batch_records(
    segment: Segmenter, images: Sequence[np.ndarray], image_ids: Sequence[int], category_ids: Sequence[int]
) -> list[list[dict[str, Any]]]:
    """COCO result records of a batch of images: :func:`segment_batch`, then one record per instance.

    Args:
        segment: The segmenter.
        images: ``[H, W, 3]`` uint8 RGB arrays at their original size.
        image_ids: The COCO id of each image.
        category_ids: COCO category id of each vocabulary index (the segmenter's ``labels`` index into it).

    Returns:
        The records of each image, in input order (``bbox`` = the mask's tight box, ``segmentation`` compressed RLE).
    """
    return [
        coco_result_records(
            int(image_id),
            instances["scores"],
            [category_ids[label] for label in instances["labels"].tolist()],
            boxes=instances["boxes"],
            masks=instances["masks"],
        )
        for image_id, instances in zip(image_ids, segment_batch(segment, images), strict=True)
    ]


def folder_items(folder: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """Images under a folder as ``(image_id, path)``: ids 1, 2, ... in sorted path order.

    The listing is :class:`~visionkit.data.UnlabeledImageFolder`'s (recursive, hidden names skipped), the one
    ``ImageFolderInferenceDataModule`` numbers, so ``ZipTask`` and ``tools/zip_infer.py --images`` give an image the
    same id.

    Raises:
        FileNotFoundError: The folder does not exist.
        ValueError: It holds no images.
    """
    return [(index + 1, path) for index, path in enumerate(UnlabeledImageFolder(folder).paths)]


def coco_items(
    image_dir: str | os.PathLike[str], annotation_file: str | os.PathLike[str]
) -> tuple[list[tuple[int, Path]], list[dict[str, Any]]]:
    """``(items, categories)`` of a COCO split: ``(image_id, path)`` per image, ``{"id", "name"}`` per category.

    The file is read and checked by :class:`~visionkit.data.COCODataset`; categories come in ascending id order (the
    contiguous label order of the dataset, which ``ZipTask`` uses as its vocabulary order).

    Raises:
        FileNotFoundError: The annotation file does not exist.
        COCOFormatError: It is not valid JSON or not an instances file (the message names the file and the entry).
    """
    dataset = COCODataset(image_dir, annotation_file, with_masks=False)
    infos = [dataset.get_image_info(index) for index in range(len(dataset))]
    items = [(int(info["id"]), Path(image_dir) / info["file_name"]) for info in infos]
    categories = [
        {"id": dataset.contiguous_to_category_id[label], "name": name} for label, name in enumerate(dataset.class_names)
    ]
    return items, categories


def _entry_problem(entry: Any) -> str | None:
    """Why ``entry`` is not a progress entry, or ``None`` when it is one."""
    if not isinstance(entry, dict):
        return f"expected a JSON object, got {type(entry).__name__}"
    image_id = entry.get("image_id")
    if isinstance(image_id, bool) or not isinstance(image_id, int):
        return f"no integer 'image_id' (got {image_id!r})"
    if not isinstance(entry.get("records"), list) and not isinstance(entry.get("error"), str):
        return "neither a 'records' list nor an 'error' string"
    return None


def _read_done(partial: Path) -> dict[int, dict[str, Any]]:
    """The entries of a progress file by image id; a last line cut by an interruption is removed from the file."""
    done: dict[int, dict[str, Any]] = {}
    if not partial.exists():
        return done
    data = partial.read_bytes()
    lines = data.split(b"\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            if number == len(lines):  # unterminated last line: cut by an interruption, that image is done again
                os.truncate(partial, len(data) - len(line))
                break
            raise ResumeFileError(
                f"{partial}: line {number} is not valid JSON ({error}); only the last line may be cut by an "
                "interruption. Delete the line (its image is done again) or the file (every image is)."
            ) from error
        problem = _entry_problem(entry)
        if problem is not None:
            raise ResumeFileError(
                f'{partial}: line {number} is not a progress entry ({{"image_id": int, "records": [...]}} or '
                f'{{"image_id": int, "error": "..."}}): {problem}. Delete the line or the file, or write to another '
                "output."
            )
        done[entry["image_id"]] = entry
    else:
        if data and not data.endswith(b"\n"):  # a complete last entry whose newline was cut: end the line
            with partial.open("ab") as handle:
                handle.write(b"\n")
    return done


def run_inference(
    segment: Segmenter,
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

    Raises:
        ResumeFileError: The progress file has a malformed line (other than a cut last line).
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
                records = batch_records(segment, images, [image_id for image_id, _ in ok], category_ids)
            except Exception as error:  # any failure of one batch is reported, the run goes on
                records = []
                for image_id, path in ok:
                    done[image_id] = {"image_id": image_id, "error": f"{path}: {type(error).__name__}: {error}"}
                    log.write(json.dumps(done[image_id]) + "\n")
            for (image_id, _), image_records in zip(ok, records, strict=False):
                done[image_id] = {"image_id": image_id, "records": image_records}
                log.write(json.dumps(done[image_id]) + "\n")
                summary.done += 1
            log.flush()
            progress.advance(task, len(batch))
    records = [r for image_id, _ in items if "records" in done.get(image_id, {}) for r in done[image_id]["records"]]
    summary.failed = {i: done[i]["error"] for i, _ in items if "error" in done.get(i, {})}
    summary.records = len(records)
    write_json_atomic(records, output)
    return summary
