"""Task and instance values against slow, obviously-correct references."""

from __future__ import annotations

import mmap

import numpy as np
import pytest
from conftest import TOL, TOL32
from hypothesis import given, settings
from hypothesis import strategies as st

from tive.selection import values as val


def reference_instance_values(features: np.ndarray, tasks: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """O(N²): mean over valid j of the same task of cos(φ_i, φ_j), itself included."""
    f = features.astype(np.float64)
    norms = np.linalg.norm(f, axis=1)
    out = np.full(len(f), np.nan)
    for i in np.flatnonzero(valid):
        cos = []
        for j in np.flatnonzero(valid & (tasks == tasks[i])):
            denom = norms[i] * norms[j]
            cos.append(0.0 if denom == 0 else float(f[i] @ f[j]) / denom)
        out[i] = np.mean(cos)
    return out


problems = st.builds(
    lambda n, k, t, seed, zero, bad: _problem(n, k, t, seed, zero, bad),
    st.integers(1, 40), st.integers(1, 12), st.integers(1, 4), st.integers(0, 2**16),
    st.booleans(), st.booleans())


def _problem(n, k, t, seed, zero, bad):
    rng = np.random.default_rng(seed)
    feats = rng.normal(size=(n, k))
    codes = rng.integers(0, t, size=n)
    valid = np.ones(n, dtype=bool)
    if zero:
        feats[rng.integers(n)] = 0.0
    if bad and n > 1:
        valid[rng.integers(n)] = False
    return feats, codes, t, valid


@settings(max_examples=60, deadline=None)
@given(problems, st.integers(1, 50))
def test_instance_values_equal_pairwise_cosine_reference(problem, chunk_rows):
    feats, codes, t, valid = problem
    got, finite = val.instance_values(feats, codes, t, valid, chunk_rows=chunk_rows)
    assert finite.all()
    want = reference_instance_values(feats, codes, valid)
    np.testing.assert_array_equal(np.isnan(got), ~valid)
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=TOL)


@settings(max_examples=30, deadline=None)
@given(problems, st.integers(0, 2**16))
def test_instance_values_invariant_to_row_order_and_chunk_size(problem, seed):
    feats, codes, t, valid = problem
    perm = np.random.default_rng(seed).permutation(len(feats))
    base, _ = val.instance_values(feats, codes, t, valid, chunk_rows=len(feats))
    permuted, _ = val.instance_values(feats[perm], codes[perm], t, valid[perm], chunk_rows=3)
    np.testing.assert_allclose(permuted, base[perm], rtol=0, atol=TOL)


def test_instance_values_stream_a_memmap_in_chunks(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(103, 16)).astype(np.float16)
    np.save(tmp_path / "f.npy", feats)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    codes = rng.integers(0, 3, size=103)
    valid = np.ones(103, dtype=bool)

    class Spy:
        """Looks like the memmap, records how many rows each read takes."""
        shape, dtype, reads = mm.shape, mm.dtype, []

        def __getitem__(self, key):
            self.reads.append(key.stop - key.start if key.stop <= 103 else 103 - key.start)
            return mm[key]

    spy = Spy()
    got, _ = val.instance_values(spy, codes, 3, valid, chunk_rows=10)
    assert spy.reads and max(spy.reads) <= 10
    assert sum(spy.reads) == 2 * 103  # two passes, every row read exactly twice
    want = reference_instance_values(feats.astype(np.float64), codes, valid)
    np.testing.assert_allclose(got, want, atol=TOL32)  # fp16 input: float32 arithmetic


def test_task_values_are_mean_norms_of_valid_records():
    norms = np.array([1.0, 3.0, 10.0, 2.0, np.inf])
    codes = np.array([0, 0, 1, 1, 1])
    valid = np.array([True, True, False, True, False])
    got = val.task_values(norms, codes, 3, valid)
    assert got[0] == 2.0 and got[1] == 2.0 and np.isnan(got[2])


def test_non_finite_rows_are_flagged_and_take_no_part():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(6, 3))
    f[1, 2] = np.nan
    f[3, 0] = -np.inf
    codes, valid = np.zeros(6, dtype=int), np.ones(6, dtype=bool)
    got, finite = val.instance_values(f, codes, 1, valid, chunk_rows=2)
    assert finite.tolist() == [True, False, True, False, True, True]
    keep = finite.copy()
    want = reference_instance_values(f, codes, keep)
    np.testing.assert_array_equal(np.isnan(got), ~keep)
    np.testing.assert_allclose(got[keep], want[keep], atol=TOL)


