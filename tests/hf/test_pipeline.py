"""transformers' ``pipeline("image-text-to-text")`` on an exported folder, as a VLM user calls it:
the same answers as ``AutoModelForCausalLM`` + ``apply_chat_template`` + ``generate``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

MAX_NEW = 6


def _conversation(seed: int, question: str):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    return [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(pixels)},
                                         {"type": "text", "text": question}]}]


@pytest.mark.parametrize("variant", ["casa_parallel", "insertion"])
def test_image_text_to_text_pipeline_equals_generate(exported, variant):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, pipeline

    folder = str(exported[0] / variant)
    conversations = [_conversation(0, "w1 w2"), _conversation(1, "w3 w4 w5")]
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    assert type(pipe.model).__name__ == "CasaForCausalLM"
    answers = [out[0]["generated_text"][-1]["content"]
               for out in (pipe(text=c, max_new_tokens=MAX_NEW, do_sample=False) for c in conversations)]

    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    expected = []
    for conversation in conversations:
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, max_new_tokens=MAX_NEW, do_sample=False)
        new = ids[0, inputs["input_ids"].shape[1]:]
        assert len(new) > 0
        expected.append(processor.decode(new, skip_special_tokens=True))
    # the pipeline decodes the answer after the prompt, so a word-level tokenizer's separating space
    # can lead it: the same tokens otherwise
    assert [a.strip() for a in answers] == [e.strip() for e in expected]
    assert any(a.strip() for a in answers)  # something was generated, not two empty strings
    assert type(AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)) is type(model)
