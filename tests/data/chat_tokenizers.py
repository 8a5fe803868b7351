"""Tokenizers with chat templates, built in the test (no downloads).

``qwen_style``: byte-level BPE with Qwen2.5-VL's special tokens and a Qwen2.5-VL-like template
(default system prompt, ``<|im_start|>role\\n ... <|im_end|>\\n`` turns, images as
``<|vision_start|><|image_pad|><|vision_end|>``, videos with ``<|video_pad|>``).
``helium_style``: a SentencePiece-like unigram model (``▁`` word boundaries), ``<s>`` / ``</s>``,
plain-text ``User:`` / ``Assistant:`` turns closed by ``</s>``, images as ``<image>``.
``llama3_style``: byte-level BPE with Llama 3's header tokens (``<|start_header_id|>role
<|end_header_id|>\n\n ... <|eot_id|>``, ``<|begin_of_text|>`` first, a default system turn with
a knowledge-date line as Llama 3.1's) and Llama 3.2 Vision's ``<|image|>`` in user turns.
``qwen3_style``: the Qwen tokenizer with ``<think>`` / ``</think>`` (added, not special) and a
template written here with Qwen3's behaviour: no default system turn, and the final assistant
turn after the last user turn (only that one) opens with an empty ``<think>\n\n</think>\n\n``,
so a conversation's rendering is *not* its turns' renderings one after the other.
``qwen3_text_style``: the same tokenizer with the *text-only* behaviour of Qwen3's own template: a
message whose content is a list of parts renders as an empty string (images and text dropped).
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "User: what colour is the shape ?\nAssistant: red\n which picture has more shapes ? the first one the second one",
    "red green blue yellow circle square triangle one two three four yes no cat dog",
    "You are a helpful assistant. Describe the video. the red circle moves right and is at the left",
    "User Assistant user assistant system How many? What is in the image? Compare them.",
]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]

QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_QWEN3_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
)
_QWEN3_THINK = ("{% if message['role'] == 'assistant' and loop.last and loop.index0 > ns.last_user %}"
                "<think>\n\n</think>\n\n{% endif %}")
QWEN3_TEMPLATE = (
    "{% set ns = namespace(last_user=-1) %}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    + _QWEN3_THINK + _QWEN3_CONTENT + "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

QWEN3_TEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['content'] is string %}{% set content = message['content'] %}"
    "{% else %}{% set content = '' %}{% endif %}<|im_start|>{{ message['role'] }}\n{{ content }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

HELIUM_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}{% set text = namespace(v='') %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{% set text.v = text.v + '<image>' %}"
    "{% elif part['type'] == 'text' %}{% set text.v = text.v + part['text'] %}{% endif %}{% endfor %}"
    "{% set text = text.v %}{% endif %}"
    "{% if message['role'] == 'system' %}{{ text }}\n\n"
    "{% elif message['role'] == 'user' %}User: {{ text }}\n"
    "{% else %}Assistant: {{ text }}{{ eos_token }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                   "<|image|>", "<|finetune_right_pad_id|>"]

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023<|eot_id|>{% endif %}"
    "{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['content'] is string %}{{ message['content'] | trim }}<|eot_id|>"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|image|>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _byte_level_bpe(specials, template: str, out: Path, **tokens) -> Path:
    """A byte-level BPE tokenizer (Qwen's and Llama 3's kind) trained on ``CORPUS``, saved with
    ``template`` and ``tokens`` (eos_token, pad_token, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **tokens)
    fast.chat_template = template
    fast.save_pretrained(str(out))
    return out


def qwen_style(out: Path) -> Path:
    return _byte_level_bpe(QWEN_SPECIALS, QWEN_TEMPLATE, out, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           additional_special_tokens=QWEN_SPECIALS[1:])


def qwen3_style(out: Path, template: str = QWEN3_TEMPLATE) -> Path:
    from transformers import AutoTokenizer

    _byte_level_bpe(QWEN_SPECIALS, template, out, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                    additional_special_tokens=QWEN_SPECIALS[1:])
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.add_tokens(["<think>", "</think>"])  # as Qwen3's: added tokens, not special
    tok.save_pretrained(str(out))
    return out


def helium_style(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>")
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", additional_special_tokens=["<image>"])
    fast.chat_template = HELIUM_TEMPLATE
    fast.save_pretrained(str(out))
    return out


def llama3_style(out: Path) -> Path:
    return _byte_level_bpe(LLAMA3_SPECIALS, LLAMA3_TEMPLATE, out, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                           pad_token="<|finetune_right_pad_id|>", additional_special_tokens=LLAMA3_SPECIALS)


# The same templates with the assistant's text inside {% generation %} blocks (assistant content
# as a string): transformers' ``return_assistant_tokens_mask`` then marks the assistant tokens,
# an independent oracle for our loss mask. (A newline right after a block tag would be eaten by
# transformers' ``trim_blocks``, hence ``{{ '\\n' }}``.)
QWEN_GENERATION_TEMPLATE = QWEN_TEMPLATE.replace(
    "{% if message['content'] is string %}",
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|im_end|>{% endgeneration %}"
    "{{ '\\n' }}{% elif message['content'] is string %}", 1)
HELIUM_GENERATION_TEMPLATE = HELIUM_TEMPLATE.replace(
    "{% else %}Assistant: {{ text }}{{ eos_token }}\n{% endif %}",
    "{% else %}Assistant: {% generation %}{{ text }}{{ eos_token }}{% endgeneration %}{{ '\\n' }}{% endif %}")
LLAMA3_GENERATION_TEMPLATE = LLAMA3_TEMPLATE.replace(
    "{% if message['content'] is string %}{{ message['content'] | trim }}<|eot_id|>",
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>"
    "{% endgeneration %}{% elif message['content'] is string %}{{ message['content'] | trim }}<|eot_id|>", 1)
QWEN3_GENERATION_TEMPLATE = QWEN3_TEMPLATE.replace(
    "<|im_start|>{{ message['role'] }}\n" + _QWEN3_THINK + _QWEN3_CONTENT + "<|im_end|>\n",
    "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}{% generation %}" + _QWEN3_THINK
    + _QWEN3_CONTENT + "<|im_end|>{% endgeneration %}{{ '\\n' }}{% else %}" + _QWEN3_CONTENT + "<|im_end|>\n"
    "{% endif %}", 1)
assert QWEN3_GENERATION_TEMPLATE != QWEN3_TEMPLATE
