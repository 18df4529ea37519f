"""Build script.

`pip install .` installs the pure-Python package (``fastmask``) and the Triton kernels (the
top-level ``kernels/`` folder, installed as ``fastmask.kernels``).  The CUDA C++ extension
``fastmask._C`` (sources in ``csrc/``) is optional and only built when asked for::

    FASTMASK_BUILD_CUDA=1 pip install --no-build-isolation -e .
    FASTMASK_BUILD_CUDA=1 python setup.py build_ext --inplace      # same, in the source tree

It needs ``nvcc`` and a CUDA build of torch (build isolation would hide the installed torch, hence
``--no-build-isolation``).  ``TORCH_CUDA_ARCH_LIST`` picks the targets (default: 8.0 and 9.0).
"""
import glob
import os
import shutil

from setuptools import find_packages, setup


def _truthy(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def cuda_extensions():
    if not _truthy("FASTMASK_BUILD_CUDA"):
        return [], {}
    # Imported here so that a plain install never needs torch at build time.
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if torch.version.cuda is None:
        raise RuntimeError("FASTMASK_BUILD_CUDA=1 needs a CUDA build of torch; this one is CPU-only")
    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(
        os.path.join(CUDA_HOME, "bin", "nvcc")
    ):
        raise RuntimeError("FASTMASK_BUILD_CUDA=1 needs nvcc (set CUDA_HOME or put nvcc on PATH)")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    # Toolkits from pip/conda and some system installs put the CUDA libraries in lib/, others in
    # lib64/: cover both so linking works everywhere.
    lib_dirs = [d for d in (os.path.join(CUDA_HOME, "lib64"), os.path.join(CUDA_HOME, "lib")) if os.path.isdir(d)]
    ext = CUDAExtension(
        name="fastmask._C",
        sources=sources,
        include_dirs=[os.path.join(here, "csrc")],
        library_dirs=lib_dirs,
        extra_compile_args={
            "cxx": ["-O3", "-std=c++20"],
            "nvcc": ["-O3", "-std=c++20", "-lineinfo",
                     "--expt-relaxed-constexpr", "-U__CUDA_NO_HALF_OPERATORS__",
                     "-U__CUDA_NO_HALF_CONVERSIONS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__"],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=find_packages(include=["fastmask", "fastmask.*"]) + ["fastmask.kernels"],
    package_dir={"fastmask.kernels": "kernels"},
    package_data={"fastmask": ["recipes/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
