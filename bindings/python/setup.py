"""Build the `sluice` CPython extension over libsluice, linked statically.

    make build                                        # build/libsluice.a (CMake, PIC)
    pip install --no-build-isolation ./bindings/python

Where things come from:
  SLUICE_BUILD_DIR    directory holding libsluice.a (default: <repo>/build)
  SLUICE_INCLUDE_DIR  directory holding sluice.h    (default: <repo>/include)
If libsluice.a is missing and this is a source tree, CMake is run to build it (the library
target only); if that is impossible the error says what to run.

Every file setuptools generates (objects, the wheel's staging tree, egg-info) goes under
$SLUICE_BUILD_DIR/python-build, never into bindings/python.
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, setup

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
BUILD = os.path.abspath(os.environ.get("SLUICE_BUILD_DIR") or os.path.join(ROOT, "build"))
INCLUDE = os.path.abspath(os.environ.get("SLUICE_INCLUDE_DIR") or os.path.join(ROOT, "include"))
LIB = os.path.join(BUILD, "libsluice.a")
OUT = os.path.join(BUILD, "python-build")


def fail(msg):
    sys.stderr.write("sluice setup.py: %s\n" % msg)
    sys.exit(1)


def ensure_library():
    if os.path.exists(LIB):
        return
    cmake = shutil.which("cmake")
    if not (cmake and os.path.exists(os.path.join(ROOT, "CMakeLists.txt"))):
        fail("%s not found. Build it first: `make build` in the sluice repository "
             "(or set SLUICE_BUILD_DIR to the directory holding libsluice.a)." % LIB)
    sys.stderr.write("sluice setup.py: %s missing; building it with CMake\n" % LIB)
    try:
        if not os.path.exists(os.path.join(BUILD, "CMakeCache.txt")):
            subprocess.check_call([cmake, "-S", ROOT, "-B", BUILD,
                                   "-DCMAKE_BUILD_TYPE=RelWithDebInfo"])
        subprocess.check_call([cmake, "--build", BUILD, "--target", "sluice_static",
                               "-j", str(os.cpu_count() or 2)])
    except (OSError, subprocess.CalledProcessError) as e:
        fail("building libsluice.a failed (%s). Run `make deps build` in the sluice "
             "repository, then install again." % e)
    if not os.path.exists(LIB):
        fail("CMake ran but %s is still missing" % LIB)


if not os.path.exists(os.path.join(INCLUDE, "sluice.h")):
    fail("sluice.h not found in %s (set SLUICE_INCLUDE_DIR)" % INCLUDE)
ensure_library()
os.makedirs(OUT, exist_ok=True)

setup(
    name="sluice",
    version="0.2.0",
    description="libsluice, a multi-tenant rate limiter in C, as a CPython extension",
    license="see the sluice repository",
    python_requires=">=3.10",  # PyModule_AddType,
    ext_modules=[
        Extension(
            "sluice",
            sources=["sluice.c"],
            include_dirs=[INCLUDE],
            extra_objects=[LIB],
            # what libsluice.a needs (sluice.pc: Libs.private)
            libraries=["xxhash", "hiredis", "pthread", "m"],
            extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-Werror",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
            # libsluice's symbols stay inside the extension: they cannot clash with a
            # libsluice.so loaded by something else in the process
            extra_link_args=["-Wl,--exclude-libs,ALL"],
            depends=[LIB, os.path.join(INCLUDE, "sluice.h")],
        )
    ],
    options={
        "build": {"build_base": os.path.join(OUT, "build")},
        "egg_info": {"egg_base": OUT},
        "bdist_wheel": {"bdist_dir": os.path.join(OUT, "bdist")},
    },
)
