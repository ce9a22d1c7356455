"""Helpers every stage uses: atomic files and locks, hashing, progress bars, torchrun processes."""
