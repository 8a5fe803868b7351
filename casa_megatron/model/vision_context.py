"""What CASA layers need to see the images of a micro-batch, bundled in one object.

Image embeddings travel next to the text hidden states (see ``vlm.py``); everything else the
layers need (windows, rotary frequencies) is derived once per micro-batch and shared by all
layers, so the per-layer cost is only the attention itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from casa_megatron.model.windows import WindowLayout


@dataclass
class VisionContext:
    windows: WindowLayout
    text_rotary: Tensor  # [s, b, 1, d] frequencies of the text positions
    image_rotary: Optional[Tensor]  # [n_image_tokens, 1, d]; None = image keys unrotated
    num_image_tokens: int  # valid rows of the flattened image slots (the rest is padding)
