"""Transformers remote code of the exported CASA model (copied into every export; see hf/folder.py)."""
