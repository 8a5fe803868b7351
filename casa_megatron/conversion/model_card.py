"""``README.md`` of an exported folder: the model card a Hugging Face user reads first, and the
YAML header the Hub reads from it (``library_name`` and ``pipeline_tag`` choose the widget and the
"Use this model" snippet, ``base_model`` places the model in its base's model tree, ``license``,
``tags``).

Everything in it comes from what the export holds: the model config (architecture, fusion), the
training checkpoint's ``config.yaml`` (steps, data, optimizer, precision, layout), the run's
``metrics.jsonl`` rows *at the exported step* (an ``iter_100`` exported after the run went on to
step 200 gets step 100's scores, not the run's last), an import's source. A fact the export does
not have is left out, never guessed. The "Use" snippet is the one ``tests/hf/test_model_card.py``
runs in a fresh interpreter against the folder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import yaml

from casa_megatron.config.schema import ModelConfig

PAPER = "https://arxiv.org/abs/2512.19535"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hub spells repositories


@dataclass
class CardFacts:
    name: str  # the folder's name: the card's title
    format: str  # casa | qwen2_5_vl
    model: ModelConfig
    kind: str  # training | import
    step: Optional[int]
    parameters: int
    dtype: str
    repo_id: str  # what the snippet loads: a Hub id, else the folder's path
    lora: str = "merge"  # merge | separate (OUT_DIR/lora_adapter)
    train: Optional[Dict] = None  # a training checkpoint's config.yaml
    base_models: List[str] = field(default_factory=list)
    license: Optional[str] = None
    results: Dict[str, float] = field(default_factory=dict)  # at ``step``
    results_from: Optional[str] = None
    evaluations: List[Dict] = field(default_factory=list)  # casa-eval's eval.json of this checkpoint
    curves_to_step: Optional[int] = None  # the run's loss.png, copied into the folder, drawn to this step


# --- facts from the checkpoint's folders ----------------------------------------------------
def base_models_of(import_folder: Optional[Path]) -> List[str]:
    """The Hub id an ``import-hf`` folder came from, when its saved ``hf_config.json`` names one
    (``_name_or_path`` as transformers writes it; a local path is not an id and is left out)."""
    if import_folder is None or not (import_folder / "hf_config.json").is_file():
        return []
    try:
        name = json.loads((import_folder / "hf_config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        return []
    return [name] if isinstance(name, str) and HUB_ID.match(name) and not Path(name).exists() else []


def last_logged_step(run_dir: Path) -> Optional[int]:
    """The last step in the run's ``metrics.jsonl`` (how far its ``loss.png`` is drawn)."""
    path = run_dir / "metrics.jsonl"
    steps = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return max(steps, default=None)


def metrics_at_step(run_dir: Path, step: int) -> tuple[Dict[str, float], Optional[Path]]:
    """The training loss, validation losses and held-out generation scores the run in ``run_dir``
    logged at ``step`` (its ``metrics.jsonl``; the last row of each kind at that step), and that
    file; nothing when it has none. Lines that are not JSON (a run killed mid-write) are passed
    over; the file is only read."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}, None
    found: Dict[str, float] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or row.get("step") != step:
            continue
        if "loss" in row:
            found["train/loss"] = row["loss"]
        found.update({k: v for k, v in row.items() if k.startswith("valid_loss")})
        found.update({f"generation/{k}": v for k, v in (row.get("generation") or {}).items()})
    return found, (path if found else None)


def read_evaluation(path: Path, checkpoint: Path) -> Dict:
    """``casa-eval``'s ``eval.json`` at ``path``, checked to have scored ``checkpoint`` (the
    manifest digest it recorded, else, for results written before digests, the same folder):
    a card must not show another checkpoint's scores. ConversionError naming both otherwise."""
    from casa_megatron.conversion.errors import ConversionError
    from casa_megatron.training.ckpt_manifest import manifest_digest

    try:
        result = json.loads(Path(path).read_text())
        sides = result["sides"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"--eval-results {path}: not an eval.json written by casa-eval ({exc!r})") from None
    scored = result.get("checkpoint_folder") or result.get("checkpoint")
    digest, own = result.get("checkpoint_digest"), manifest_digest(checkpoint)
    same = (digest == own) if digest and own else (
        scored is not None and Path(scored).resolve() == Path(checkpoint).resolve())
    if "megatron" not in sides or not same:
        raise ConversionError(f"--eval-results {path}: it scored {scored or 'no megatron checkpoint'}"
                              f"{' (another manifest)' if digest and own and digest != own else ''}, not the exported "
                              f"checkpoint {checkpoint}; run casa-eval --checkpoint {checkpoint} for its scores")
    return {"file": str(path), "data": result.get("data"), "hf": result.get("hf"),
            "max_new_tokens": result.get("max_new_tokens"),
            "scores": {side: sides[side]["scores"] for side in sides}, "agreement": result.get("agreement")}


