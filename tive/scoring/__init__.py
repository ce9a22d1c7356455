"""Stage 4, scoring: per-record gradients of the key parameters, batch by batch, into the store."""
