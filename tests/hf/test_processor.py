"""The exported processor: pixels identical to the training pipeline, Qwen2.5-VL's patch layout,
the chat template, and a fresh process that loads everything through remote code only."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap

import numpy as np
import torch
from PIL import Image


def _png(h=70, w=110, seed=0) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_pixels_equal_the_training_pipeline(exported):
    from transformers import AutoProcessor

    from casa_megatron.data.image_processing import CLIP_MEAN, CLIP_STD, normalize_pixels, process_image
    from casa_megatron.data.patches import image_to_patches

    processor = AutoProcessor.from_pretrained(exported[0] / "casa_parallel", trust_remote_code=True)
    assert type(processor).__name__ == "CasaProcessor"
    for seed, (h, w) in enumerate([(70, 110), (300, 200), (40, 40)]):
        data = _png(h, w, seed)
        pixels = process_image(data, processor.max_pixels, processor.min_pixels)
        ref, (gh, gw) = image_to_patches(normalize_pixels(pixels, CLIP_MEAN, CLIP_STD))
        out = processor(text="<bos> <image> w1", images=[Image.open(io.BytesIO(data))])
        assert torch.equal(out["pixel_values"], ref)
        assert out["image_grid_thw"].tolist() == [[1, gh, gw]]
        assert out["input_ids"].tolist() == [[2, 4, 8]]


def test_qwen_layout_equals_transformers_image_processor():
    """For the qwen2_5_vl encoder the patches follow transformers' Qwen2-VL layout exactly."""
    from transformers import Qwen2VLImageProcessor

    from casa_megatron.hf.remote.processing_casa import CLIP_MEAN, CLIP_STD, image_patches

    pixels = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 56, 84), dtype=np.uint8))
    ours, grid = image_patches(pixels, "qwen2_5_vl")
    ref = Qwen2VLImageProcessor(do_resize=False, image_mean=CLIP_MEAN, image_std=CLIP_STD)(
        images=[pixels.permute(1, 2, 0).numpy()], return_tensors="pt")
    assert grid == ref["image_grid_thw"][0].tolist()
    torch.testing.assert_close(ours, ref["pixel_values"], rtol=1e-5, atol=1e-5)


def test_chat_template_gives_the_training_layout(exported):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported[0] / "casa_parallel", trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w1 w2"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "w3"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    ids = processor(text=text, images=[np.zeros((28, 28, 3), np.uint8)])["input_ids"][0].tolist()
    tok = processor.tokenizer
    expected = [tok.bos_token_id, 4, *tok("w1 w2", add_special_tokens=False)["input_ids"],
                tok.convert_tokens_to_ids("<answer>"), *tok("w3", add_special_tokens=False)["input_ids"],
                tok.convert_tokens_to_ids("<eot>")]
    assert ids == expected


def test_fresh_process_loads_through_remote_code_only(exported, tmp_path):
    """A new interpreter loads model + processor and generates with nothing of casa_megatron imported."""
    folder = exported[0] / "casa_parallel"
    script = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from transformers import AutoModelForCausalLM, AutoProcessor
        model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained({str(folder)!r}, trust_remote_code=True)
        inputs = processor(text="<bos> w1 <image> w2 w3", images=[np.full((60, 90, 3), 128, np.uint8)])
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             suppress_tokens=[4])
        model.save_pretrained("resaved"); processor.save_pretrained("resaved")  # a user's fine-tuned copy
        again = AutoModelForCausalLM.from_pretrained("resaved", trust_remote_code=True)
        same = bool((again(**inputs).logits == model(**inputs).logits).all())
        leaked = sorted(m for m in sys.modules if m.split(".")[0] == "casa_megatron")
        print(json.dumps({{"model": type(model).__name__, "module": type(model).__module__,
                          "processor": type(processor).__name__, "new": out.shape[1] - inputs["input_ids"].shape[1],
                          "leaked": leaked, "resaved_same": same}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"model": "CasaForCausalLM", "module": result["module"], "processor": "CasaProcessor",
                      "new": 4, "leaked": [], "resaved_same": True}
    assert result["module"].startswith("transformers_modules.")
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [6, 3]  # <eot>, <eos>
