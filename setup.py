"""shardformer: sharding layer over Hugging Face transformers (see README.md).

`CUDA_EXT=1 pip install --no-build-isolation .` compiles the kernels in csrc/ ahead of time into
`shardformer._C` (needs torch with CUDA and nvcc in the build environment); otherwise they are
compiled on first use on a CUDA machine (shardformer/kernels/cuda.py), and CPU-only machines run
the PyTorch reference.
"""
import importlib.util
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
# every package under shardformer/ (a new one cannot be forgotten), plus policies/ installed as shardformer.policies
packages = find_packages(include=["shardformer", "shardformer.*"]) + ["shardformer.policies"]
kwargs = {}
if os.environ.get("CUDA_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension

    # sources and flags from the file the JIT loader uses too, loaded by path (the package is not installed yet)
    spec = importlib.util.spec_from_file_location("_sf_build", os.path.join(HERE, "shardformer", "kernels", "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    kwargs = dict(ext_modules=[build.cuda_extension(HERE)], cmdclass={"build_ext": BuildExtension})

setup(
    name="shardformer",
    version="0.1.0",
    description="Tensor / sequence / pipeline parallel training of unmodified Hugging Face transformers models",
    long_description=open(os.path.join(HERE, "README.md")).read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"shardformer.policies": "policies"},
    install_requires=["torch>=2.11", "transformers>=5.17", "safetensors", "accelerate"],
    extras_require={"test": ["pytest", "hypothesis", "datasets", "matplotlib"],  # the suite runs the pretraining job
                    "pretrain": ["datasets", "matplotlib"]},  # examples/pretrain.py (tokenizers, tqdm: via transformers)
    **kwargs,
)
