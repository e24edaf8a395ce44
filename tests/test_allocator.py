"""`neva_jax.allocator`: which caching allocator is chosen, the opt-out, the once-only re-exec.

The selection logic runs on fake library folders and fake /proc/self/maps text;
one subprocess runs a real entry point from a clean environment and checks that it
re-executed itself under the allocator and logged it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from neva_jax import allocator as alloc

REPO_ROOT = Path(__file__).resolve().parents[1]
# The wheel is a dependency on Linux only (pyproject.toml), where LD_PRELOAD applies.
linux_only = pytest.mark.skipif(sys.platform != "linux", reason="LD_PRELOAD is Linux's")

MAPS_PLAIN = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 fe:01 1 /usr/bin/python3.11
7f0000000000-7f0000001000 r-xp 00000000 fe:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0000002000-7f0000003000 rw-p 00000000 00:00 0
"""
MAPS_TCMALLOC = (
    MAPS_PLAIN
    + "7f0000004000-7f0000005000 r-xp 00000000 fe:01 3 "
    + "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
)


def _finder(*present: str):
    """A finder that knows only the allocators named in `present`."""

    def find(name: str) -> alloc.Allocator | None:
        if name in present:
            return alloc.Allocator(name, f"/lib/lib{name}.so", "test", dict(alloc.SETTINGS[name]))
        return None

    return find


@pytest.mark.parametrize(
    ("present", "expected"),
    [
        (("mimalloc", "tcmalloc", "jemalloc"), "mimalloc"),
        (("tcmalloc", "jemalloc"), "tcmalloc"),
        (("jemalloc",), "jemalloc"),
        ((), "glibc"),
    ],
)
def test_auto_takes_the_first_installed(present, expected):
    assert alloc.choose("auto", _finder(*present)).name == expected


def test_explicit_requests_and_the_opt_out():
    finder = _finder("mimalloc", "tcmalloc")
    assert alloc.choose("tcmalloc", finder).library == "/lib/libtcmalloc.so"
    assert alloc.choose("system", finder).library is None
    assert alloc.choose("glibc", finder).settings["GLIBC_TUNABLES"].startswith("glibc.malloc.")
    with pytest.raises(alloc.AllocatorError, match="apt-get install libjemalloc2"):
        alloc.choose("jemalloc", finder)
    with pytest.raises(alloc.AllocatorError, match="unknown; use one of auto"):
        alloc.choose("hoard", finder)


