"""Build llama.cpp's own C++ ``llama-server`` once, from the llama.cpp vendored in the llama-cpp-python sdist.

The serving anchor of ``bench/serve_llama_server.py``: the same llama.cpp that ``llama-cpp-python==0.3.36``
(the project's other llama.cpp anchor) compiles, but its C++ HTTP server, with parallel slots and continuous
batching (``llama_cpp.server`` answers one request at a time). Steps, each skipped when its result is cached:

1. ``pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`` into a temporary folder (pip takes
   it from its own cache when it has it; ``--sdist FILE`` uses a tarball already on disk);
2. extract ``vendor/llama.cpp`` only;
3. ``cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
   -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DBUILD_SHARED_LIBS=OFF`` (no network at build time: no
   web UI download, no HTTPS), then ``cmake --build --target llama-server -j JOBS`` (206 steps: 31 minutes with ``-j 2`` on 2 busy cores);
4. copy the one static binary to ``$LLMCOURSE_HOME/llama-server/<version>/llama-server`` (default
   ``~/.cache/llmcourse``, as ``make setup-test`` caches llama-cpp-python's wheel in ``.../wheels``), with
   ``build.json`` beside it (flags, compiler, the CPU's instruction-set flags). ``-march=native`` code may not
   run on another CPU: a cached binary built for other CPU flags is rebuilt.

    .venv/bin/python bench/llama_server.py               # build if needed, print the binary's path
    .venv/bin/python bench/llama_server.py --jobs 1      # gentler on a shared machine
    .venv/bin/python bench/llama_server.py --rebuild --sdist /tmp/llama_cpp_python-0.3.36.tar.gz

A failure is one line on stderr (exit 2) that names the step and the log (``build.log`` in the cache folder).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's, as pinned by the `llama` extra and the Makefile
PACKAGE = "llama-cpp-python"
CMAKE_FLAGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DBUILD_SHARED_LIBS=OFF"]


class BuildError(Exception):
    """The binary could not be built; the message is one line."""


def cache_dir(version: str = VERSION) -> Path:
    home = Path(os.environ.get("LLMCOURSE_HOME", Path.home() / ".cache" / "llmcourse"))
    return home / "llama-server" / version


def cpu_flags() -> str:
    """A short digest of the CPU's instruction-set flags (what ``-march=native`` compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = " ".join(sorted(line.split(":", 1)[1].split()))
                return hashlib.sha256(flags.encode()).hexdigest()[:16]
    except OSError:
        pass
    return platform.machine()


def cached_binary(version: str = VERSION) -> Path | None:
    """The cached binary if it was built for this CPU and runs (``--version``), else None."""
    d = cache_dir(version)
    exe, info = d / "llama-server", d / "build.json"
    if not (exe.is_file() and info.is_file()):
        return None
    try:
        if json.loads(info.read_text()).get("cpu_flags") != cpu_flags():
            return None
        ok = subprocess.run([str(exe), "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return None
    return exe if ok else None


def _run(cmd: list[str], log: Path, step: str, cwd: Path | None = None) -> None:
    with log.open("a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd).returncode
        except FileNotFoundError:
            raise BuildError(f"{step}: {cmd[0]} is not installed (needs cmake, a C++ compiler; ninja optional)") \
                from None
    if rc != 0:
        raise BuildError(f"{step} failed (exit {rc}); see {log}")


def _sdist(version: str, tmp: Path, log: Path) -> Path:
    _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(tmp),
          f"{PACKAGE}=={version}"], log, f"pip download {PACKAGE}=={version} (needs PyPI or pip's cache)")
    found = sorted(tmp.glob("*.tar.gz"))
    if not found:
        raise BuildError(f"pip download {PACKAGE}=={version} left no .tar.gz in {tmp}; see {log}")
    return found[0]


def _extract_llama_cpp(sdist: Path, dest: Path) -> Path:
    """Extract ``<top>/vendor/llama.cpp`` of ``sdist`` into ``dest``; returns its path."""
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name + "/"]
            if not members:
                raise BuildError(f"{sdist} has no vendor/llama.cpp")
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise BuildError(f"cannot extract {sdist}: {e}") from None
    roots = list(dest.glob("*/vendor/llama.cpp"))
    if not roots:
        raise BuildError(f"{sdist} has no vendor/llama.cpp")
    return roots[0]


def build(version: str = VERSION, jobs: int = 2, sdist: Path | None = None) -> Path:
    """Build ``llama-server`` from the sdist's llama.cpp and install it in :func:`cache_dir`; returns its path."""
    if shutil.which("cmake") is None:
        raise BuildError("cmake is not installed: install it (apt-get install cmake ninja-build g++) and rerun")
    d = cache_dir(version)
    d.mkdir(parents=True, exist_ok=True)
    log = d / "build.log"
    log.write_text(f"building llama-server from {PACKAGE}=={version}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llama-server-build-") as tmp_name:
        tmp = Path(tmp_name)
        if sdist is None:
            sdist = _sdist(version, tmp / "sdist", log)
        elif not sdist.is_file():
            raise BuildError(f"--sdist {sdist} does not exist")
        src = _extract_llama_cpp(sdist, tmp / "src")
        out = tmp / "build"
        gen = ["-G", "Ninja"] if shutil.which("ninja") else []
        _run(["cmake", "-S", str(src), "-B", str(out), *gen, *CMAKE_FLAGS], log, "cmake configure")
        _run(["cmake", "--build", str(out), "--target", "llama-server", "-j", str(jobs)], log,
             f"cmake --build --target llama-server -j {jobs}")
        exe = out / "bin" / "llama-server"
        if not exe.is_file():
            raise BuildError(f"the build finished without {exe.relative_to(tmp)}; see {log}")
        part = d / "llama-server.part"
        shutil.copy2(exe, part)
        os.replace(part, d / "llama-server")  # atomic: a half-copied binary is never cached
    compiler = shutil.which("c++") or "c++"
    try:
        compiler = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        pass
    info = {"package": f"{PACKAGE}=={version}", "sdist": sdist.name, "cmake_flags": CMAKE_FLAGS, "compiler": compiler,
            "cpu_flags": cpu_flags(), "seconds": round(time.monotonic() - t0), "jobs": jobs,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (d / "build.json.part").write_text(json.dumps(info, indent=1))
    os.replace(d / "build.json.part", d / "build.json")
    return d / "llama-server"


def ensure(version: str = VERSION, jobs: int = 2, sdist: Path | None = None, rebuild: bool = False) -> Path:
    """The cached binary, built first if missing (or built for another CPU, or ``rebuild``)."""
    exe = None if rebuild else cached_binary(version)
    return exe or build(version, jobs, sdist)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default=VERSION, help="llama-cpp-python version whose llama.cpp is built "
                    "(default: %(default)s)")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default: %(default)s)")
    ap.add_argument("--sdist", type=Path, default=None, help="a llama-cpp-python sdist (.tar.gz) already on disk "
                    "(default: pip download it)")
    ap.add_argument("--rebuild", action="store_true", help="build even if a cached binary works")
    args = ap.parse_args()
    try:
        exe = ensure(args.version, args.jobs, args.sdist, args.rebuild)
    except BuildError as e:
        print(f"error: cannot build llama-server: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: llama-server build interrupted (nothing cached)", file=sys.stderr)
        return 130
    print(exe)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
