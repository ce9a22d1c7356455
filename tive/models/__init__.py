"""Model families tive loads into transformers' native classes."""
