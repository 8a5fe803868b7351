"""``casa-eval``: held-out questions and video captions answered by greedy generation, through
the megatron model (a checkpoint, recomputation) and the exported Hugging Face model (its cache),
scored per question type and checked to agree (``cli.py``)."""
