"""shardformer: sharding layer over Hugging Face transformers (see README.md)."""
import os

from setuptools import setup

packages = ["shardformer", "shardformer.layers", "shardformer.policies"]

setup(
    name="shardformer",
    version="0.1.0",
    description="Tensor / sequence / pipeline parallel training of unmodified Hugging Face transformers models",
    long_description=open(os.path.join(os.path.dirname(__file__), "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"shardformer.policies": "policies"},
    install_requires=["torch>=2.11", "transformers>=5.17", "safetensors", "accelerate"],
    extras_require={"test": ["pytest", "hypothesis"]},
)
