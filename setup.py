"""Installs inl_kernels (the kernel library) and inl_llm (the model layer, from python/).

It also builds the compiled backends into inl_kernels._C, with ninja when it is installed: the
C++ CPU kernels (csrc/cpu/) whenever a C++ compiler is present, and the CUDA kernels
(csrc/cuda/) as well when nvcc and a CUDA build of torch are. Without a compiler, or if the
build fails, it warns and installs the pure-Python package (the reference and Triton backends);
`inl_kernels.backends()` then lists what this machine can run.

The CPU kernels (csrc/cpu/kernels.cpp and KERNEL_SOURCES: iterate.cpp, swiglu.cpp, ...) are compiled once
per instruction set on x86-64: AVX-512 (-march=x86-64-v4), AVX2 + FMA (x86-64-v3) and the
baseline (x86-64), each into its own namespace, and the extension picks one at run time from
the CPU's features (csrc/cpu/entry.cpp). So one build runs on every x86-64 CPU, whatever machine
built it. Everything else is compiled for the baseline.

Build switches (environment variables):
  INL_KERNELS_BUILD=0        skip the extension
  INL_KERNELS_MARCH=native   compile the kernels once, for this -march only (e.g. native: tuned
                             for the building CPU, and runs only on CPUs with its features);
                             unset (the default): every path side by side, as above
At run time, INL_KERNELS_CPU_CAPABILITY=avx512|avx2|base pins the path.
"""
import os
import platform
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor

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

    cxx = ["-O3", "-fopenmp"]
    sources = ["csrc/bindings.cpp", "csrc/cpu/entry.cpp", "csrc/cpu/decode.cpp"]
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
                ext.extra_objects = compile_kernels(self.build_temp, ext.name)
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                warnings.warn(f"inl_kernels._C was not built ({e}); installing the pure-Python package")

    build = OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)
    return [ext], {"build_ext": build}


# the instruction-set paths of the CPU kernels: name -> -march
CPU_PATHS = {"avx512": "x86-64-v4", "avx2": "x86-64-v3", "base": "x86-64"}
KERNEL_SOURCES = ["csrc/cpu/kernels.cpp", "csrc/cpu/iterate.cpp", "csrc/cpu/rms_norm.cpp", "csrc/cpu/swiglu.cpp",
                  "csrc/cpu/linear.cpp", "csrc/cpu/attention.cpp", "csrc/cpu/rope.cpp"]


def kernel_targets():
    """[(path label, -march or None)]: every path side by side on x86-64, or the one target of
    INL_KERNELS_MARCH (None: the compiler's default, e.g. on ARM)."""
    march = os.environ.get("INL_KERNELS_MARCH")
    if march is not None:
        return [("pinned", march or None)]
    if platform.machine().lower() in ("x86_64", "amd64"):
        return list(CPU_PATHS.items())
    return [("default", None)]


def compile_kernels(build_temp, ext_name):
    """Compiles KERNEL_SOURCES once per target into objects for the extension's link (each
    translation unit names its namespace after the instruction set it is compiled for, see
    csrc/cpu/simd.h). Returns the object paths; recompiles only what is older than its sources."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or "g++"
    # fp-contract: the micro-kernel's multiply-adds must become FMAs; OpenMP: threads across row
    # blocks; -fno-weak: inline functions (std:: ones included) get a private copy per path, so
    # the linker cannot pick one path's copy for another (GCC; the tests check the built library);
    # -Wno-maybe-uninitialized: GCC's false positive inside its own AVX-512 intrinsics headers
    flags = ["-O3", "-std=c++17", "-fPIC", "-fopenmp", "-ffp-contract=fast", "-DNDEBUG", "-Wall",
             "-Wno-maybe-uninitialized"]
    if _accepts(compiler, "-fno-weak"):
        flags.append("-fno-weak")
    root = os.path.dirname(os.path.abspath(__file__))
    headers = [os.path.join(root, "csrc", "cpu", f) for f in os.listdir(os.path.join(root, "csrc", "cpu"))
               if f.endswith(".h")]
    jobs = []
    for label, march in kernel_targets():
        out_dir = os.path.join(build_temp, "cpu_kernels", label)
        os.makedirs(out_dir, exist_ok=True)
        for src in KERNEL_SOURCES:
            src = os.path.join(root, src)
            obj = os.path.join(out_dir, os.path.basename(src).replace(".cpp", ".o"))
            cmd = [compiler, *flags, *([f"-march={march}"] if march else []), "-c", src, "-o", obj]
            newest = max(os.path.getmtime(p) for p in [src, *headers])
            stale = not os.path.exists(obj) or os.path.getmtime(obj) < newest
            jobs.append((cmd, obj, stale))

    def run(job):
        cmd, obj, stale = job
        if stale:
            print(" ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(run, jobs))


def _accepts(compiler, flag):
    try:
        return subprocess.run([compiler, flag, "-x", "c++", "-fsyntax-only", "-"], input="", text=True,
                              capture_output=True, timeout=60).returncode == 0
    except OSError:
        return False


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
