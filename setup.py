"""Build script for kdfast's optional C++ extension (kdfast._C).

The extension is optional: if it cannot be compiled the package still installs and runs on the
reference (pure PyTorch) backend. Set KDFAST_REQUIRE_EXT=1 to turn a failed build into an error (CI
does), and KDFAST_NATIVE=1 to compile with -march=native (never for wheels meant for other
machines).
"""

import glob
import os
import platform
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension, has_flag
except ImportError:  # pybind11 is a build requirement; without it only the reference backend exists
    Pybind11Extension = None

# Loops start on a 32-byte boundary on x86: a tight kernel loop that straddles two 32-byte fetch
# blocks ran up to 30% slower (the FTD Gram loop: the same object file, linked after code of another
# size), so a kernel's speed depended on where the linker placed it. Only padding is added.
_LOOP_ALIGN = "-falign-loops=32"
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


class OptionalBuildExt(build_ext):
    """Builds the extension, but tolerates failure unless KDFAST_REQUIRE_EXT is set."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler/toolchain failure
            self._failed(exc)

    def build_extensions(self):
        if _X86 and has_flag(self.compiler, _LOOP_ALIGN):
            for ext in self.extensions:
                ext.extra_compile_args.append(_LOOP_ALIGN)
        super().build_extensions()

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)

    def copy_file(self, infile, outfile, *args, **kwargs):
        """An in-place build (build_ext --inplace) puts the new extension in place by a rename:
        writing into the loaded file would crash every process that has it mapped."""
        if not str(outfile).endswith((".so", ".pyd")) or self.dry_run:
            return super().copy_file(infile, outfile, *args, **kwargs)
        tmp = f"{outfile}.{os.getpid()}.tmp"
        shutil.copyfile(infile, tmp)
        shutil.copymode(infile, tmp)
        os.replace(tmp, outfile)
        return outfile, 1

    @staticmethod
    def _failed(exc):
        if _flag("KDFAST_REQUIRE_EXT"):
            raise
        sys.stderr.write(
            f"WARNING: kdfast's C++ extension was not built ({exc}); "
            "the package will use the reference backend on the CPU.\n"
        )


ext_modules = []
if Pybind11Extension is not None:
    cflags = ["-O3", "-fopenmp", "-std=c++17"]
    if _flag("KDFAST_NATIVE"):
        cflags.append("-march=native")
    ext_modules.append(
        Pybind11Extension(
            "kdfast._C",
            sorted(glob.glob("csrc/*.cpp")),
            include_dirs=["csrc"],
            extra_compile_args=cflags,
            extra_link_args=["-fopenmp"],
            cxx_std=17,
        )
    )
elif _flag("KDFAST_REQUIRE_EXT"):
    raise RuntimeError("KDFAST_REQUIRE_EXT=1 but pybind11 is not installed")

setup(ext_modules=ext_modules, cmdclass={"build_ext": OptionalBuildExt})
