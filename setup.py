"""Packaging for mgpt4_dist: scale-out training for MiniGPT-4 style vision-language models."""
from setuptools import find_packages, setup

setup(
    name="mgpt4_dist",
    version="0.1.0",
    description="Scale-out training for MiniGPT-4 style vision-language models (DeepSpeed / FSDP2, Slurm)",
    packages=find_packages(include=["mgpt4_dist", "mgpt4_dist.*"]),
    package_data={"mgpt4_dist": ["configs/*.yaml"]},
    python_requires=">=3.9",
    install_requires=[
        # A range, not a pin: cluster users bring the CUDA build they need.
        "torch>=2.4",
        "deepspeed>=0.14",
        "transformers>=4.40",
        "webdataset>=0.2.86",
        "timm>=0.9",
        "pyyaml",
        "tensorboard",
        "sentencepiece",
        "safetensors",
        "pillow",
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        # mgpt4-demo (the web chat page); gradio 6's API (theme at launch, api_visibility). Tested: 6.31.
        "demo": ["gradio>=6.0,<7"],
        # The demo's browser test drives Debian's chromium through selenium (Service, ChromeOptions).
        "dev": ["pytest>=7", "pytest-timeout", "gradio>=6.0,<7", "selenium>=4.11"],
    },
    entry_points={
        "console_scripts": [
            "mgpt4-train=mgpt4_dist.train:main",
            "mgpt4-make-shards=mgpt4_dist.cli.make_shards:main",
            "mgpt4-make-tiny-assets=mgpt4_dist.cli.make_tiny_assets:main",
            "mgpt4-eval-loss=mgpt4_dist.cli.eval_loss:main",
            "mgpt4-export=mgpt4_dist.cli.export:main",
            "mgpt4-apply-delta=mgpt4_dist.cli.apply_delta:main",
            "mgpt4-import-config=mgpt4_dist.cli.import_config:main",
            "mgpt4-consolidate=mgpt4_dist.cli.consolidate:main",
            "mgpt4-chat=mgpt4_dist.cli.chat:main",
            "mgpt4-demo=mgpt4_dist.cli.demo:main",
            "mgpt4-plan=mgpt4_dist.cli.plan:main",
            "mgpt4-cache-features=mgpt4_dist.cli.cache_features:main",
        ],
    },
)
