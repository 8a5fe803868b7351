"""casa_megatron: pretraining CASA vision-language models on megatron-core."""

__version__ = "0.1.0"
