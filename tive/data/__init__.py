"""Stage 1, the data: a mixture file read into records, their task labels, subsets written back."""
