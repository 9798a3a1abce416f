"""The real import graph of ``flowdppo_video`` and ``rewards``, read with ``ast`` (function bodies
included), keeps what import-linter's contracts do not check (docs/architecture.md, "Imports"):

* no import cycle between modules, not even one hidden in a function body;
* no module imports another module's private (underscore) name (of the project: a private name of
  a dependency, as diffusers' attention registry in ``models/speed.py``, is that dependency's risk);
* an import inside a function is of an optional or heavy third-party dependency only: the project's
  own modules and light libraries are imported at the top, so the graph the contracts check is the
  one that runs.

Imports under ``if TYPE_CHECKING:`` are for annotations only (never run) and are left out."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flowdppo_video", "rewards")

# Third-party modules a function may import, each for a reason: optional (an extra, or only some
# runs need it) or heavy (seconds to import, or a large native library), so importing the package
# stays fast and works without them. A module is matched by its dotted name or a parent of it.
OPTIONAL_OR_HEAVY = {
    "transformers": "heavy: the text encoders and reward models",
    "diffusers": "heavy: the pipelines and their parts",
    "peft": "heavy: LoRA, only for models that train with it",
    "deepspeed": "heavy and optional at run time: only with parallel.zero_stage",
    "matplotlib": "heavy: only the plots",
    "cv2": "heavy native library: only the motion rewards' optical flow",
    "av": "heavy native library: only when a video is read or written",
    "decord": "optional extra: the fast video reader",
    "torchvision": "heavy: only the motion rewards",
    "torch.utils.tensorboard": "optional: TensorBoard logging",
    "tensorboard": "optional: TensorBoard logging (its image summaries)",
    "torch._dynamo": "heavy: Dynamo, only to count compiled graphs",
    "tokenizers": "only the tiny test models' byte tokenizers",
    "PIL": "only where an image is opened (conditioning images, reward frames)",
    "uvicorn": "only the reward server",
    "httpx": "only the remote reward and the VLM judge's client",
    "wandb": "optional extra: run.wandb",
}


def _modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_pkg = parts[-1] == "__init__"
            out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


MODULES = _modules()


def _runtime_nodes(tree: ast.Module):
    """``(node, in_function)`` for every import that can run (``if TYPE_CHECKING:`` bodies left out)."""
    skip: set[int] = set()
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skip:
            yield node, id(node) in in_function


def _target(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = (module if is_pkg else module.rsplit(".", 1)[0]).split(".")
    return ".".join(base[:len(base) - (node.level - 1)] + ([node.module] if node.module else []))


def _imports():
    """``(module, imported module, name or None, in_function, line)`` for every runtime import."""
    for module, (path, is_pkg) in MODULES.items():
        for node, in_fn in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for a in node.names:
                    yield module, a.name, None, in_fn, node.lineno
            else:
                target = _target(node, module, is_pkg)
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in MODULES:
                        yield module, sub, None, in_fn, node.lineno
                    else:
                        yield module, target, a.name, in_fn, node.lineno


IMPORTS = list(_imports())


def _ours(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        found.append(sorted(comp))
    return found


def test_the_graph_is_read():
    """The walk sees the package (a broken walk would pass every test below)."""
    assert {"flowdppo_video.trainer", "flowdppo_video.commands.cli", "rewards.registry"} <= set(MODULES)
    assert ("flowdppo_video.trainer", "flowdppo_video.training.rollout", "rollout", False) in {
        i[:4] for i in IMPORTS}


def test_no_import_cycle_function_bodies_included():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, target, _, _, _ in IMPORTS:
        if target in MODULES and target != module:
            graph[module].add(target)
    assert _cycles(graph) == []


def test_a_cycle_is_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_imports_another_modules_private_name():
    private = [f"{m}:{line} imports {name} from {t}" for m, t, name, _, line in IMPORTS
               if name and name.startswith("_") and not name.startswith("__") and t != m and _ours(t)]
    assert private == []


def test_a_function_imports_only_optional_or_heavy_dependencies():
    def allowed(name: str) -> bool:
        parts = name.split(".")
        return any(".".join(parts[:k]) in OPTIONAL_OR_HEAVY for k in range(1, len(parts) + 1))

    project = [f"{m}:{line} imports {t}" for m, t, _, in_fn, line in IMPORTS if in_fn and _ours(t)]
    assert project == [], "the project's own modules are imported at the top of a module"
    # The stdlib fallback of an optional import (``except ImportError: from contextlib import ...``) is
    # part of that optional import.
    fallbacks = set()
    for module, (path, _) in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers):
                fallbacks.update((module, n.lineno) for h in node.handlers for n in ast.walk(h)
                                 if isinstance(n, (ast.Import, ast.ImportFrom)))
    light = [f"{m}:{line} imports {t}" for m, t, _, in_fn, line in IMPORTS
             if in_fn and not _ours(t) and not allowed(t) and (m, line) not in fallbacks]
    assert light == [], "import these at the top (or name the dependency in OPTIONAL_OR_HEAVY, with why)"


@pytest.mark.parametrize("package", ["runs", "training", "reporting", "commands", "models", "parallel", "world"])
def test_every_sub_package_has_a_contract(package):
    text = (ROOT / "pyproject.toml").read_text()
    assert text.count(f'"flowdppo_video.{package}"') >= 2, f"flowdppo_video.{package} in the layers and a contract"


def test_at_most_twelve_top_level_modules():
    top = sorted(p.name for p in (ROOT / "flowdppo_video").glob("*.py"))
    assert len(top) <= 12, top
    assert {"sde.py", "objectives.py", "advantages.py", "__main__.py"} <= set(top)   # the paths users write
    assert sys.modules.get("flowdppo_video.errors") is None


def test_tests_go_through_public_names_and_share_helpers_through_conftest():
    """A test imports no private name of the packages and no other test module: shared helpers
    live in ``conftest.py`` (or a helper module whose name does not start with ``test_``)."""
    bad = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            mod = node.module or ""
            if node.level and mod.split(".")[0].startswith("test_"):
                bad.append(f"{path.name}:{node.lineno} imports the test module {mod}")
            if not node.level and mod.split(".")[0] in PACKAGES:
                bad += [f"{path.name}:{node.lineno} imports {mod}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, "\n".join(bad)
