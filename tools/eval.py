"""Evaluate: a checkpoint through the CLI, or a COCO results file offline.

python tools/eval.py validate --config configs/<...>.yaml --ckpt_path <file | last | best>
python tools/eval.py test --config configs/<...>.yaml --ckpt_path <file | last | best>
python tools/eval.py coco --gt instances_val2017.json --results results.json [--iou-type bbox segm] [--class-agnostic]
    [--segm-area {mask,box}]

``last`` is the run's ``checkpoints/last.ckpt``; ``best`` is the checkpoint that the config's ``ModelCheckpoint``
(``checkpoint.monitor``) recorded as best in it: a probe selects its epoch on val, then reports test with ``best``.

Exit status of ``coco``: 0 on success; 2 on bad input (a missing file, a file that is not JSON, a malformed record,
ids not in the ground truth), with a one-line ``error: <message>`` on stderr that names the file and the record.
"""

import sys
from collections.abc import Sequence

from visionkit.cli import coco_main
from visionkit.cli import main as cli_main

SUBCOMMANDS = ("validate", "test", "predict", "coco")


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand.

    Args:
        argv: The arguments after the script name (default: ``sys.argv[1:]``).

    Returns:
        0 on success (errors exit through ``SystemExit``: 2 for bad input to ``coco``).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] not in SUBCOMMANDS:
        sys.exit(f"usage: python tools/eval.py {{{','.join(SUBCOMMANDS)}}} ...  (see --help of each)\n\n{__doc__}")
    if args[0] == "coco":
        coco_main(args[1:])
    elif argv is None:
        cli_main()
    else:
        cli_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
