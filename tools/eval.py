"""Evaluate: a checkpoint through the CLI, or a COCO results file offline.

python tools/eval.py validate --config configs/<...>.yaml --ckpt_path <file | last>
python tools/eval.py test --config configs/<...>.yaml --ckpt_path <file | last>
python tools/eval.py coco --gt instances_val2017.json --results results.json [--iou-type bbox segm] [--class-agnostic]
"""

import sys

from visionkit.cli import coco_main, main

SUBCOMMANDS = ("validate", "test", "predict", "coco")

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in SUBCOMMANDS:
        sys.exit(f"usage: python tools/eval.py {{{','.join(SUBCOMMANDS)}}} ...  (see --help of each)\n\n{__doc__}")
    if sys.argv[1] == "coco":
        coco_main(sys.argv[2:])
    else:
        main()
