"""benchmarks/run_all.py (`make bench`) picks the malloc every benchmark process runs on."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from run_all import JEMALLOC_CONF, allocator_env, find_jemalloc  # noqa: E402


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
