from setuptools import find_packages, setup

setup(
    name="pix2seq_hf",
    version="0.1.0",
    description="Pix2Seq object detection (Chen et al., ICLR 2022) as a Hugging Face Transformers model",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["pix2seq_hf", "pix2seq_hf.*"]),
    package_data={"pix2seq_hf": ["metrics/*/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        # Tested with 5.23 and 5.24; 5.x minors change config/image-processor internals, so the range is narrow.
        "transformers>=5.23,<5.25",
        # Only these releases run together with timm on the project machines (see README).
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0.20",
        "accelerate>=1.10",
        "datasets>=4.0",
        "huggingface-hub>=1.0",
        "pycocotools>=2.0.8",
        "safetensors>=0.4",
        "evaluate>=0.4",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "tensorboard"],
        # examples/benchmark.py: transformers' DETR loss matches boxes with scipy's Hungarian solver.
        "benchmark": ["scipy"],
    },
)
