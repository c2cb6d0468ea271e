"""Train a task: ``python tools/train.py fit --config configs/<...>.yaml [--ckpt_path last]``.

A thin wrapper over :func:`visionkit.cli.main`; ``fit`` may be omitted. See ``--help`` for every option.
"""

import sys

from visionkit.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if args and args[0] in ("validate", "test", "predict"):
        sys.exit(f"tools/train.py runs `fit`; use tools/eval.py for `{args[0]}`.")
    if not args or args[0] != "fit":
        sys.argv[1:] = ["fit", *args]
    main()