# --- the card -------------------------------------------------------------------------------
def model_card(facts: CardFacts) -> str:
    header = {"library_name": "transformers", "pipeline_tag": "image-text-to-text",
              "tags": _tags(facts)}
    if facts.license:
        header["license"] = facts.license
    if facts.base_models:
        header["base_model"] = list(facts.base_models)
    if facts.evaluations:
        header["model-index"] = [{"name": facts.name, "results": _model_index(facts.evaluations)}]
    sections = [f"# {facts.name}", _summary(facts), _architecture(facts), _training(facts), _results(facts),
                _evaluations(facts), _use(facts),
                f"## Paper\n\nCASA, \"Cross-Attention via Self-Attention\": arXiv:2512.19535, {PAPER}"]
    front = yaml.safe_dump(header, sort_keys=False).strip()
    return f"---\n{front}\n---\n\n" + "\n\n".join(s for s in sections if s) + "\n"


def _tags(facts: CardFacts) -> List[str]:
    tags = ["casa_megatron", "vision-language", facts.model.fusion.mechanism.replace("_", "-")]
    tags += ["casa", "custom_code"] if facts.format == "casa" else ["qwen2_5_vl"]
    return list(dict.fromkeys(tags))  # CASA's fusion in our format: "casa" once


def _fusion_text(m: ModelConfig) -> str:
    f = m.fusion
    if f.mechanism == "insertion":
        return "token insertion: image tokens are placed in the text stream, as in LLaVA / Qwen2.5-VL"
    layers = f.fusion_layers(m.lm.num_layers)
    where = f"layers {', '.join(map(str, layers))} of {m.lm.num_layers}"
    if f.mechanism == "cross_attention":
        gate = ", tanh-gated" if f.cross_attention_gate else ""
        return f"cross-attention to the image tokens of each text token's window{gate}, in {where}"
    shared = ", sharing self-attention's projections" if f.share_projections else ""
    return (f"CASA (cross-attention via self-attention: text queries attend, in one softmax, to the image "
            f"tokens of their window and the window's text up to themselves), placement `{f.placement}`"
            f"{shared}, in {where}")


def _summary(facts: CardFacts) -> str:
    m = facts.model
    origin = (f"trained with casa_megatron (megatron-core) and exported at step "
              f"{facts.step}" if facts.kind == "training" else
              "imported into casa_megatron from Hugging Face weights and exported without training")
    loader = ("Our own `model_type: casa` with its modeling code in this folder: load it with "
              "`trust_remote_code=True`." if facts.format == "casa" else
              "transformers' own `Qwen2_5_VLForConditionalGeneration`: no remote code.")
    return (f"A vision-language model {origin}.\n\nFusion: {_fusion_text(m)} ([paper]({PAPER})).\n\n{loader}"
            + (" The LoRA adapters are kept apart in `lora_adapter/` (PEFT); the weights here are the "
               "base they were trained on." if facts.lora == "separate" else ""))