def test_system_library_search_order(tmp_path: Path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (second / "libtcmalloc.so.4").touch()
    names = alloc.SYSTEM_LIBRARIES["tcmalloc"]
    assert alloc.system_library(names, [first, second]) == second / "libtcmalloc.so.4"
    (second / "libtcmalloc_minimal.so.4").touch()  # the preferred name wins over the folder
    assert alloc.system_library(names, [first, second]) == second / "libtcmalloc_minimal.so.4"
    found = alloc.find("jemalloc", dirs=[first, second])
    assert found is None
    (first / "libjemalloc.so.2").touch()
    found = alloc.find("jemalloc", dirs=[first, second])
    assert found.library == str(first / "libjemalloc.so.2")
    assert found.settings["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"


@linux_only
def test_the_wheel_ships_a_preloadable_mimalloc():
    path = alloc.wheel_library()
    assert path is not None and path.is_file() and path.name.startswith("libmimalloc.so.")
    found = alloc.find("mimalloc")
    assert found.library == str(path) and found.source == f"PyPI {alloc.WHEEL}"
    assert alloc.wheel_library("no-such-distribution") is None


def test_environ_keeps_the_users_settings():
    mi = alloc.Allocator("mimalloc", "/x/libmimalloc.so.3", "t", {"MIMALLOC_PURGE_DELAY": "-1"})
    env = mi.environ({"LD_PRELOAD": "/y/libfoo.so", "MIMALLOC_PURGE_DELAY": "100", "A": "1"})
    assert env["LD_PRELOAD"] == "/x/libmimalloc.so.3:/y/libfoo.so"
    assert env["MIMALLOC_PURGE_DELAY"] == "100" and env["A"] == "1"
    assert env[alloc.GUARD] == "mimalloc"
    env = alloc.glibc().environ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    items = env["GLIBC_TUNABLES"].split(":")
    assert items[0] == "glibc.malloc.arena_max=4" and "glibc.malloc.mmap_max=0" in items
    assert "LD_PRELOAD" not in env


def test_reexec_plan_happens_once_and_respects_the_opt_out():
    finder = _finder("tcmalloc")
    env = alloc.reexec_plan({}, maps=MAPS_PLAIN, finder=finder, system_name="Linux")
    assert env["LD_PRELOAD"] == "/lib/libtcmalloc.so" and env[alloc.GUARD] == "tcmalloc"
    # The re-executed process (guard set) never plans another one, loaded or not.
    assert alloc.reexec_plan(env, maps=MAPS_PLAIN, finder=finder, system_name="Linux") is None
    # Already loaded (started under LD_PRELOAD by hand): nothing to do.
    assert alloc.reexec_plan({}, maps=MAPS_TCMALLOC, finder=finder, system_name="Linux") is None
    opt_out = {alloc.ENV: "system"}
    assert alloc.reexec_plan(opt_out, maps=MAPS_PLAIN, finder=finder, system_name="Linux") is None
    assert alloc.reexec_plan({}, maps=MAPS_PLAIN, finder=finder, system_name="Darwin") is None
    with pytest.raises(alloc.AllocatorError):
        alloc.reexec_plan({alloc.ENV: "jemalloc"}, maps=MAPS_PLAIN, finder=finder)


def test_loaded_and_in_use():
    assert alloc.loaded(MAPS_PLAIN) is None
    name, path = alloc.loaded(MAPS_TCMALLOC)
    assert name == "tcmalloc" and path.endswith("libtcmalloc_minimal.so.4.5.10")
    assert alloc.in_use({}, MAPS_TCMALLOC)["name"] == "tcmalloc"
    assert alloc.in_use({}, MAPS_PLAIN)["name"] == "system"
    glibc_env = alloc.glibc().environ({})
    assert alloc.in_use(glibc_env, MAPS_PLAIN)["name"] == "glibc"
    failed = alloc.in_use({alloc.GUARD: "tcmalloc"}, MAPS_PLAIN)
    assert failed["name"] == "system" and "preloading tcmalloc failed" in failed["detail"]
    line = alloc.describe({}, MAPS_TCMALLOC)
    assert line.startswith("neva-jax: allocator tcmalloc: ") and "\n" not in line


def test_ensure_reexecutes_the_same_command(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(alloc, "find", _finder("mimalloc"))
    monkeypatch.setattr(alloc, "loaded", lambda maps=None: None)
    monkeypatch.setattr(alloc.platform, "system", lambda: "Linux")
    monkeypatch.setattr(alloc.os, "execve", lambda *a: calls.append(a))
    for key in (alloc.GUARD, alloc.ENV, "LD_PRELOAD"):
        monkeypatch.delenv(key, raising=False)
    alloc.ensure(["python", "-m", "neva_jax.demo", "--out", "x"])
    [(exe, argv, env)] = calls
    assert exe == sys.executable and argv == [sys.executable, "-m", "neva_jax.demo", "--out", "x"]
    assert env["LD_PRELOAD"] == "/lib/libmimalloc.so" and env[alloc.GUARD] == "mimalloc"
    monkeypatch.setenv(alloc.ENV, "nonsense")
    with pytest.raises(SystemExit) as e:
        alloc.ensure(["python"])
    assert e.value.code == 2 and "NEVA_JAX_ALLOCATOR='nonsense'" in capsys.readouterr().err


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (alloc.GUARD, alloc.ENV, "LD_PRELOAD")}
    return {**env, **extra}


@linux_only
def test_an_entry_point_logs_the_allocator_once():
    cmd = [sys.executable, "-m", "neva_jax.generate", "--help"]
    out = subprocess.run(cmd, cwd=REPO_ROOT, env=_clean_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.startswith("neva-jax: allocator")]
    # Re-executed once under the wheel's mimalloc, which the new process found mapped.
    assert len(lines) == 1 and lines[0].startswith("neva-jax: allocator mimalloc: /"), lines
    assert "MIMALLOC_PURGE_DELAY=-1" in lines[0]
    assert "--checkpoint" in out.stdout  # the command itself ran, with its arguments
    out = subprocess.run(
        cmd,
        cwd=REPO_ROOT,
        env=_clean_env(NEVA_JAX_ALLOCATOR="system"),
        capture_output=True,
        text=True,
    )
    assert "neva-jax: allocator system: " in out.stderr and out.returncode == 0


def test_shell_exports(monkeypatch):
    monkeypatch.setattr(alloc, "find", _finder("jemalloc"))
    monkeypatch.setattr(alloc, "loaded", lambda maps=None: None)
    monkeypatch.setattr(alloc.platform, "system", lambda: "Linux")
    text = alloc.shell_exports({"PATH": "/bin"})
    assert "export LD_PRELOAD=/lib/libjemalloc.so" in text
    assert f"export {alloc.GUARD}=jemalloc" in text and "PATH" not in text
    assert alloc.shell_exports({alloc.ENV: "system"}) == ""
