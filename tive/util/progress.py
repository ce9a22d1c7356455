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

        # (records left, tokens left) of each planned batch, in order
        self._weights = deque((len(rows), float(np.maximum(lengths[rows], 1).sum()))
                              for rows in batches)
        self._records = sum(len(rows) for rows in batches)
        self._done = 0
        self.bar = tqdm(total=sum(w for _, w in self._weights), unit="tok", unit_scale=True,
                        **tqdm_args)
        self.bar.set_postfix_str(f"records 0/{self._records:,}", refresh=False)

    def update(self, n: int) -> None:
        """``n`` more records are done: a planned batch, or a piece of one when
        ``--batch-size auto`` cut it (each piece advances by its share of the tokens)."""
        self._done += n
        self.bar.set_postfix_str(f"records {self._done:,}/{self._records:,}", refresh=False)
        advance = 0.0
        while n > 0 and self._weights:
            rows, tokens = self._weights[0]
            take = min(n, rows)
            share = tokens * take / rows
            advance += share
            n -= take
            if take == rows:
                self._weights.popleft()
            else:
                self._weights[0] = (rows - take, tokens - share)
        self.bar.update(advance)

    def close(self) -> None:
        self.bar.close()
