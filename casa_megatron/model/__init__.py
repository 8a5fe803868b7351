"""CASA vision-language models on megatron-core."""
