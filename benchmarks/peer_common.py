"""What the peer benchmarks share: building llama.cpp once, and running a command measured under a memory limit.

`run_measured` runs any command, optionally under a memory limit in a child memory cgroup (v1
`memory.limit_in_bytes`, else v2 `memory.max`; needs root), and reports wall time, peak RSS, major faults,
bytes read from storage and the cgroup's peak usage (page cache included). Used by peer_llamacpp.py and
peer_memory.py (benchmark only, never a runtime dependency).
"""
from __future__ import annotations

import fcntl
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"  # pinned sdist whose vendor/llama.cpp we build
TARGETS = ("llama-bench", "llama-completion", "llama-simple", "llama-perplexity")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF")
HOBBIT = [sys.executable, "-m", "hobbit.cli"]    # the `hobbit` command, in this interpreter's environment
REPO = Path(__file__).resolve().parents[1]


def _step(msg: str) -> None:
    print(f"[peer] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- building llama.cpp

def peers_dir() -> Path:
    base = os.environ.get("HOBBIT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hobbit"
    return Path(base).expanduser() / "peers"


def build_llamacpp(jobs: int = 2, root: Path | None = None) -> Path:
    """The bin/ folder holding llama-bench etc., building it first if missing (idempotent; ~4-6 min on 2 cores)."""
    root = root or peers_dir() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    bindir = root / "build" / "bin"
    if all((bindir / t).is_file() for t in TARGETS):
        return bindir
    for tool in ("cmake", "make", "c++"):
        if not shutil.which(tool):
            raise RuntimeError(f"building llama.cpp needs `{tool}` on PATH; install it (apt-get install cmake build-essential)")
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second harness waits for the first one's build, then finds it
        if not all((bindir / t).is_file() for t in TARGETS):
            _build(root, jobs)
    return bindir


def _build(root: Path, jobs: int) -> None:
    src, build = root / "src", root / "build"
    if not (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        dl = root / "sdist"
        _step(f"downloading llama-cpp-python=={LLAMA_CPP_PYTHON} sdist (no deps) into {dl}")
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
                        "-d", str(dl), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"], check=True)
        tgz = next(dl.glob("llama_cpp_python-*.tar.gz"), None)
        if tgz is None:
            raise RuntimeError(f"pip download left no llama_cpp_python-*.tar.gz in {dl}; check PyPI access")
        _step(f"unpacking {tgz.name}")
        tmp = root / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(tgz) as tf:
            tf.extractall(tmp, filter="data")
        shutil.rmtree(src, ignore_errors=True)
        next(tmp.iterdir()).rename(src)  # the sdist's single top folder becomes src/
        tmp.rmdir()
    _step("configuring llama.cpp with cmake")
    subprocess.run(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build), *CMAKE_FLAGS],
                   check=True, stdout=subprocess.DEVNULL)
    _step(f"building {' '.join(TARGETS)} with -j{jobs} (minutes; cmake shows [percent])")
    subprocess.run(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TARGETS], check=True)


# ---------------------------------------------------------------- running a command, measured, under a memory limit

@dataclass
class Measured:
    cmd: list[str]
    returncode: int
    wall_s: float
    stdout: str
    stderr_tail: str
    max_rss_bytes: int                 # getrusage of the child: its largest RSS, but Linux keeps the high-water
                                       # mark across exec, so it is at least the forking harness's own RSS
    major_faults: int
    read_bytes: int | None             # /proc/PID/io read_bytes: bytes that came from storage
    limit_bytes: int | None = None
    cgroup_peak_bytes: int | None = None  # the cgroup's peak usage, page cache included (limit runs only)
    oom_kills: int | None = None          # kills by the cgroup's OOM killer (limit runs only)
    hwm_bytes: int | None = None          # the command's own peak RSS: /proc/PID/status VmHWM, polled every 50 ms


def parse_size(s: str) -> int:
    """'2GiB', '512MiB', '1.5G', '4096' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", s, re.IGNORECASE)
    if not m:
        raise ValueError(f"bad size {s!r}; write bytes or e.g. 512MiB, 2GiB")
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def _own_cgroup(controller_line: str, proc_cgroup: str) -> str | None:
    """The path after `<id>:<controller_line>:` in /proc/self/cgroup text ('memory' for v1, '' for v2)."""
    for line in proc_cgroup.splitlines():
        _, ctrls, path = line.split(":", 2)
        if (controller_line in ctrls.split(",")) if controller_line else ctrls == "":
            return path
    return None


def make_memory_cgroup(limit_bytes: int, name: str) -> tuple[Path, str]:
    """A fresh child of this process's memory cgroup with the limit written; returns (folder, 'v1'|'v2')."""
    text = Path("/proc/self/cgroup").read_text()
    tried = []
    v1 = _own_cgroup("memory", text)
    if v1 is not None and Path("/sys/fs/cgroup/memory").is_dir():
        d = Path("/sys/fs/cgroup/memory") / v1.lstrip("/") / name
        try:
            d.mkdir(exist_ok=True)
            (d / "memory.limit_in_bytes").write_text(str(limit_bytes))
            return d, "v1"
        except OSError as e:
            tried.append(f"v1 {d}: {e}")
    v2 = _own_cgroup("", text)
    for mount in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if v2 is not None and (mount / "cgroup.controllers").is_file():
            parent = mount / v2.lstrip("/")
            d = parent / name
            try:
                if "memory" not in (parent / "cgroup.subtree_control").read_text().split():
                    (parent / "cgroup.subtree_control").write_text("+memory")
                d.mkdir(exist_ok=True)
                (d / "memory.max").write_text(str(limit_bytes))
                return d, "v2"
            except OSError as e:
                tried.append(f"v2 {d}: {e}")
    raise RuntimeError("cannot make a memory-limited cgroup: " + ("; ".join(tried) or "no memory controller found")
                       + ". Run as root on a machine whose cgroup memory controller is mounted writable, "
                         "or run without --limit")


