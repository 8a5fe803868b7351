"""Process groups and model-parallel state (megatron-core parallel_state, gloo on CPU)."""

from casa_megatron.parallel.init import destroy_parallel, initialize_parallel

__all__ = ["destroy_parallel", "initialize_parallel"]
