"""The scripts under ``tools/`` use the installed package through its public API (issue 29, item 5):
none edits ``sys.path`` (they import ``flowdppo_video`` as installed; the shared measuring code is
``flowdppo_video.commands.benchmarking``), and none assigns to a trainer's attribute (an objective or an
update is changed through ``Trainer.collect``, ``Trainer.set_objective`` and
``PolicyUpdate.set_objective``, never by replacing what the trainer holds)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = sorted((ROOT / "tools").rglob("*.py"))


MUTATORS = {"insert", "append", "extend", "remove", "pop", "clear", "__setitem__", "__iadd__"}


def _sys_path_edits(tree: ast.AST) -> list[int]:
    """Lines that change ``sys.path`` (``insert``, ``append``, ... or an assignment)."""
    def is_sys_path(node: ast.AST) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys")

    lines = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS
                and is_sys_path(node.func.value)):
            lines.append(node.lineno)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if is_sys_path(t) or (isinstance(t, ast.Subscript) and is_sys_path(t.value)):
                    lines.append(node.lineno)
    return sorted(set(lines))


def _trainer_assignments(tree: ast.AST) -> list[int]:
    """Lines that assign to an attribute of a trainer or of anything it holds: ``trainer.x = ...``,
    ``self.trainer.policy_update.x = ...``, ``setattr(trainer, ...)`` (a trainer: a name or attribute
    ending in ``trainer``)."""
    def rooted_at_trainer(node: ast.AST) -> bool:
        while isinstance(node, (ast.Attribute, ast.Subscript)):
            if isinstance(node, ast.Attribute) and node.attr.lower().endswith("trainer"):
                return True
            node = node.value
        return isinstance(node, ast.Name) and node.id.lower().endswith("trainer")

    lines = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if (isinstance(sub, ast.Attribute) and isinstance(sub.ctx, ast.Store)
                            and rooted_at_trainer(sub.value)):
                        lines.append(node.lineno)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
              and node.args and rooted_at_trainer(node.args[0])):
            lines.append(node.lineno)
    return sorted(set(lines))


def test_the_tools_are_found():
    names = {p.relative_to(ROOT).as_posix() for p in TOOLS}
    assert {"tools/gpu_check.py", "tools/bench/_common.py", "tools/bench/run_all.py"} <= names


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_tool_edits_sys_path_or_assigns_a_trainer_attribute(path: Path):
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    assert not _sys_path_edits(tree), f"{path.name} edits sys.path at lines {_sys_path_edits(tree)}: import the package"
    assert "sys.path.insert" not in text and "sys.path.append" not in text
    assert not _trainer_assignments(tree), (
        f"{path.name} assigns to a trainer attribute at lines {_trainer_assignments(tree)}: use Trainer.collect, "
        "Trainer.set_objective or PolicyUpdate.set_objective")


def test_the_checks_catch_what_they_look_for():
    bad = ast.parse("import sys\nsys.path.insert(0, 'x')\nsys.path = []\ntrainer.update = f\n"
                    "self.trainer.policy_update.objective = o\nsetattr(trainer, 'update', f)\n")
    assert _sys_path_edits(bad) == [2, 3]
    assert _trainer_assignments(bad) == [4, 5, 6]
    fine = ast.parse("trainer.set_objective(s)\nx = trainer.update(t, a, 0)\nsys.path.copy()\n"
                     "self.trainer = Trainer(cfg)\nargs.trainer_config = 1\n")
    assert _trainer_assignments(fine) == [] and _sys_path_edits(fine) == []
