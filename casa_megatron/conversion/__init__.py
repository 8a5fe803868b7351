"""Hugging Face <-> megatron conversion: declarative mapping tables and typed transforms."""
