"""Compatibility layers that let real megatron-core code run where it was not written to."""

from casa_megatron.compat.cpu import cpu_compat_enabled, enable_cpu_compat

__all__ = ["cpu_compat_enabled", "enable_cpu_compat"]
