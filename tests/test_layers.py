"""The layers import downwards only: jobs/ -> pipeline/ -> dit4sr/ and media/; dit4sr/ (its CLI) -> media/; media/
imports neither. Ray enters the model library only in its distributed training, and only when that runs.

Read from the source (every import statement, also those inside functions), so a lazy import cannot hide a
back-arrow; and checked in a fresh interpreter for what importing the library really loads."""

import ast
import itertools
import json
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("dit4sr", "media", "pipeline")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(package: str) -> dict[str, pathlib.Path]:
    return {module_name(path): path for path in sorted((REPO / package).rglob("*.py"))}


def imports(path: pathlib.Path) -> list[tuple[str, bool]]:
    """``(imported module, at module level)`` for every import in the file; relative imports resolved, and
    ``from package import name`` counted as importing ``package.name`` where that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                child = f"{base}.{alias.name}"
                location = REPO / child.replace(".", "/")
                is_module = location.with_suffix(".py").exists() or (location / "__init__.py").exists()
                found.append((child if is_module else base, id(node) in top_level))
    return found


def imported_by(package: str) -> dict[str, set[str]]:
    return {name: {module for module, _ in imports(path)} for name, path in modules(package).items()}


def in_package(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("package, forbidden", [("dit4sr", ("pipeline", "jobs")),
                                                ("media", ("pipeline", "jobs", "dit4sr"))])
def test_lower_layers_never_import_upper_ones(package, forbidden):
    arrows = sorted((name, module) for name, found in imported_by(package).items() for module in found
                    if any(in_package(module, upper) for upper in forbidden))
    assert arrows == []


def test_the_checker_sees_imports_inside_functions():
    found = imports(REPO / "dit4sr" / "training" / "distributed.py")
    assert ("ray.train", False) in found and ("dit4sr.training.trainer", True) in found
    assert not any(in_package(module, "ray") for module, top in found if top)


def test_ray_only_in_distributed_training_and_only_inside_its_functions():
    users = sorted(name for name, path in modules("dit4sr").items()
                   if any(in_package(module, "ray") for module, _ in imports(path)))
    assert users == ["dit4sr.training.distributed"]


def test_the_model_library_has_no_import_circle():
    """Between the library's modules (package ``__init__`` files aside: they only re-export), counting lazy
    imports too: a circle means two modules that cannot be understood, or changed, apart."""
    graph = {name: {module for module in found if module in modules("dit4sr") and module != name
                    and not (REPO / module.replace(".", "/") / "__init__.py").exists()}
             for name, found in imported_by("dit4sr").items()
             if modules("dit4sr")[name].name != "__init__.py"}
    circles = []
    for start, middle in itertools.product(graph, repeat=2):
        if middle in graph[start] and start in reachable(graph, middle):
            circles.append((start, middle))
    assert circles == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for module in graph.get(todo.pop(), ()):
            if module not in seen:
                seen.add(module)
                todo.append(module)
    return seen


def test_importing_the_model_library_loads_no_ray_and_no_pipeline():
    code = ("import json, sys, dit4sr, dit4sr.cli, dit4sr.eval, dit4sr.train, dit4sr.training.distributed; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pipeline', 'jobs'})))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
