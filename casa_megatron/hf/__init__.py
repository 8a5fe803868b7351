"""The Hugging Face side of casa_megatron: our own transformers remote code (``hf/remote/``),
the config translation (``config_map``) and the folder writer (``folder``) that exports use.

``hf/remote/`` must stay self-contained (torch / transformers / numpy / PIL only): an exported
folder loads with ``trust_remote_code=True`` in a process that never imports casa_megatron.
"""
