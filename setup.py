import re
from pathlib import Path

from setuptools import find_packages, setup


ROOT = Path(__file__).resolve().parent
# The version is written once, in pix2seq_hf/__init__.py (read as text: importing the package needs its dependencies).
VERSION = re.search(r'^__version__ = "([^"]+)"', (ROOT / "pix2seq_hf" / "__init__.py").read_text(), re.M).group(1)

EXTRAS = {
    # examples/benchmarks/benchmark.py: transformers' DETR loss matches boxes with scipy's Hungarian solver; the coins
    # set of examples/benchmarks/benchmark_training.py is built from scikit-image's sample photograph and segmentation.
    "benchmark": ["scipy", "scikit-image"],
    # pix2seq_hf.export / examples/export.py: ONNX graphs of the encoder and the cached decoder step, run with onnxruntime.
    "export": ["onnx>=1.18", "onnxscript>=0.3", "onnxruntime>=1.20"],
}
# The test suite runs the export tests and the training benchmark's smoke run too, so `dev` includes both extras.
EXTRAS["dev"] = ["pytest>=8", "pytest-xdist>=3", "tensorboard", *EXTRAS["export"], *EXTRAS["benchmark"]]

setup(
    name="pix2seq_hf",
    version=VERSION,
    description="Pix2Seq object detection (Chen et al., ICLR 2022) as a Hugging Face Transformers model",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Developers",
        "Intended Audience :: Science/Research",
        "Operating System :: OS Independent",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Topic :: Scientific/Engineering :: Image Recognition",
    ],
    packages=find_packages(include=["pix2seq_hf", "pix2seq_hf.*"]),
    package_data={"pix2seq_hf": ["metrics/*/*.py"]},
    python_requires=">=3.10",
    install_requires=[
        # Tested with 5.23 and 5.24; 5.x minors change config/image-processor internals, so the range is narrow.
        "transformers>=5.23,<5.25",
        # Ranges, so that installing keeps a torch the user already has. Tested: torch 2.14.1 + torchvision 0.29.1;
        # older CPU builds (torch 2.13) beside timm break torchvision's `nms`, hence the lower bounds.
        "torch>=2.14",
        "torchvision>=0.29",
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
    extras_require=EXTRAS,
)
