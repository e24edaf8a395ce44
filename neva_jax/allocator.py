"""A caching memory allocator for every neva-jax command, chosen before JAX starts.

XLA:CPU allocates each program's temporaries with the C library's `malloc` and
frees them when the program returns; glibc hands blocks that large straight back
to the kernel (`munmap`), so every train step faults its ~1.4 GB of temporaries
in again (340k minor page faults, a third of the bench's step). A caching
allocator keeps the freed memory mapped and reuses it. It must be in place when
the process starts (`LD_PRELOAD`), so the entry points (`python -m neva_jax.demo`,
`.main`, `.generate`, `.bench`) call `ensure()` first: when no caching allocator is
loaded yet it sets the environment and re-executes the same command once.

`NEVA_JAX_ALLOCATOR` picks it:

- `auto` (default): the first found of `mimalloc` (the `cmeel-mimalloc` wheel, a
  dependency: no system package needed), `tcmalloc` (Debian `libtcmalloc-minimal4`)
  and `jemalloc` (Debian `libjemalloc2`); with none of them, `glibc`.
- `mimalloc`, `tcmalloc`, `jemalloc`: that one (an error if it is not installed).
- `glibc`: the C library's malloc told to keep what it frees (`GLIBC_TUNABLES`:
  one arena, no `mmap` for large blocks, no trimming). No library to load.
- `system`: opt out; the process runs as started.

Each allocator is set to keep freed memory (`MIMALLOC_PURGE_DELAY=-1`; jemalloc's
`MALLOC_CONF` decay off); a setting already in the environment is kept. The
process that runs the work prints one line saying which allocator is in use.
`python -m neva_jax.allocator --env` prints the same choice as shell `export`
lines, for commands that start Python another way (a Jupyter kernel, `srun`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import platform
import re
import shlex
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

ENV = "NEVA_JAX_ALLOCATOR"
# Set in the environment of the re-executed process (value: the allocator's name):
# a process that finds it never re-executes again, whatever it finds loaded.
GUARD = "NEVA_JAX_ALLOCATOR_SET"
CHOICES = ("auto", "mimalloc", "tcmalloc", "jemalloc", "glibc", "system")
AUTO_ORDER = ("mimalloc", "tcmalloc", "jemalloc")
WHEEL = "cmeel-mimalloc"

# Shared objects per allocator, in order of preference, and what installs them.
SYSTEM_LIBRARIES = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"),
    "jemalloc": ("libjemalloc.so.2",),
}
PACKAGES = {
    "mimalloc": f"pip install {WHEEL}",
    "tcmalloc": "apt-get install libtcmalloc-minimal4",
    "jemalloc": "apt-get install libjemalloc2",
}
# Keep freed memory mapped. tcmalloc keeps it by default; its report of every
# allocation over 1 GiB (a train step's temporaries) is silenced.
SETTINGS = {
    "mimalloc": {"MIMALLOC_PURGE_DELAY": "-1"},
    "tcmalloc": {"TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)},
    "jemalloc": {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"},
}
GLIBC_TUNABLES = {
    "glibc.malloc.arena_max": "1",  # thread arenas give large blocks back at once
    "glibc.malloc.mmap_max": "0",  # large blocks from the heap, not their own mapping
    "glibc.malloc.trim_threshold": str(1 << 40),  # never shrink the heap
}
# How a loaded allocator shows in /proc/self/maps.
LOADED_PATTERN = re.compile(r"/lib(mimalloc|tcmalloc|jemalloc)[^/]*\.so[^/]*$")


class AllocatorError(ValueError):
    """`NEVA_JAX_ALLOCATOR` names an unknown or missing allocator (one line)."""


@dataclasses.dataclass(frozen=True)
class Allocator:
    """An allocator choice: what to preload (if anything) and its settings."""

    name: str
    library: str | None = None
    source: str = ""
    settings: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def environ(self, base: Mapping[str, str]) -> dict[str, str]:
        """`base` with this allocator preloaded and set up, and the re-exec guard set.

        A setting already present in `base` wins; an existing `LD_PRELOAD` is kept
        after the library.
        """
        env = dict(base)
        if self.library:
            rest = env.get("LD_PRELOAD", "")
            env["LD_PRELOAD"] = f"{self.library}:{rest}" if rest else self.library
        for key, value in self.settings.items():
            if key == "GLIBC_TUNABLES":
                env[key] = merge_tunables(env.get(key, ""), value)
            else:
                env.setdefault(key, value)
        env[GUARD] = self.name
        return env

    def describe(self) -> str:
        """One line: the allocator, where it comes from and its settings."""
        settings = " ".join(f"{k}={v}" for k, v in self.settings.items())
        parts = [self.name]
        if self.source:
            parts.append(f"({self.source})")
        if self.library:
            parts.append(f"LD_PRELOAD={self.library}")
        if settings:
            parts.append(settings)
        return " ".join(parts)


def merge_tunables(existing: str, ours: str) -> str:
    """GLIBC_TUNABLES `existing` plus each of `ours` whose key it does not set."""
    have = {item.split("=", 1)[0] for item in existing.split(":") if item}
    extra = [item for item in ours.split(":") if item.split("=", 1)[0] not in have]
    return ":".join([*(x for x in existing.split(":") if x), *extra])


def glibc() -> Allocator:
    """glibc malloc told to keep what it frees (no library to load)."""
    value = ":".join(f"{k}={v}" for k, v in GLIBC_TUNABLES.items())
    return Allocator("glibc", None, "malloc keeping freed memory", {"GLIBC_TUNABLES": value})


def system() -> Allocator:
    """The process as started: no preload, no settings."""
    return Allocator("system", None, f"{ENV}=system: the C library's malloc as it is")


def library_dirs() -> list[Path]:
    """Where the system's shared libraries live (Debian multiarch first)."""
    arch = sysconfig.get_config_var("MULTIARCH") or f"{platform.machine()}-linux-gnu"
    names = (f"/usr/lib/{arch}", f"/lib/{arch}", "/usr/lib64", "/lib64", "/usr/lib")
    return [Path(n) for n in (*names, "/usr/local/lib")]


