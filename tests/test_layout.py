"""The package layout's rules, read from the source (every import, at module level or inside a
function): no import cycle in din_ray, the model and its embeddings free of Ray and of the
training loop, one module that calls `ray.init`, no private Ray API."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "din_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path) -> set[str]:
    """Every module `path` imports, resolved to the din_ray module it names where it names one
    (`from din_ray.x import y` is din_ray.x.y when y is a module, else din_ray.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                names.add(sub if sub in MODULES else node.module)
    return names


def din_ray_imports(path: Path) -> set[str]:
    return {n for n in imported_names(path) if n in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_find_cycle_finds_a_lazy_two_module_cycle():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_din_ray():
    graph = {name: din_ray_imports(path) - {name} for name, path in MODULES.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("package", ["din_ray.model", "din_ray.embeddings"])
def test_model_and_embeddings_import_neither_ray_nor_training(package):
    offenders = {}
    for name, path in MODULES.items():
        if name == package or name.startswith(package + "."):
            bad = {n for n in imported_names(path)
                   if n == "ray" or n.startswith("ray.") or n.startswith("din_ray.train")
                   or n.startswith("din_ray.tune") or n.startswith("din_ray.serve")}
            if bad:
                offenders[name] = sorted(bad)
    assert not offenders, f"{package} must stay free of Ray and of the stages above it: {offenders}"


def test_embeddings_do_not_import_the_model():
    """Tables are below models: a model declares the tables it needs (embeddings.TableSpec)."""
    offenders = {name: sorted(n for n in din_ray_imports(path) if n.startswith("din_ray.model"))
                 for name, path in MODULES.items() if name.startswith("din_ray.embeddings")}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, offenders


def _calls_ray_init(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "init" and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "ray"):
            return True
    return False


def test_only_ray_session_calls_ray_init():
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "jobs").glob("*.py")]
    callers = sorted(str(p.relative_to(ROOT)) for p in sources if _calls_ray_init(p))
    assert callers == ["din_ray/ray_session.py"]


def test_no_private_ray_api():
    sources = [*PACKAGE.rglob("*.py"), *(ROOT / "jobs").glob("*.py"),
               *(ROOT / "benchmarks").glob("*.py")]
    private = sorted(f"{p.relative_to(ROOT)}: {n}" for p in sources
                     for n in imported_names(p) if n.startswith("ray.") and "._private" in n)
    assert not private, private
