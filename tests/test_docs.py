"""Every command the README and the docs show (fenced shell blocks) names things that exist: the
entry point and each of its flags, every `--config.FIELD` override, config files and builder
folders, `tfds build` configs, make targets, the launcher's options, benchmark scripts and their
options. Links between the pages point to files that exist. README stays a front door."""

import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from absl import flags

from mirasol3b import cli, configlib

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), REPO / "benchmarks" / "README.md"]
ENTRY_POINTS = ("main", "evaluate", "answer", "demo", "summary", "aot", "stream")
# Commands of other tools, shown for the reader to run: not ours to check.
OTHERS = ("pip", "gcloud", "gsutil", "export", "cd", "git", "ssh-add", "tensorboard", "ls", "cat", "tail", "kill",
          "docker", "curl", "mkdir", "cp", "rm", "echo", "sudo", "apt-get", "ffmpeg", "source", "nvidia-smi")


def _commands(page: Path) -> list[tuple[int, list[str]]]:
    """(line, argv) of each command in the page's fenced blocks without a language or with sh/bash/shell."""
    out, block, start, language = [], None, 0, None
    for number, line in enumerate(page.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```(\S*)", line)
        if fence:
            if block is None:
                block, start, language = [], number, fence.group(1)
            else:
                if language in ("", "sh", "bash", "shell", "console"):
                    text = "\n".join(block).replace("\\\n", " ")
                    for i, command in enumerate(text.splitlines()):
                        command = command.split(" #")[0].strip()
                        if command and not command.startswith("#"):
                            out.append((start + 1 + i, shlex.split(command.lstrip("$ "))))
                block = None
            continue
        if block is not None:
            block.append(line)
    return out


def _strip_env(argv: list[str]) -> list[str]:
    while argv and re.match(r"^[A-Z_][A-Z0-9_]*=", argv[0]):
        argv = argv[1:]
    return argv


def _is_placeholder(value: str) -> bool:
    return bool(re.fullmatch(r"[A-Z][A-Z0-9_]*([./:-][A-Za-z0-9_.*/-]*)?", value)) or "$" in value or "<" in value


def _flag_names(module: str) -> set[str]:
    entry = importlib.import_module(f"mirasol3b.{module}")
    fv = flags.FlagValues()
    cli.define(entry.SHARED_FLAGS, getattr(entry, "define_flags", None), fv)
    names = set(fv)
    return names | {f"no{n}" for n in names} | {"helpfull", "help", "verbosity", "v", "logtostderr",
                                                 "alsologtostderr", "only_check_args"}


def _check_python_module(module: str, args: list[str], where: str) -> list[str]:
    if module == "allocator":  # argparse, and the command it runs after `--`
        return _check_script("mirasol3b/allocator.py", args[:args.index("--")] if "--" in args else args, where)
    if module not in ENTRY_POINTS:
        return [f"{where}: python -m mirasol3b.{module} is not an entry point ({ENTRY_POINTS})"]
    problems, known = [], _flag_names(module)
    for arg in args:
        if not arg.startswith("--"):
            problems.append(f"{where}: positional argument {arg!r}")
            continue
        name, _, value = arg[2:].partition("=")
        if name.startswith("config."):
            if name[len("config."):] not in configlib.RULES:
                problems.append(f"{where}: --{name}: no such config field")
            continue
        if name not in known:
            problems.append(f"{where}: mirasol3b.{module} has no flag --{name}")
        elif name == "config" and not _is_placeholder(value) and value != "...":
            path = value.split(":")[0]
            if not (REPO / path).is_file():
                problems.append(f"{where}: --config={value}: no file {path}")
    return problems


def _check_tfds(args: list[str], where: str) -> list[str]:
    if not args or args[0] != "build":
        return [f"{where}: tfds {' '.join(args)}: only `tfds build` is shown"]
    folder = REPO / args[1]
    if not folder.is_dir():
        return [f"{where}: tfds build {args[1]}: no such builder folder"]
    configs = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    name = folder.name
    module = importlib.import_module(f"mirasol3b_data.builders.{name}.{name}")
    known = {c.name for c in module.Builder.BUILDER_CONFIGS}
    return [f"{where}: tfds build {args[1]} --config={c}: not one of its configs"
            for c in configs if not c.startswith("{") and not _is_placeholder(c) and c not in known]


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9_-]*):", (REPO / "Makefile").read_text(), re.M))


_launcher_help = None


def _check_launcher(args: list[str], where: str) -> list[str]:
    global _launcher_help
    if _launcher_help is None:
        _launcher_help = subprocess.run(["bash", str(REPO / "launch" / "tpu_run.sh"), "--help"], capture_output=True,
                                        text=True, timeout=60).stdout
    options = []
    for arg in args:
        if arg == "--":
            break
        if arg.startswith("--"):
            options.append(arg.split("=")[0])
    return [f"{where}: launch/tpu_run.sh has no option {o}" for o in options if o not in _launcher_help]


def _check_script(script: str, args: list[str], where: str) -> list[str]:
    path = REPO / script
    if not path.is_file():
        return [f"{where}: no script {script}"]
    source = path.read_text()
    return [f"{where}: {script} has no option {a.split('=')[0]}" for a in args
            if a.startswith("--") and f'"{a.split("=")[0]}"' not in source]


def _check(argv: list[str], where: str) -> list[str]:
    argv = _strip_env(argv)
    if not argv or argv[0] in OTHERS or argv[0].endswith("/pip"):
        return []
    tool = argv[0]
    if tool in ("python", "python3", "python3.11") or tool.endswith("/python"):
        if argv[1:2] == ["-m"]:
            module = argv[2]
            if module.startswith("mirasol3b."):
                return _check_python_module(module[len("mirasol3b."):], argv[3:], where)
            return []  # another tool's module (pip, pytest)
        if argv[1].startswith("-"):
            return []
        return _check_script(argv[1], argv[2:], where)
    if tool == "tfds" or tool.endswith("/tfds"):
        return _check_tfds(argv[1:], where)
    if tool == "make":
        return [f"{where}: make {t}: no such target" for t in argv[1:] if "=" not in t and t not in _make_targets()]
    if tool in ("launch/tpu_run.sh", "./launch/tpu_run.sh"):
        return _check_launcher(argv[1:], where)
    if tool.endswith(".sh") or tool.startswith(("benchmarks/", "./")):
        return [] if (REPO / tool).exists() else [f"{where}: no file {tool}"]
    return [f"{where}: {tool}: a command this test does not know (add it to OTHERS if it is another tool's)"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_names_what_exists(page):
    commands = _commands(page)
    problems = [p for line, argv in commands for p in _check(argv, f"{page.relative_to(REPO)}:{line}")]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_links_point_to_files_that_exist(page):
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target and not (page.parent / target).exists():
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)} links to missing files: {broken}"


def test_readme_is_a_front_door():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md is {len(lines)} lines; move the rest into docs/"
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f"docs/{page.name}" in "\n".join(lines), f"README.md does not link {page.name}"
