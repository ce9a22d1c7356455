"""Stage 6, the store: the feature store's format, reading and writing it, external features."""
