"""Thin setuptools shim: builds mmloss._C by configuring CMakeLists.txt with Ninja.

Environment: MAX_JOBS (parallel compile jobs), NVCC_THREADS (nvcc --threads: architectures
compiled in parallel per .cu, default 1), MMLOSS_CUDA_ARCHS (default "80;90"),
MMLOSS_WITH_CUDA=0/1 (default: 1 when torch is a CUDA build and nvcc is found),
MMLOSS_CPU_NATIVE=0/1 (default 0: a portable build whose CPU kernels choose baseline x86-64,
AVX2 or AVX-512 at run time; 1: -march=native for this machine only),
CMAKE_BUILD_TYPE (default Release).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
BUILD_RECORD = "_C_build.json"  # read by src/mmloss/extension.py


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
            "cmake",
            str(ROOT),
            "-G",
            "Ninja",
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
        # What _C was built against: mmloss.extension refuses to load it beside another torch.
        record = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
        (out_dir / BUILD_RECORD).write_text(json.dumps(record) + "\n")

    # The build record travels with _C: into wheels (get_outputs), editable installs
    # (_get_output_mapping) and `build_ext --inplace` (copy_extensions_to_source).
    def _record_pairs(self):
        build_py = self.get_finalized_command("build_py")
        for ext in self.extensions:
            inplace_file, regular_file = self._get_inplace_equivalent(build_py, ext)
            yield str(Path(regular_file).with_name(BUILD_RECORD)), str(Path(inplace_file).with_name(BUILD_RECORD))

    def get_outputs(self):
        return super().get_outputs() + [regular for regular, _ in self._record_pairs()]

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        yield from self._record_pairs()

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        for regular, inplace in self._record_pairs():
            self.copy_file(regular, inplace, level=self.verbose)


setup(
    package_dir={"": "src"},
    packages=find_packages("src", include=["mmloss", "mmloss.*"]),
    package_data={"mmloss": ["auto_table.json"]},
    ext_modules=[Extension("mmloss._C", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