def drop_page_cache() -> None:
    """sync, then drop clean page cache (root only), so every run reads its weights from storage."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as e:
        raise RuntimeError(f"cannot drop the page cache ({e}); run as root or without --drop-caches") from e


class _poll_hwm(threading.Thread):
    """Largest VmHWM of a running process (the exec'd image's own high-water mark, unlike ru_maxrss)."""

    def __init__(self, pid: int, every_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s, self.peak, self._done = pid, every_s, 0, threading.Event()
        self.start()

    def run(self) -> None:
        status = Path(f"/proc/{self.pid}/status")
        while not self._done.is_set():
            try:
                m = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.M)
            except OSError:
                m = None
            if m:
                self.peak = max(self.peak, int(m[1]) * 1024)
            self._done.wait(self.every_s)

    def stop(self) -> None:
        self._done.set()
        self.join()


def run_measured(cmd: list[str], env: dict | None = None, limit_bytes: int | None = None,
                 drop_caches: bool = False, timeout_s: float | None = None) -> Measured:
    """Run cmd to completion (optionally in a fresh memory cgroup capped at limit_bytes) and measure it."""
    if drop_caches:
        drop_page_cache()
    cg, version = make_memory_cgroup(limit_bytes, f"peer-{os.getpid()}-{time.monotonic_ns()}") if limit_bytes else (None, None)

    def enter_cgroup() -> None:  # runs in the child between fork and exec, so the command starts already limited
        with open(cg / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))

    try:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:  # files, not pipes: no deadlock
            t0 = time.perf_counter()
            p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, preexec_fn=enter_cgroup if cg else None)
            timer = threading.Timer(timeout_s or 0, p.kill)
            if timeout_s:
                timer.start()
            hwm = _poll_hwm(p.pid)
            os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)  # exited but not reaped: /proc/PID/io still readable
            hwm.stop()
            wall = time.perf_counter() - t0
            timer.cancel()
            try:
                read_bytes = int(re.search(r"^read_bytes: (\d+)", Path(f"/proc/{p.pid}/io").read_text(), re.M)[1])
            except (OSError, TypeError):
                read_bytes = None
            _, status, ru = os.wait4(p.pid, 0)
            p.returncode = os.waitstatus_to_exitcode(status)  # tell Popen it's reaped
            out.seek(0)
            err.seek(0)
            m = Measured(cmd=[str(c) for c in cmd], returncode=p.returncode, wall_s=wall,
                         stdout=out.read().decode(errors="replace"), stderr_tail=err.read().decode(errors="replace")[-2000:],
                         max_rss_bytes=ru.ru_maxrss * 1024, major_faults=ru.ru_majflt, read_bytes=read_bytes,
                         limit_bytes=limit_bytes, hwm_bytes=hwm.peak or None)
        if cg:
            peak = cg / ("memory.max_usage_in_bytes" if version == "v1" else "memory.peak")
            m.cgroup_peak_bytes = int(peak.read_text()) if peak.is_file() else None
            events = (cg / ("memory.oom_control" if version == "v1" else "memory.events")).read_text()
            m.oom_kills = int(re.search(r"^oom_kill (\d+)", events, re.M)[1]) if "oom_kill " in events else None
        return m
    finally:
        if cg:
            try:
                cg.rmdir()  # v1 moves leftover page-cache charges to the parent
            except OSError:
                pass


# ---------------------------------------------------------------- facts

def hobbit_has_option(sub: str, option: str) -> bool:
    """Whether `hobbit <sub> --help` lists option (the CLI moves options between commands over time)."""
    r = subprocess.run([*HOBBIT, sub, "--help"], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"`hobbit {sub} --help` failed: {r.stderr.strip()[-500:]}; is hobbit importable "
                           f"(PYTHONPATH=src or pip install -e .)?")
    return re.search(rf"(^|\s|\[){re.escape(option)}(?![\w-])", r.stdout) is not None


def machine_info() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    try:
        torch_version = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch_version = None
    flags = next((ln.split(":", 1)[1].split() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("flags")), [])
    return dict(cpu=cpu, cpus=os.cpu_count(), isa=sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))), kernel=platform.release(), python=platform.python_version(),
                torch=torch_version, hobbit_git=git.stdout.strip() or None, llama_cpp_python=LLAMA_CPP_PYTHON,
                mem_total_kib=int(Path("/proc/meminfo").read_text().split()[1]))
