"""Installs inl_kernels (the kernel library) and inl_llm (the model layer, from python/).

It also builds the compiled backends into inl_kernels._C, with ninja when it is installed: the
C++ CPU kernels (csrc/cpu/) whenever a C++ compiler is present, and the CUDA kernels
(csrc/cuda/) as well when nvcc and a CUDA build of torch are. Without a compiler, or if the
build fails, it warns and installs the pure-Python package (the reference and Triton backends);
`inl_kernels.backends()` then lists what this machine can run.

Build switches (environment variables):
  INL_KERNELS_BUILD=0        skip the extension
  INL_KERNELS_MARCH=native   the CPU the C++ kernels are compiled for (default: the building
                             machine; e.g. x86-64-v3 for a wheel that runs on any AVX2 CPU;
                             empty for the compiler's default)
"""
import os
import shutil
import warnings

from setuptools import find_packages, setup


def compiled_backends():
    """(ext_modules, cmdclass) for inl_kernels._C, or nothing when it cannot be built here."""
    if os.environ.get("INL_KERNELS_BUILD", "1") == "0":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("inl_kernels._C is not built: torch is not importable at build time (install torch "
                      "first and pip install with --no-build-isolation)")
        return [], {}

    march = os.environ.get("INL_KERNELS_MARCH", "native")
    # fp-contract: the micro-kernel's multiply-adds must become FMAs; OpenMP: threads across row blocks
    # (-Wno-maybe-uninitialized: GCC's false positive inside its own AVX-512 intrinsics headers)
    cxx = ["-O3", "-fopenmp", "-ffp-contract=fast", "-Wno-maybe-uninitialized"] + ([f"-march={march}"] if march else [])
    sources = ["csrc/bindings.cpp", "csrc/cpu/iterate.cpp", "csrc/cpu/rms_norm.cpp"]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "inl_kernels._C", sources + ["csrc/cuda/iterate.cu"],
            define_macros=[("INL_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-DINL_ATEN_LAUNCHER"]},
            extra_link_args=["-fopenmp"])
    else:
        ext = cpp_extension.CppExtension("inl_kernels._C", sources, extra_compile_args={"cxx": cxx},
                                         extra_link_args=["-fopenmp"])

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds inl_kernels._C, and on any failure (no compiler, no OpenMP, ...) warns and lets the
        pure-Python install go on."""

        def run(self):
            try:
                super().run()
            except Exception as e:  # noqa: BLE001 - any build failure leaves a working Python package
                warnings.warn(f"inl_kernels._C was not built ({e}); installing the pure-Python package")

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"inl_kernels._C was not built ({e}); installing the pure-Python package")

    build = OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build}


ext_modules, cmdclass = compiled_backends()

setup(
    name="inl-kernels",
    version="0.1.0",
    description="Fused kernels and a thin model layer for the Integrator Neuron Language Model",
    python_requires=">=3.10",
    packages=find_packages(include=["inl_kernels", "inl_kernels.*"]) + find_packages("python"),
    package_dir={"inl_llm": "python/inl_llm"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["inl-profile=inl_kernels.profile:main"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.6; platform_system == 'Linux'",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        # transformers in the test extra so that CI runs the Hugging Face tests (the core package never needs it)
        "test": ["pytest", "pytest-benchmark", "pyarrow", "matplotlib", "transformers", "accelerate"],
        "bench": ["pytest-benchmark", "matplotlib"],
        "data": ["pyarrow"],
        "hf": ["transformers", "accelerate"],  # inl_llm.hf: the Hugging Face model; accelerate for transformers.Trainer
    },
)
