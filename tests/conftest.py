"""Shared fixtures. megatron-core is imported once here so forked test workers inherit it."""

import os

os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")

import megatron.core  # noqa: E402,F401  (slow import, done once per session)