def _table(rows: Sequence[tuple]) -> str:
    return "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def _architecture(facts: CardFacts) -> str:
    m = facts.model
    lm, vision = m.lm, m.vision
    rows = [("language model", f"{lm.family} family, {lm.num_layers} layers, hidden {lm.hidden_size}, "
                               f"{lm.num_attention_heads} query heads / {lm.num_query_groups} key-value groups, "
                               f"vocabulary {lm.vocab_size}"),
            ("vision encoder", f"{vision.encoder}, {vision.num_layers} blocks, hidden {vision.hidden_size}, "
                               f"patch {vision.patch_size}, {vision.spatial_merge_size}x{vision.spatial_merge_size} "
                               "merge"),
            ("fusion", m.fusion.mechanism), ("parameters", f"{facts.parameters:,}"), ("dtype", facts.dtype)]
    if m.fusion.mechanism != "insertion":
        rows.insert(3, ("fusion layers", ", ".join(map(str, m.fusion.fusion_layers(lm.num_layers)))))
    return "## Architecture\n\n" + _table(rows)


def _training(facts: CardFacts) -> str:
    t = facts.train
    if facts.kind != "training" or not t:
        return ""
    data, opt, par, prec = t.get("data", {}), t.get("optimizer", {}), t.get("parallel", {}), t.get("precision", {})
    sources = data.get("sources") or ([{"path": data["source"]}] if data.get("source") else [])
    blend = ", ".join(f"`{s.get('name') or s.get('path', '?')}`" + (f" (weight {s['weight']})" if "weight" in s else "")
                      for s in sources) or "the built-in synthetic task"
    m = facts.model
    trained = ["fusion layers"] if m.fusion.mechanism != "insertion" else []
    trained += ["language model"] if not m.freeze_lm else (["LoRA adapters on the frozen LM"] if m.lora.enabled else [])
    blocks = m.vision.trainable_blocks
    trained += ["vision encoder"] if blocks == -1 else ([f"last {blocks} vision blocks"] if blocks > 0 else [])
    trained += ["vision LoRA adapters"] if m.vision.lora.enabled else []
    trained += ["projector"] if m.vision.projector_trainable else []
    precision = "fp8" if prec.get("fp8") else ("bf16" if prec.get("bf16") else "fp32")
    rows = [("step", f"{facts.step} of {t.get('train_steps')}"),
            ("global batch", f"{t.get('global_batch_size')} samples of {data.get('seq_length')} text tokens"),
            ("data", blend), ("learning rate", f"new {opt.get('lr_new')}, pretrained {opt.get('lr_pretrained')}, "
                                                f"{opt.get('decay_style')} schedule"),
            ("trained", ", ".join(trained) or "nothing (every part frozen)"),
            ("precision", precision),
            ("layout", f"TP={par.get('tensor_model_parallel_size')}, PP={par.get('pipeline_model_parallel_size')}")]
    return "## Training\n\n" + _table(rows)


def _results(facts: CardFacts) -> str:
    curves = (f"\n\n![The run's loss curves and held-out accuracy](loss.png)\n\nThe run's curves (`loss.png`), "
              f"drawn to step {facts.curves_to_step}" + (f", past this checkpoint's step {facts.step}"
                                                         if facts.curves_to_step != facts.step else "") + "."
              if facts.curves_to_step is not None else "")
    if not facts.results:
        return f"## Training curves{curves}" if curves else ""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in facts.results.items()]
    return (f"## Results at step {facts.step}\n\nAs the run logged them (`{facts.results_from}`): training loss, "
            "validation loss on the held-out sources, held-out answers by greedy generation.\n\n"
            + _table(rows).replace("| | |", "| metric | value |", 1) + curves)


