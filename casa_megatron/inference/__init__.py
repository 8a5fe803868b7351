"""Inference on exported Hugging Face models: live (streaming) video captioning."""