def system_library(names: Sequence[str], dirs: Sequence[Path]) -> Path | None:
    """The first of `names` found in `dirs` (names first), or None."""
    for name in names:
        for d in dirs:
            if (d / name).is_file():
                return d / name
    return None


def wheel_library(distribution: str = WHEEL) -> Path | None:
    """The preloadable `libmimalloc.so.N` installed by the PyPI wheel, or None."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if re.fullmatch(r"libmimalloc\.so\.\d+", f.name):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    return None


Finder = Callable[[str], Allocator | None]


def find(name: str, dirs: Sequence[Path] | None = None) -> Allocator | None:
    """The installed allocator `name` (mimalloc from its wheel, else the system's)."""
    if name == "mimalloc":
        path = wheel_library()
        source = f"PyPI {WHEEL}"
        if path is None:
            path = system_library(("libmimalloc.so.2", "libmimalloc.so"), dirs or library_dirs())
            source = "system"
    else:
        path = system_library(SYSTEM_LIBRARIES[name], dirs or library_dirs())
        source = "system"
    if path is None:
        return None
    return Allocator(name, str(path), source, dict(SETTINGS[name]))


def choose(request: str, finder: Finder | None = None) -> Allocator:
    """The allocator for `NEVA_JAX_ALLOCATOR=request` (see the module docstring).

    `finder(name)` returns the installed allocator `name` or None (default: `find`).
    """
    finder = finder or find
    if request not in CHOICES:
        raise AllocatorError(f"{ENV}={request!r}: unknown; use one of {', '.join(CHOICES)}")
    if request == "system":
        return system()
    if request == "glibc":
        return glibc()
    if request == "auto":
        for name in AUTO_ORDER:
            found = finder(name)
            if found is not None:
                return found
        return glibc()
    found = finder(request)
    if found is None:
        raise AllocatorError(
            f"{ENV}={request}: not installed; {PACKAGES[request]}, or set {ENV}=auto"
        )
    return found


def loaded(maps: str | None = None) -> tuple[str, str] | None:
    """(name, path) of the caching allocator mapped into this process, or None.

    `maps` is the text of /proc/self/maps (read when None).
    """
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return None
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            m = LOADED_PATTERN.search(fields[5])
            if m:
                return m.group(1), fields[5]
    return None


def in_use(environ: Mapping[str, str] | None = None, maps: str | None = None) -> dict[str, str]:
    """What this process allocates with: {"name", "detail"} (for logs and reports)."""
    env = os.environ if environ is None else environ
    found = loaded(maps)
    if found is not None:
        name, path = found
        settings = [f"{k}={env[k]}" for k in SETTINGS[name] if k in env]
        return {"name": name, "detail": " ".join([path, *settings])}
    tunables = env.get("GLIBC_TUNABLES", "")
    if all(f"{k}={v}" in tunables.split(":") for k, v in GLIBC_TUNABLES.items()):
        return {"name": "glibc", "detail": f"GLIBC_TUNABLES={tunables}"}
    wanted = env.get(GUARD)
    if wanted and wanted not in ("system", "glibc"):
        return {"name": "system", "detail": f"preloading {wanted} failed; the C library's malloc"}
    return {"name": "system", "detail": "the C library's malloc (no caching allocator)"}


def describe(environ: Mapping[str, str] | None = None, maps: str | None = None) -> str:
    """The log line: which allocator this process uses and how to change it."""
    use = in_use(environ, maps)
    return f"neva-jax: allocator {use['name']}: {use['detail']} ({ENV}=system opts out)"


def reexec_plan(
    environ: Mapping[str, str],
    maps: str | None = None,
    finder: Finder | None = None,
    system_name: str | None = None,
) -> dict[str, str] | None:
    """The environment to re-execute this process with, or None to run as it is.

    None when: not Linux, the guard is set (this is the re-executed process or a
    child of one), a caching allocator is already loaded, or `system` is asked for.
    Raises `AllocatorError` for an unknown or missing requested allocator.
    """
    if (system_name or platform.system()) != "Linux" or GUARD in environ:
        return None
    request = environ.get(ENV, "auto") or "auto"
    chosen = choose(request, finder)  # validates the request even when loaded
    if chosen.name == "system" or loaded(maps) is not None:
        return None
    return chosen.environ(environ)


def ensure(argv: Sequence[str] | None = None) -> None:
    """The entry points' hook: re-executes this command once under a caching allocator.

    Call it before anything heavy is imported. `argv` is the command to repeat
    (default: the interpreter's own command line, `sys.orig_argv`). Prints the
    allocator line in the process that runs the work; a bad `NEVA_JAX_ALLOCATOR`
    exits 2 with one line.
    """
    try:
        env = reexec_plan(os.environ)
    except AllocatorError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if env is not None:
        args = list(sys.orig_argv if argv is None else argv)
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, [sys.executable, *args[1:]], env)
        except OSError as e:  # fall through: run under the allocator we have
            print(f"neva-jax: re-executing under {env[GUARD]} failed ({e})", file=sys.stderr)
    print(describe(), file=sys.stderr, flush=True)


def shell_exports(environ: Mapping[str, str] | None = None) -> str:
    """`export K=V` lines that start later commands under the chosen allocator."""
    env = dict(os.environ if environ is None else environ)
    plan = reexec_plan(env)
    if plan is None:
        return ""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in plan.items() if env.get(k) != v)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m neva_jax.allocator [--env]`: the choice, or its shell exports."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args not in ([], ["--env"]):
        print("usage: python -m neva_jax.allocator [--env]", file=sys.stderr)
        return 2
    try:
        if args == ["--env"]:
            print(shell_exports())
            return 0
        chosen = choose(os.environ.get(ENV, "auto") or "auto")
    except AllocatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"this process: {describe()}")
    print(f"{ENV}={os.environ.get(ENV, 'auto')} chooses: {chosen.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
