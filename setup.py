"""Packaging for mgpt4_dist: scale-out training for MiniGPT-4 style vision-language models."""
from setuptools import find_packages, setup

setup(
    name="mgpt4_dist",
    version="0.1.0",
    description="Scale-out training for MiniGPT-4 style vision-language models (DeepSpeed / FSDP2, Slurm)",
    packages=find_packages(include=["mgpt4_dist", "mgpt4_dist.*"]),
    # The run configs and the DeepSpeed templates (zero{0,1,2,3}.json) are read at run time; the
    # top-level ds_configs/ of a checkout links to the copies here.
    package_data={"mgpt4_dist": ["configs/*.yaml", "ds_configs/*.json"]},
    python_requires=">=3.9",
    # Floors, not pins (cluster users bring the CUDA build they need): the versions the test suite
    # runs on. Every third-party import of the package is here (tests/e2e/test_packaging.py checks).
    install_requires=[
        "torch>=2.14.1",
        "torchvision>=0.29.1",
        "deepspeed>=0.19.8",
        "transformers>=5.24.0",  # TokenizersBackend, transformers.initialization, `dtype=` loading
        # The shard format (tar members grouped by key) is webdataset's; its tools read our shards.
        "webdataset>=1.0.2",
        "timm>=1.0.31",
        "numpy>=2.4.6",
        "pyyaml>=6.0.4",
        "tensorboard>=2.21.0",  # torch.utils.tensorboard's writer
        "sentencepiece>=0.2.3",
        "safetensors>=0.8.0",
        "pillow>=12.3",  # gradio 6 (the demo extra) caps pillow below 13; the suite ran on both
        "braceexpand>=0.1.7",
        "tqdm>=4.70.1",
        # Remote shards: object-store URLs open through fsspec (its s3/gs backends are the `remote` extra).
        "fsspec>=2026.9.0",
    ],
    extras_require={
        "flash": ["flash-attn>=2.5"],
        # s3:// and gs:// shards (data.shards, mgpt4-make-shards/mgpt4-cache-features --out).
        "remote": ["s3fs>=2026.9.0", "gcsfs"],
        # Caption metrics (BLEU-4, CIDEr-D) for eval.* during training and mgpt4-eval.
        "eval": ["pycocoevalcap>=1.2"],
        # mgpt4-demo (the web chat page); gradio 6's API (theme at launch, api_visibility). Tested: 6.31.
        "demo": ["gradio>=6.0,<7"],
        # setuptools: the packaging test builds a wheel without build isolation (no network).
        # moto's standalone S3 server, s3fs and boto3 serve the remote-shard tests.
        "dev": ["pytest>=9.2.0", "pytest-timeout>=2.4.0", "setuptools>=61",
                "moto[server]>=5.2.5", "s3fs>=2026.9.0", "boto3>=1.43", "pycocoevalcap>=1.2",
                # The demo's browser test drives Debian's chromium through selenium (Service, ChromeOptions).
                "gradio>=6.0,<7", "selenium>=4.11",
                # The kill -9 test kills the launcher and every worker, as a cluster kills a job's cgroup.
                "psutil>=7.0"],
    },
    entry_points={
        "console_scripts": [
            "mgpt4-train=mgpt4_dist.train:main",
            "mgpt4-make-shards=mgpt4_dist.cli.make_shards:main",
            "mgpt4-make-tiny-assets=mgpt4_dist.cli.make_tiny_assets:main",
            "mgpt4-eval-loss=mgpt4_dist.cli.eval_loss:main",
            "mgpt4-eval=mgpt4_dist.cli.eval:main",
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
