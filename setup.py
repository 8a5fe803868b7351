"""casa_megatron: pretraining CASA vision-language models on megatron-core.

CPU install:  pip install torch==2.13.0 && pip install -e ".[test]"
GPU extras:   pip install -e ".[gpu]"  (Transformer Engine, flash-attn, DALI; need CUDA)

The test extra carries nvidia-dali-cuda130: it imports without a GPU, and the tests run our DALI
pipeline with its CPU operators on VP9 clips (measured: ~270 MB download, ~620 MB installed,
~15 s to install; docs/gpu.md). Its wheels are Linux-only, hence the marker.
"""

from setuptools import find_packages, setup

DALI = "nvidia-dali-cuda130>=2.4; sys_platform == 'linux' and platform_machine in 'x86_64 aarch64'"

setup(
    name="casa-megatron",
    version="0.1.0",
    description="Open pretraining framework for CASA vision-language models on megatron-core",
    packages=find_packages(include=["casa_megatron", "casa_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # CPU: install torch==2.13.0 first; GPU: any recent CUDA build
        "megatron-core==0.16.1",
        "pyyaml>=6.0",
        "mlflow>=2.10",
        "numpy",
        "psutil",  # megatron checkpoint writer, MLflow system metrics
        "matplotlib",
        "av>=12",  # PyAV: CPU video decoding/encoding (FFmpeg with x264/vpx bundled in the wheel)
        "pillow",  # image decoding, synthetic dataset rendering
        # AutoTokenizer; Qwen2.5-VL oracle in tests; the exported model's remote code (v5 APIs). >= 5.18:
        # 5.17 truncates a clip's seconds per temporal patch to an int in Qwen2.5-VL's get_rope_index
        # (0.5 s -> 0: wrong video positions for a native insertion export) and its AutoImageProcessor
        # needs torchvision; both found by running the suite under 5.17 (the lent GPU machines' version).
        "transformers>=5.18",
        "tokenizers",  # the tiny word-level tokenizer of generated datasets
        "tqdm",  # progress bars of the data tools and the converter
        "safetensors",  # Hugging Face checkpoints, read tensor by tensor (conversion/), and export
        "huggingface_hub",  # sharded safetensors + index (save_torch_state_dict)
    ],
    extras_require={
        # DALI for CUDA 13 drivers (the lent GPU machines); on CUDA 12 use nvidia-dali-cuda120.
        "gpu": ["transformer-engine[pytorch]", "flash-attn>=2.1", DALI],
        # accelerate: transformers' Trainer fine-tuning the export in tests/hf/test_hf_finetune.py;
        # peft: loading an exported LoRA adapter (export-hf --lora separate) in tests/hf/test_peft_adapter.py
        "test": ["pytest>=8", "accelerate>=1.0", "peft>=0.17", DALI],
    },
    entry_points={"console_scripts": ["casa-train=casa_megatron.train:main",
                                        "casa-convert=casa_megatron.conversion.cli:main",
                                        "casa-stream=casa_megatron.inference.cli:main",
                                        "casa-eval=casa_megatron.evaluation.cli:main"]},
)
