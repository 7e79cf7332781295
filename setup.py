"""agentkv's native build: setuptools (pyproject.toml) calls CMake for native/quant.c."""

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
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

    agentkv works without them (agentkv._quant.kernels falls back to its numpy twins and logs a
    warning), so a failed native build never fails the install. AGENTKV_NO_NATIVE=1 skips it.
    """

    def get_ext_filename(self, fullname: str) -> str:
        """``agentkv/_quant/_agentkv_quant.so`` (.dylib, .dll): a plain shared library, loaded with
        ctypes, with no CPython ABI in its name."""
        if fullname.endswith("_agentkv_quant"):
            suffix = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")
            return os.path.join(*fullname.split(".")) + suffix
        return super().get_ext_filename(fullname)

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

try:  # setuptools >= 70.1 ships bdist_wheel; older ones take it from the wheel package
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # pragma: no cover
    from wheel.bdist_wheel import bdist_wheel  # type: ignore[no-redef]


class PlatformWheel(bdist_wheel):
    """Tag the wheel py3-none-<platform>: it holds a shared library loaded with ctypes, not a
    CPython extension, so it serves every Python 3 on its platform."""

    def finalize_options(self) -> None:
        super().finalize_options()
        self.root_is_pure = False

    def get_tag(self):  # type: ignore[no-untyped-def]
        _, _, plat = super().get_tag()
        return "py3", "none", plat


# Metadata lives in pyproject.toml; this file only adds the native build.
setup(
    ext_modules=[CMakeLibrary("agentkv._quant._agentkv_quant", target="agentkv_quant")],
    cmdclass={"build_ext": BuildNative, "bdist_wheel": PlatformWheel},
)
