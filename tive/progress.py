"""Progress bars whose time left is honest.

Scoring runs batches longest first within each window (``--group-by-length``), so records per
second falls as a run goes on and a bar counted in records promises too early an end. Counted
in estimated tokens instead (the lengths the batches were planned with), a batch advances the
bar by the work it costs, and the time left follows.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np


class TokenBar:
    """A tqdm bar over estimated tokens, advanced one planned batch at a time.

    ``update(n)`` is called, as on a plain bar, with the number of records of the batch just
    finished; batches finish in the order of ``batches``. The postfix shows records done.

    Args:
        batches: the store rows of each batch, in the order they run.
        lengths: ``(N,)`` estimated tokens of every record of the mixture.
        **tqdm_args: passed to ``tqdm`` (``desc``, ``disable``, …).
    """

    def __init__(self, batches: Sequence[np.ndarray], lengths: np.ndarray,
                 **tqdm_args: Any) -> None:
        from tqdm.auto import tqdm

        self._weights = deque(int(np.maximum(lengths[rows], 1).sum()) for rows in batches)
        self._records = sum(len(rows) for rows in batches)
        self._done = 0
        self.bar = tqdm(total=sum(self._weights), unit="tok", unit_scale=True, **tqdm_args)
        self.bar.set_postfix_str(f"records 0/{self._records:,}", refresh=False)

    def update(self, n: int) -> None:
        """One more batch of ``n`` records is done."""
        self._done += n
        self.bar.set_postfix_str(f"records {self._done:,}/{self._records:,}", refresh=False)
        self.bar.update(self._weights.popleft() if self._weights else 0)

    def close(self) -> None:
        self.bar.close()
