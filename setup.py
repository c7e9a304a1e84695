"""Thin setuptools shim: builds mmloss._C by configuring CMakeLists.txt with Ninja.

Environment: MAX_JOBS (parallel compile jobs), NVCC_THREADS (nvcc --threads: architectures
compiled in parallel per .cu, default 1), MMLOSS_CUDA_ARCHS (default "80;90"),
MMLOSS_WITH_CUDA=0/1 (default: 1 when torch is a CUDA build and nvcc is found),
MMLOSS_CPU_NATIVE=0/1 (default 0: a portable build whose CPU kernels choose baseline x86-64,
AVX2 or AVX-512 at run time; 1: -march=native for this machine only),
CMAKE_BUILD_TYPE (default Release).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _version() -> str:
    scope: dict = {}
    exec((ROOT / "src" / "mmloss" / "_version.py").read_text(), scope)
    return scope["__version__"]


def _with_cuda(torch) -> bool:
    flag = os.environ.get("MMLOSS_WITH_CUDA")
    if flag is not None:
        return flag == "1"
    return torch.version.cuda is not None and shutil.which("nvcc") is not None


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import torch  # the installed torch: build with --no-build-isolation

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            "cmake", str(ROOT), "-G", "Ninja",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DMMLOSS_OUTPUT_DIR={out_dir}",
            f"-DMMLOSS_CUDA_ARCHS={os.environ.get('MMLOSS_CUDA_ARCHS', '80;90')}",
            f"-DMMLOSS_WITH_CUDA={'ON' if _with_cuda(torch) else 'OFF'}",
            f"-DMMLOSS_NVCC_THREADS={os.environ.get('NVCC_THREADS', '1')}",
            f"-DMMLOSS_CPU_NATIVE={'ON' if os.environ.get('MMLOSS_CPU_NATIVE') == '1' else 'OFF'}",
        ]
        build = ["cmake", "--build", str(build_dir), "--target", "_C"]
        if os.environ.get("MAX_JOBS"):
            build += ["-j", os.environ["MAX_JOBS"]]
        subprocess.run(configure, cwd=build_dir, check=True)
        subprocess.run(build, cwd=build_dir, check=True)


setup(
    name="mmloss",
    version=_version(),
    description="Fused, memory-lean contrastive losses (MCSE, MCSEO, KDMCSE) for multimodal sentence embeddings",
    package_dir={"": "src"},
    packages=find_packages("src", include=["mmloss", "mmloss.*"]),
    package_data={"mmloss": ["auto_table.json"]},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"triton": ["triton>=3.6"]},
    ext_modules=[Extension("mmloss._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
