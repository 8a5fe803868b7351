"""Hugging Face <-> megatron conversion: declarative mapping tables (tables/), typed invertible
transforms, a streaming safetensors reader, the engine and ``casa-convert import-hf``."""
