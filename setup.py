"""Installs inl_kernels (the kernel library) and inl_llm (the model layer, from python/)."""
from setuptools import find_packages, setup

setup(
    name="inl-kernels",
    version="0.1.0",
    description="Fused kernels and a thin model layer for the Integrator Neuron Language Model",
    python_requires=">=3.10",
    packages=find_packages(include=["inl_kernels", "inl_kernels.*"]) + find_packages("python"),
    package_dir={"inl_llm": "python/inl_llm"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.6; platform_system == 'Linux'",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "pyarrow"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "data": ["pyarrow"],
    },
)
