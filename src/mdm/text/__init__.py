"""Text encoders, the released models' tokeniser and precomputed-feature caches."""
