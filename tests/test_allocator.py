"""mirasol3b/allocator.py picks the malloc `make demo` and every `make bench` process run on."""

import os
import subprocess
import sys

import pytest

from mirasol3b.allocator import JEMALLOC_CONF, allocator_env, describe, find_jemalloc


@pytest.fixture
def lib_dirs(tmp_path):
    empty, with_lib = tmp_path / "empty", tmp_path / "lib"
    empty.mkdir()
    with_lib.mkdir()
    (with_lib / "libjemalloc.so.2").write_bytes(b"")
    return str(empty), str(with_lib)


def test_auto_preloads_the_first_jemalloc_found_with_decay_off(lib_dirs):
    empty, with_lib = lib_dirs
    assert find_jemalloc((empty, with_lib)) == os.path.join(with_lib, "libjemalloc.so.2")
    env, said = allocator_env("auto", {"PATH": "/bin"}, (empty, with_lib))
    assert env == {"PATH": "/bin", "LD_PRELOAD": os.path.join(with_lib, "libjemalloc.so.2"),
                   "MALLOC_CONF": JEMALLOC_CONF}
    assert "dirty_decay_ms:-1" in JEMALLOC_CONF and with_lib in said
    # How benchmark rows name it: the library's file name and its settings.
    assert describe(env) == f"LD_PRELOAD=libjemalloc.so.2 MALLOC_CONF={JEMALLOC_CONF}"
    assert describe({"PATH": "/bin"}) == "system malloc"


def test_without_jemalloc_auto_falls_back_and_says_how_to_install_but_an_explicit_request_fails(lib_dirs):
    empty, _ = lib_dirs
    env, said = allocator_env("auto", {"PATH": "/bin"}, (empty,))
    assert env == {"PATH": "/bin"} and "system malloc" in said and "apt-get install libjemalloc2" in said
    with pytest.raises(SystemExit, match=r"--allocator jemalloc: no libjemalloc.so.2 in .*empty"):
        allocator_env("jemalloc", {}, (empty,))


def test_system_and_a_preload_already_set_are_left_alone(lib_dirs):
    _, with_lib = lib_dirs
    assert allocator_env("system", {"A": "1"}, (with_lib,)) == ({"A": "1"}, "allocator: system malloc")
    env, said = allocator_env("auto", {"LD_PRELOAD": "/x/libtcmalloc.so.4"}, (with_lib,))
    assert env == {"LD_PRELOAD": "/x/libtcmalloc.so.4"} and "libtcmalloc" in said


def test_the_command_runs_with_the_environment_chosen():
    show = [sys.executable, "-c", "import os; print(os.environ.get('LD_PRELOAD', '-'), os.environ.get('X'))"]
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MALLOC_CONF")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mirasol3b.allocator", *a], env=dict(env, X="kept"),  # noqa: E731
                                    capture_output=True, text=True, check=True)
    out = run("--allocator", "system", "--", *show)
    assert out.stdout.split() == ["-", "kept"] and "allocator: system malloc" in out.stderr
    out = run("--", *show)  # auto: jemalloc where this machine has it
    found = find_jemalloc()
    assert out.stdout.split() == [found or "-", "kept"]
    with pytest.raises(subprocess.CalledProcessError):
        run("--allocator", "system")  # no command
