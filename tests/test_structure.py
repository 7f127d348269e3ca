"""The repo's shape: modules import one way (the model knows nothing of files, reading files knows only the model, no
import cycle, lazy or not), and every function stays short and takes few parameters."""
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
    assert repo_imports("dit") == {"unet"}
    assert repo_imports("checkpoint") == {"unet", "dit"}
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


MAX_LINES, MAX_PARAMETERS = 60, 8
# the public calls that keep FlowGen's keyword arguments (checkpoint_path, out_path, steps, batch_size, ...)
PUBLIC_KEYWORDS = {"sample_from_checkpoint", "invert_from_checkpoint"}


def functions(path: Path):
    """(name, line, parameters, lines) of every function and method in a file; self and cls are not counted."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs] + [p.arg for p in (a.vararg, a.kwarg) if p]
            params = len([n for n in names if n not in ("self", "cls")])
            yield node.name, node.lineno, params, node.end_lineno - node.lineno + 1


def test_no_function_is_over_60_lines_or_takes_over_8_parameters():
    files = [*MODULES.values(), *sorted((ROOT / "tests").glob("*.py"))]
    found = [(path.relative_to(ROOT), *f) for path in files for f in functions(path)]
    assert len(found) > 300  # the scan sees the code
    long = [f"{p}:{line} {name} ({n} lines)" for p, name, line, _, n in found if n > MAX_LINES]
    wide = [f"{p}:{line} {name} ({k} parameters)" for p, name, line, k, _ in found
            if k > MAX_PARAMETERS and name not in PUBLIC_KEYWORDS]
    assert not long and not wide, "\n".join(long + wide)