def _model_index(evaluations: Sequence[Dict]) -> List[Dict]:
    """The Hub's ``model-index`` results (its evaluation widget): the megatron side's accuracy over
    all questions and caption token F1, per held-out set."""
    results = []
    for ev in evaluations:
        scores = ev["scores"]["megatron"]
        metrics = [{"type": "accuracy", "value": round(scores["all"]["accuracy"], 4),
                    "name": f"held-out accuracy ({scores['all']['n']} questions)"}] if "all" in scores else []
        caption = scores.get("caption") or {}
        if caption.get("caption_f1") is not None:
            metrics.append({"type": "f1", "value": round(caption["caption_f1"], 4), "name": "caption token F1"})
        if metrics:
            results.append({"task": {"type": "image-text-to-text"},
                            "dataset": {"name": Path(str(ev["data"])).name, "type": "custom"}, "metrics": metrics})
    return results


def _evaluations(facts: CardFacts) -> str:
    parts = []
    for ev in facts.evaluations:
        sides = [s for s in ("megatron", "hf") if s in ev["scores"]]
        names = {"megatron": "megatron checkpoint", "hf": f"HF export `{ev.get('hf')}`"}
        rows = ["| group | n | " + " | ".join(names[s] for s in sides) + " |", "|---|---|" + "---|" * len(sides)]
        for group, score in ev["scores"]["megatron"].items():
            if "accuracy" in score:
                rows.append(f"| {group} | {score['n']} | " + " | ".join(
                    f"{ev['scores'][s].get(group, {}).get('accuracy', float('nan')):.4f}" for s in sides) + " |")
        caption = ev["scores"]["megatron"].get("caption") or {}
        if caption.get("caption_f1") is not None:
            rows.append(f"| caption token F1 | {caption['frames_with_reference']} frames | " + " | ".join(
                f"{(ev['scores'][s].get('caption') or {}).get('caption_f1', float('nan')):.4f}" for s in sides) + " |")
        agree = ev.get("agreement")
        said = (f" The HF export gave the megatron checkpoint's tokens on "
                f"{agree['questions'] - agree['questions_differ']}/{agree['questions']} questions and "
                f"{agree['frames'] - agree['frames_differ']}/{agree['frames']} caption frames." if agree else "")
        parts.append(f"`casa-eval` on `{ev['data']}` (greedy, at most {ev['max_new_tokens']} new tokens; "
                     f"`{ev['file']}`).{said}\n\n" + "\n".join(rows))
    return "## Evaluation\n\n" + "\n\n".join(parts) if parts else ""


def use_snippet(facts: CardFacts) -> str:
    """Python that loads the folder and answers a question about ``image.jpg``."""
    repo = facts.repo_id
    if facts.format == "casa":
        return f'''from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo}", trust_remote_code=True)
image = Image.open("image.jpg").convert("RGB")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
text = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=text, images=[image])
out = model.generate(**inputs, max_new_tokens=32)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''
    return f'''from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

model = Qwen2_5_VLForConditionalGeneration.from_pretrained("{repo}")
processor = AutoProcessor.from_pretrained("{repo}")  # transformers' Qwen2.5-VL processor needs torchvision
image = Image.open("image.jpg").convert("RGB")
messages = [{{"role": "user", "content": [{{"type": "image", "image": image}},
                                         {{"type": "text", "text": "What is in the image?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=32)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))'''


def _use(facts: CardFacts) -> str:
    more = ("\n\nA video: `{\"type\": \"video\", \"path\": \"clip.mp4\"}` in the message (decoded with PyAV at the "
            "processor's fps). `pipeline(\"image-text-to-text\", model=..., trust_remote_code=True)` works too."
            if facts.format == "casa" else "")
    adapter = ("\n\nWith the LoRA adapters: `from peft import PeftModel; model = PeftModel.from_pretrained(model, "
               f"\"{facts.repo_id}\", subfolder=\"lora_adapter\")`." if facts.lora == "separate" else "")
    return f"## Use\n\n```python\n{use_snippet(facts)}\n```{more}{adapter}"
