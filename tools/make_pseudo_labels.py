"""Turn a COCO results JSON (Zip's output, or a trained model's predictions) into a COCO training set.

Usage::

    python tools/make_pseudo_labels.py RESULTS.json --images-from data/coco/annotations/instances_train2017.json \
        --output data/coco/annotations/zip_pseudo_train2017.json [--score-thresh 0.7] [--max-per-image 100]
        [--class-agnostic]

See ``visionkit.methods.zip.results_to_training_set`` and ``configs/zip/self_train_round*.yaml``.
"""

from __future__ import annotations

import argparse
import sys

from visionkit.methods.zip.pseudo_labels import results_to_training_set


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", help="COCO results JSON (list of records with RLE segmentations)")
    parser.add_argument("--images-from", required=True, help="instances JSON whose images/categories are reused")
    parser.add_argument("--output", required=True, help="instances JSON to write")
    parser.add_argument("--score-thresh", type=float, default=0.0, help="keep records with score >= this")
    parser.add_argument("--max-per-image", type=int, default=100, help="keep the best N records per image")
    parser.add_argument("--class-agnostic", action="store_true", help="one category 'object' for every record")
    args = parser.parse_args(argv)
    try:
        content = results_to_training_set(
            args.results,
            args.images_from,
            args.output,
            score_thresh=args.score_thresh,
            max_per_image=args.max_per_image,
            class_agnostic=args.class_agnostic,
        )
    except (OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    n_labels, n_images = len(content["annotations"]), len({a["image_id"] for a in content["annotations"]})
    print(f"wrote {args.output}: {n_labels} pseudo-labels on {n_images} of {len(content['images'])} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
