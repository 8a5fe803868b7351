"""casa_megatron: pretraining CASA vision-language models on megatron-core.

CPU install:  pip install torch==2.13.0 && pip install -e ".[test]"
GPU extras:   pip install -e ".[gpu]"  (Transformer Engine, flash-attn, DALI; need CUDA)
"""

from setuptools import find_packages, setup

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
        "transformers>=5.0",  # AutoTokenizer; the exported model's remote code (Cache API of v5)
        "tokenizers",  # the tiny word-level tokenizer of generated datasets
        "tqdm",  # progress bars of the data tools
        "safetensors",  # Hugging Face export
        "huggingface_hub",  # sharded safetensors + index (save_torch_state_dict)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "flash-attn>=2.1", "nvidia-dali-cuda120"],
        "test": ["pytest>=8"],
    },
    entry_points={"console_scripts": ["casa-train=casa_megatron.train:main",
                                      "casa-stream=casa_megatron.inference.cli:main"]},
)
