"""Stage 2, the models: families, their registry, loading, and encoding a record into tokens."""
