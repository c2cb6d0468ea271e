"""Seeds derived from integers: the one rule every seeded stream of visionkit uses (shuffles, worker seeds, items)."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(*entropy: int) -> int:
    """A 63-bit seed that depends only on ``entropy`` (e.g. ``(seed, epoch, stream)``).

    NumPy's ``SeedSequence`` mixes the words, so neighbouring inputs give unrelated seeds.

    Args:
        *entropy: Integers (taken modulo 2**64, so negative values are allowed).

    Returns:
        An int in ``[0, 2**63)``, valid for ``torch.manual_seed`` and ``torch.Generator.manual_seed``.
    """
    words = [int(value) % 2**64 for value in entropy]
    return int(np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0] >> 1)
