"""An exported folder on each device (issue 11: it "loads ... on CPU and on GPU"): written the way
``casa-convert export-hf`` writes it (config + remote code + safetensors, ``hf/folder.py``),
loaded in bf16 by ``AutoModelForCausalLM`` and moved to the device: its logits follow the CPU
float32 model's within bf16 tolerance, the cache lives on the device in bf16, and cached
generation gives what one uncached pass over the same tokens gives. The CUDA case runs on a lent
GPU (tools/gpu/round.sh core's tests); the CPU case runs the same code here. Unlike the other
tests in this folder it needs no exported training checkpoint (whose TP=2 training needs two
processes and, on a GPU machine, two GPUs): the weights are a random model's."""

from __future__ import annotations

import pytest
import torch
from support.hf_cases import IMG, hf_inputs, make_case

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA GPU"))]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from casa_megatron.config.schema import ModelConfig
    from casa_megatron.hf.config_map import casa_config_dict
    from casa_megatron.hf.folder import write_hf_folder
    from casa_megatron.hf.remote.configuration_casa import CasaConfig
    from casa_megatron.hf.remote.modeling_casa import CasaForCausalLM

    config = casa_config_dict(ModelConfig(), image_token_id=IMG)
    torch.manual_seed(0)
    model = CasaForCausalLM(CasaConfig(**config))
    with torch.no_grad():  # CASA's own weights away from their init, so the fusion matters
        for name, p in model.named_parameters():
            if ".casa_" in name:
                p.add_(0.05 * torch.randn_like(p))
    return write_hf_folder(tmp_path_factory.mktemp("device_load") / "casa", config, model.state_dict())


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_exported_folder_runs_in_bf16_on_the_device(folder, device):
    from transformers import AutoModelForCausalLM

    fp32 = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.bfloat16)
    model = model.to(device).eval()
    inputs = hf_inputs(make_case("video"))
    with torch.no_grad():
        ref = fp32(**inputs, use_cache=False).logits
        low = model(**{k: v.to(device) for k, v in inputs.items()}, use_cache=False).logits
    assert low.device.type == device and low.dtype == torch.bfloat16
    assert _rel(low.cpu(), ref) < 3e-2, f"bf16 on {device}: logits rel. error {_rel(low.cpu(), ref):.3g}"

    ids = inputs["input_ids"][:, :18]
    grid = inputs["image_grid_thw"][:int((ids == IMG).sum())]
    prompt = {"input_ids": ids, "pixel_values": inputs["pixel_values"][:int(grid.prod(-1).sum())],
              "image_grid_thw": grid}
    prompt = {k: v.to(device) for k, v in prompt.items()}
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, suppress_tokens=[IMG], use_cache=True,
                         return_dict_in_generate=True, output_logits=True, pad_token_id=0)
    row = (out.get("cache") or out.get("past_key_values")).rows[0]  # transformers >= 5.24 / before
    tensors = [t for kv in row.self_attn.values() for t in kv.view() if t is not None]
    assert tensors and {(t.device.type, t.dtype) for t in tensors} == {(device, torch.bfloat16)}
    with torch.no_grad():
        full = model(input_ids=out.sequences, pixel_values=prompt["pixel_values"], image_grid_thw=grid,
                     use_cache=False).logits
    for step, logits in enumerate(out.logits):
        assert _rel(logits.float(), full[:, ids.shape[1] - 1 + step].float()) < 2e-2, f"{device} step {step}"
