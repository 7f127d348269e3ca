"""The repo's modules import one way: the model knows nothing of files, reading files knows only the model, and no
import cycle exists, lazy (inside a function) or not."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {p.stem: p for p in ROOT.glob("*.py")}


def repo_imports(name: str) -> set[str]:
    """The repo modules that module `name` imports anywhere in its source."""
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES) - {name}


def test_the_model_imports_nothing_from_the_repo_and_reading_files_only_the_model():
    assert repo_imports("unet") == set()
    assert repo_imports("checkpoint") == {"unet"}
    assert "pretrained" not in set().union(*(repo_imports(m) for m in MODULES if m != "pretrained"))  # it only writes


def test_there_is_no_import_cycle():
    graph = {name: repo_imports(name) for name in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [dep])}"
            if dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
