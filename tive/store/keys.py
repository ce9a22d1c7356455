"""``STORE/keys.npy``: the record key of each row of a store (docs/design.md, "Record keys"),
what incremental scoring, merging and manifests match records by.

``(N,)`` of ``S32`` (32 ASCII hex digits). Stores written before it existed have none: they
still open and select as before, but cannot be grown, merged or matched by key until
``tive score`` is run once more with their own data (which adds the file, computing nothing
else).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tive.data.keys import KEY_DTYPE
from tive.errors import StoreError
from tive.store.format import Store
from tive.util.files import NPY_HEADER_ERRORS, atomic_path

KEYS_FILE = "keys.npy"


def has_keys(store: Store) -> bool:
    """Whether the store has its record keys."""
    return (store.root / KEYS_FILE).is_file()


def read_keys(store: Store, needed_for: str) -> np.ndarray:
    """The ``(N,)`` record keys of ``store``.

    Raises:
        StoreError: the store has none (an older store) or they do not fit it; ``needed_for``
            says what they were wanted for.
    """
    path = store.root / KEYS_FILE
    if not path.is_file():
        data = store.meta.get("data", {}).get("path") or "its data"
        raise StoreError(f"{store.root}: no record keys (a store written before they existed, "
                         f"or by `tive import`), needed {needed_for}; fix: run the same `tive "
                         f"score` once more with --data {data} (it adds them and computes "
                         f"nothing else), or score in a new --run")
    try:
        keys = np.load(path)
    except NPY_HEADER_ERRORS as e:
        raise StoreError(f"{path}: unreadable ({e}); fix: delete it and run the same `tive "
                         f"score` again to write it anew") from None
    if keys.dtype != KEY_DTYPE or keys.shape != (store.n_records,):
        raise StoreError(f"{path}: {keys.shape} of {keys.dtype}, expected ({store.n_records},) "
                         f"of {KEY_DTYPE}; fix: delete it and run the same `tive score` again")
    return keys


def write_keys(root: Path, keys: np.ndarray) -> None:
    """Write ``keys`` ``(N,)`` to ``root/keys.npy`` atomically (temporary name, rename)."""
    keys = np.asarray(keys, dtype=KEY_DTYPE)
    with atomic_path(Path(root) / KEYS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, keys)
