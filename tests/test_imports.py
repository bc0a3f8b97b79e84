"""The repository's shape, read from the source: imports go one way (layers <- model parts <- model
<- train <- entry points), nothing imports in a cycle, `data/` reaches the library only through
`mirasol3b.errors`, no module defines a command-line flag at import, and no code reads a config
field with a default (`config.get(key, default)`)."""

import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DATA_PACKAGE = "mirasol3b_data"  # what `data/` is installed as (setup.py): no user's `data` can shadow it

# Lowest first: a module may import its own layer and those before it, never a later one.
LAYERS = (
    ("errors", ("mirasol3b.errors",)),
    ("layers", ("mirasol3b.layers",)),
    ("model parts", ("mirasol3b.encoders", "mirasol3b.combiner", "mirasol3b.time_aligned", "mirasol3b.text_decoder",
                     "mirasol3b.losses", "mirasol3b.sharding")),
    ("model", ("mirasol3b.model", "mirasol3b.decoding", "mirasol3b.streaming", "mirasol3b.evidence",
               "mirasol3b.grounding", "mirasol3b.report")),
    ("train", ("mirasol3b.configlib", "mirasol3b.paths", "mirasol3b.distributed", "mirasol3b.train")),
    ("entry points", ("mirasol3b.cli", "mirasol3b.evaluate", "mirasol3b.answer", "mirasol3b.main", "mirasol3b.demo",
                      "mirasol3b.summary", "mirasol3b.aot", "mirasol3b.allocator", "mirasol3b.stream")),
)
# What this code names its ConfigDicts besides `*config*` (`c = config.model`, `part = c[stack]`).
CONFIG_NAMES = ("c", "m", "part", "cfg")
# The layers that may read datasets (`data/`): training and the entry points.
READS_DATA = ("train", "entry points")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[0] == "data":
        parts[0] = DATA_PACKAGE
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(*folders: str) -> dict[str, Path]:
    return {_module_name(p): p for folder in folders for p in sorted((REPO / folder).rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(absolute module imported, line) for every import in the file, in functions too."""
    out = []
    package = _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names]
    return out


def _layer(module: str) -> int | None:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    return None


def test_every_module_of_the_library_has_a_layer():
    missing = [m for m in _sources("mirasol3b") if m != "mirasol3b" and _layer(m) is None]
    assert not missing, f"add these modules to a layer of LAYERS: {missing}"


def test_imports_go_one_way():
    modules = _sources("mirasol3b")
    wrong = []
    for module, path in modules.items():
        rank = _layer(module)
        for imported, line in _imports(path):
            if imported.startswith(("data.", DATA_PACKAGE)) or imported in ("data", DATA_PACKAGE):
                if rank is not None and LAYERS[rank][0] not in READS_DATA:
                    wrong.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[rank][0]}) imports {imported}")
                continue
            other = _layer(imported) if imported.startswith("mirasol3b.") else None
            if rank is not None and other is not None and other > rank:
                wrong.append(f"{path.relative_to(REPO)}:{line} ({LAYERS[rank][0]}) imports {imported} "
                             f"({LAYERS[other][0]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = {**_sources("mirasol3b"), **_sources("data")}
    graph = {m: {i for i, _ in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # A package's __init__ importing its own modules is how packages are built, not a cycle.
    graph = {m: {i for i in targets if not (i.startswith(m + "."))} for m, targets in graph.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"modules that import each other: {cycles}"


def test_data_reaches_the_library_only_through_its_errors():
    wrong = [f"{path.relative_to(REPO)}:{line} imports {imported}"
             for module, path in _sources("data").items() for imported, line in _imports(path)
             if imported.startswith("mirasol3b.") and imported != "mirasol3b.errors"
             and not imported.startswith("mirasol3b.errors.")]
    assert not wrong, "data/ must use the library through mirasol3b.errors only:\n" + "\n".join(wrong)


def test_no_module_defines_flags_at_import():
    wrong = []
    for folder in ("mirasol3b", "data", "configs"):
        for module, path in _sources(folder).items():
            tree = ast.parse(path.read_text(), str(path))
            for node in tree.body:  # module level only; `if __name__ == "__main__":` bodies count too
                for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
                    name = ast.unparse(call.func)
                    if ".DEFINE_" in name or name.startswith("DEFINE_"):
                        if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                            wrong.append(f"{path.relative_to(REPO)}:{call.lineno} {name}")
    assert not wrong, "flags defined at import (define them in a define_flags function for cli.run):\n" + "\n".join(wrong)


def test_no_config_field_is_read_with_a_default():
    wrong = []
    for folder in ("mirasol3b", "data", "configs"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                receiver = ast.unparse(node.func.value) if isinstance(node, ast.Call) and isinstance(
                    node.func, ast.Attribute) else ""
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                        and len(node.args) == 2 and ("config" in receiver.lower() or receiver in CONFIG_NAMES)):
                    wrong.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    assert not wrong, "config.get(key, default) hides a misspelt field; read it as config.key:\n" + "\n".join(wrong)


def test_a_users_own_data_package_does_not_shadow_ours(tmp_path):
    """`PYTHONPATH=.` with a `data/` package of the user's (docs/data.md: task modules on the path): their
    task module registers a task with our library, and the pipeline finds it."""
    package = tmp_path / "data"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text("USER_TASKS_LOADED = True\n")
    (package / "my_tasks.py").write_text(textwrap.dedent(f"""\
        import seqio
        import tensorflow as tf

        from data.tasks import USER_TASKS_LOADED  # the user's own module of that name
        from {DATA_PACKAGE}.tasks import add_media_task

        def dataset_fn(split, shuffle_files, seed=None):
            return tf.data.Dataset.from_tensors({{"video": tf.zeros([2, 32, 32, 3], tf.uint8),
                                                  "audio": tf.zeros([4000]), "num_snippets": 1,
                                                  "prompt": "q", "answer": "a"}})

        assert USER_TASKS_LOADED
        add_media_task("users_task", seqio.FunctionDataSource(dataset_fn, splits=["train"]))
        """))
    program = textwrap.dedent(f"""\
        from configs import tiny
        from {DATA_PACKAGE} import pipeline, tasks
        config = tiny.get_config()
        with config.unlocked():
            config.data.update(task="users_task", task_modules="data.my_tasks")
        print(pipeline.resolve_provider(config).name, len(tasks.LOCAL_MEDIA_MANIFEST_CONFIGS))
        """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["users_task", "6"], done.stdout
