"""Stage 5, projection: gradients to k features per record, and the projectors' registry."""
