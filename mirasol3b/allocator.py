"""Runs a command on jemalloc when this machine has it: `python -m mirasol3b.allocator -- CMD ...`.

Why, on CPU: glibc hands every freed buffer over 32 MiB back to the kernel, so the temporaries
XLA allocates for each train step are page-faulted and zeroed again on every step (tens of
thousands of faults a step; `benchmarks/step_profile.py` counts them). jemalloc with its decay
off keeps freed memory for the next step. `make demo` and `make bench` run through this.

    python -m mirasol3b.allocator [--allocator auto|jemalloc|system] -- COMMAND [ARGS...]

`auto` (the default) preloads jemalloc if found and otherwise runs on glibc, saying how to
install it; `jemalloc` fails without it; `system` leaves the environment alone. An `LD_PRELOAD`
already set is the caller's choice and kept as it is.
"""

from __future__ import annotations

import argparse
import os
import sys

# Freed memory is kept (decay off), so a step's temporaries are reused rather than faulted in again.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
                "/usr/local/lib")
INSTALL_HINT = "install it with `apt-get install libjemalloc2` (Debian/Ubuntu) or pass --allocator system"
CHOICES = ("auto", "jemalloc", "system")


def find_jemalloc(dirs=LIBRARY_DIRS) -> str | None:
    for d in dirs:
        for name in ("libjemalloc.so.2", "libjemalloc.so"):
            if os.path.isfile(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def describe(env) -> str:
    """The allocator `env` runs on, as benchmark rows name it: `system malloc` or the preload."""
    preload = os.path.basename(env.get("LD_PRELOAD", "").split(":")[0])
    if not preload:
        return "system malloc"
    conf = env.get("MALLOC_CONF", "")
    return f"LD_PRELOAD={preload}" + (f" MALLOC_CONF={conf}" if conf and "jemalloc" in preload else "")


def allocator_env(choice: str, env: dict, dirs=LIBRARY_DIRS) -> tuple[dict, str]:
    """(environment to run with for `choice`, a line saying which allocator that is)."""
    if choice not in CHOICES:
        raise ValueError(f"allocator must be one of {CHOICES}, got {choice!r}")
    if choice == "system" or env.get("LD_PRELOAD"):
        return dict(env), f"allocator: {env['LD_PRELOAD'] if env.get('LD_PRELOAD') else 'system malloc'}"
    path = find_jemalloc(dirs)
    if path is None:
        if choice == "jemalloc":
            raise SystemExit(f"--allocator jemalloc: no libjemalloc.so.2 in {', '.join(dirs)}; {INSTALL_HINT}")
        return dict(env), (f"allocator: system malloc (no jemalloc found; {INSTALL_HINT}; without it "
                           "CPU steps fault their temporaries in again every step)")
    return dict(env, LD_PRELOAD=path, MALLOC_CONF=JEMALLOC_CONF), f"allocator: {path} (MALLOC_CONF={JEMALLOC_CONF})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mirasol3b.allocator", description=__doc__.split("\n\n")[0])
    parser.add_argument("--allocator", choices=CHOICES, default="auto")
    parser.add_argument("--find", action="store_true", help="exit 0 if jemalloc is installed, 1 if not")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    if args.find:
        sys.exit(0 if find_jemalloc() else 1)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (python -m mirasol3b.allocator -- COMMAND [ARGS...])")
    env, said = allocator_env(args.allocator, dict(os.environ))
    print(said, file=sys.stderr, flush=True)
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main()
