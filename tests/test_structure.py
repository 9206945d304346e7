"""The layout's rules, checked on the source: no import cycles between the project's modules
(imports inside functions count too), no module uses another module's private (`_name`)
names, and importing a stage core needs nothing but the standard library, mlx, mlx-lm and numpy
(a stage may import an optional library inside the function that needs it, e.g. `datasets`)."""

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("stages", "pipelines")


def _modules() -> dict[str, Path]:
    return {
        f"{package}.{path.stem}" if path.stem != "__init__" else package: path
        for package in PACKAGES
        for path in sorted((ROOT / package).glob("*.py"))
    }


def _imports(name: str, path: Path):
    """(imported project modules, [(module, private name)], third-party top-level names)."""
    tree = ast.parse(path.read_text(), str(path))
    modules = _modules()
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found, private, external, aliases = set(), [], set(), {}
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top_level:
            base = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
            if (base or "").split(".")[0] not in PACKAGES:
                continue  # a lazy import of a library: allowed (see the docstring)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    found.add(alias.name)
                    aliases[alias.asname or alias.name] = alias.name
                elif alias.name.split(".")[0] not in PACKAGES:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([package, base]).strip(".")
            if base.split(".")[0] not in PACKAGES:
                external.add(base.split(".")[0])
                continue
            for alias in node.names:
                target = f"{base}.{alias.name}"
                if target in modules:  # from stages import rollout
                    found.add(target)
                    aliases[alias.asname or alias.name] = target
                else:
                    found.add(base)
                    if alias.name.startswith("_"):
                        private.append((base, alias.name))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            private.append((aliases[node.value.id], node.attr))
    found.discard(name)
    return found, private, external


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path)[0] & set(modules) for name, path in modules.items()}
    # A package's __init__ runs before its modules; it may import them (stages/__init__ imports
    # stages.backend) without that being a cycle through the package.
    for name in graph:
        graph[name] -= {p for p in PACKAGES if p != name}
    cycles, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_module_uses_another_modules_private_names():
    uses = []
    for name, path in _modules().items():
        for module, private in _imports(name, path)[1]:
            if module != name:
                uses.append(f"{name} uses {module}.{private}")
    assert not uses, "; ".join(uses)


def test_stage_cores_need_only_mlx_mlx_lm_and_numpy():
    allowed = {"mlx", "mlx_lm", "numpy", "transformers", "tokenizers"}  # the last two: mlx-lm's
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    for name, path in _modules().items():
        if not name.startswith("stages"):
            continue
        extra = _imports(name, path)[2] - allowed - stdlib
        assert not extra, f"{name} imports {sorted(extra)}"


def test_every_update_memory_variant_can_be_named_in_its_variants_list():
    """benchmarks/update_memory.py takes --variants as a comma-separated list of VARIANTS' names:
    a name with a comma in it could never be asked for."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import update_memory
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    names = list(update_memory.VARIANTS)
    assert ",".join(names).split(",") == names
    assert update_memory.VARIANTS["full"] == (False, "auto")  # the default config's update