def test_memmap_is_read_through_the_file_with_the_same_result(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.normal(size=(57, 9)).astype(np.float16)
    np.save(tmp_path / "f.npy", feats)
    mm = np.load(tmp_path / "f.npy", mmap_mode="r")
    assert val._whole_file_memmap(mm) and not val._whole_file_memmap(mm[5:])
    codes, valid = rng.integers(0, 2, size=57), np.ones(57, dtype=bool)
    a, _ = val.instance_values(mm, codes, 2, valid, chunk_rows=8)
    b, _ = val.instance_values(feats, codes, 2, valid, chunk_rows=8)
    np.testing.assert_array_equal(a, b)
    c, _ = val.instance_values(mm[5:], codes[5:], 2, valid[5:], chunk_rows=8)  # a slice
    d, _ = val.instance_values(feats[5:], codes[5:], 2, valid[5:], chunk_rows=8)
    np.testing.assert_array_equal(c, d)


def test_default_chunk_keeps_665k_by_8192_within_memory():
    rows = val.default_chunk_rows(8192)
    assert 1 <= rows and rows * 8192 * 8 <= 1 << 26


@pytest.mark.parametrize("n_tasks", [1, val.GEMM_TASKS, val.GEMM_TASKS + 1, 90])
def test_instance_values_with_few_and_many_tasks(n_tasks):
    """Both ways of taking each row's dot product with its own task's mean (one matrix product
    for few tasks, a gather for many) agree with the pairwise reference."""
    rng = np.random.default_rng(n_tasks)
    feats = rng.normal(size=(300, 7)).astype(np.float32)
    codes = rng.integers(0, n_tasks, size=300)
    valid = rng.random(300) > 0.1
    got, _ = val.instance_values(feats, codes, n_tasks, valid, chunk_rows=64)
    want = reference_instance_values(feats.astype(np.float64), codes, valid)
    np.testing.assert_array_equal(np.isnan(got), ~valid)
    np.testing.assert_allclose(got[valid], want[valid], rtol=0, atol=TOL32)


class _RecordingMap:
    """Stands in for a memmap's mmap: records each madvise call and passes it on."""

    def __init__(self, mm: mmap.mmap) -> None:
        self.mm, self.calls = mm, []

    def __len__(self) -> int:
        return len(self.mm)

    def madvise(self, advice: int, start: int, length: int) -> None:
        self.calls.append((advice, start, length))
        self.mm.madvise(advice, start, length)


@pytest.mark.skipif(not hasattr(mmap, "MADV_DONTNEED"), reason="no madvise on this platform")
@pytest.mark.parametrize("offset", [0, 100, 3 * mmap.ALLOCATIONGRANULARITY + 12])
def test_each_chunks_pages_are_released_exactly(tmp_path, offset):
    """The pages released after each chunk start at the page holding its first row and end at
    its last byte, whatever the file's header length."""
    rows = np.random.default_rng(0).normal(size=(500, 37)).astype(np.float32)
    (tmp_path / "f").write_bytes(b"\0" * offset + rows.tobytes())
    mm = np.memmap(tmp_path / "f", np.float32, "r", offset=offset, shape=rows.shape)
    row0 = mm.ctypes.data - np.frombuffer(mm._mmap, np.uint8).ctypes.data  # row 0 in the map
    mm._mmap = spy = _RecordingMap(mm._mmap)
    val.instance_values(mm, np.zeros(500, int), 1, np.ones(500, bool), chunk_rows=64)
    released = [(lo, lo + n) for advice, lo, n in spy.calls if advice == mmap.MADV_DONTNEED]
    starts = list(range(0, 500, 64)) * 2  # two passes
    assert len(released) == len(starts)
    for (lo, hi), start in zip(released, starts):
        stop = min(start + 64, 500)
        assert lo == (row0 + start * 37 * 4) // mmap.PAGESIZE * mmap.PAGESIZE
        assert hi == row0 + stop * 37 * 4


@pytest.mark.parametrize("mode", ["c", "r+"])
def test_changes_to_a_writable_memmap_are_kept_and_used(tmp_path, mode):
    """Releasing pages of a copy-on-write map would throw the caller's changes away."""
    np.save(tmp_path / "f.npy", np.random.default_rng(0).normal(size=(4096, 64)).astype(np.float32))
    mm = np.load(tmp_path / "f.npy", mmap_mode=mode)
    mm[:] = 1.0
    got, _ = val.instance_values(mm, np.zeros(4096, int), 1, np.ones(4096, bool), chunk_rows=512)
    assert (mm == 1.0).all()
    np.testing.assert_allclose(got, 1.0, atol=TOL32)


def test_huge_and_tiny_float32_rows_are_unit_vectors_like_any_other():
    """A float32 sum of squares overflows above ~1e19 and loses precision or underflows below
    ~1e-19; such rows are normalised in float64 (one direction at any scale has cosine 1)."""
    d = np.abs(np.random.default_rng(0).normal(size=64)).astype(np.float32)
    f = np.stack([d * np.float32(3e38 / d.max()), d * np.float32(1e20), d, 2 * d,
                  d * np.float32(1e-22), d * np.float32(1e-25)]).astype(np.float32)
    got, finite = val.instance_values(f, np.zeros(6, int), 1, np.ones(6, bool), chunk_rows=2)
    assert finite.all()
    np.testing.assert_allclose(got, 1.0, atol=TOL32)
    mixed = np.concatenate([f, -f])  # two opposite directions: every value 0
    got, _ = val.instance_values(mixed, np.zeros(12, int), 1, np.ones(12, bool), chunk_rows=3)
    np.testing.assert_allclose(got, 0.0, atol=TOL32)


@pytest.mark.parametrize("make", [lambda a: a.T.copy().T, lambda a: a[::2], lambda a: a[:, 1:]])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_contiguous_inputs_of_each_dtype(make, dtype):
    rng = np.random.default_rng(1)
    f = make(rng.normal(size=(80, 9)).astype(dtype))
    codes, valid = rng.integers(0, 3, len(f)), np.ones(len(f), bool)
    got, _ = val.instance_values(f, codes, 3, valid, chunk_rows=7)
    want = reference_instance_values(f.astype(np.float64), codes, valid)
    np.testing.assert_allclose(got, want, atol=TOL if dtype == np.float64 else TOL32)
