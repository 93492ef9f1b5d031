"""Test utilities: a zoo of tiny random transformers models (``tiny_models``)."""
