"""The guard of issue 28: no host conversion of a tensor that may live on the GPU without an explicit
``.cpu()`` or ``.item()``, in the modules the training loop runs every iteration.

numpy refuses CUDA tensors (``.numpy()``, ``np.float32(t)``); ``float(t)`` works but hides a device
sync. No GPU runs this suite, so a read of the source (AST) stands in: flagged are ``X.numpy()``
unless ``X`` went through ``.cpu()``; ``np.f(X)``, ``float(X)``, ``int(X)`` where ``X`` is a chain of
tensor methods (``t.abs().max()``, ``torch.argmax(t)``) not ending in ``.item()``/``.tolist()`` and not
through ``.cpu()``. A bare name (``float(v)``) is not judged: its type is not in the source.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The per-iteration path: rollout, rewards' aggregation, the update, snapshots, metrics rows, the
# parallel updaters. Outside it: the report and the win rates (numpy on files), models/ (build time),
# the CLI tools, and rewards/ (each reward converts on its own device and returns CPU scores).
HOT = ["trainer.py", "training/policy_update.py", "training/rollout.py", "sde.py", "objectives.py", "advantages.py",
       "training/kl_maps.py",
       "training/evaluation.py", "training/perf.py", "reporting/run_artifacts.py", "parallel/updaters.py", "parallel/zero.py",
       "parallel/sequence.py", "parallel/groups.py"]
# Methods that give (or keep) a tensor: a conversion of their result needs .item() or .cpu().
TENSOR_METHODS = {"mean", "sum", "max", "min", "std", "var", "norm", "abs", "float", "double", "detach", "prod",
                  "amax", "amin", "argmax", "argmin", "clone", "to", "square", "sqrt", "exp", "log"}
HOST = {"item", "tolist", "cpu"}
ALLOWED: dict[str, str] = {
    # "file.py:line text": why. None today.
}


def _chain(node: ast.AST) -> tuple[list[str], ast.AST]:
    """The method names of a call chain ``a.b().c()`` (outermost first) and what it starts from."""
    names = []
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        names.append(node.func.attr)
        node = node.func.value
    return names, node


def _on_host(node: ast.AST) -> bool:
    names, _ = _chain(node)
    return bool(names) and (names[0] in HOST or "cpu" in names)


def _tensor_chain(node: ast.AST) -> bool:
    names, root = _chain(node)
    from_numpy = isinstance(root, ast.Name) and root.id in ("np", "numpy", "math")
    return bool(names) and names[0] in TENSOR_METHODS and not _on_host(node) and not from_numpy


def violations(source: str, name: str) -> list[str]:
    out = []
    for n in ast.walk(ast.parse(source)):
        if not isinstance(n, ast.Call):
            continue
        fn, bad = n.func, False
        if isinstance(fn, ast.Attribute) and fn.attr == "numpy" and not n.args:
            bad = not _on_host(fn.value)
        elif isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id in ("np", "numpy"):
            bad = bool(n.args) and _tensor_chain(n.args[0])
        elif isinstance(fn, ast.Name) and fn.id in ("float", "int") and len(n.args) == 1:
            bad = _tensor_chain(n.args[0])
        if bad:
            out.append(f"{name}:{n.lineno} {ast.unparse(n)}")
    return out


def test_the_guard_flags_what_crashed_and_passes_what_is_safe():
    bad = ("np.float32(kl.float().mean())", "traj.videos[keep].numpy()", "float(log_ratio.abs().max())",
           "int(torch.argmax(a))")
    good = ("np.float32(kl.float().mean().item())", "traj.videos[keep].cpu().numpy()", "x.detach().cpu().numpy()",
            "log_ratio.abs().max().item()", "float(v)", "np.clip(np.rint(out), 0, 255)", "float(t.numel())")
    assert [len(violations(s, "x")) for s in bad] == [1] * len(bad)
    assert [violations(s, "x") for s in good] == [[]] * len(good)


def test_no_unguarded_host_conversion_in_the_training_loop():
    found = []
    for rel in HOT:
        path = ROOT / "flowdppo_video" / rel
        src = path.read_text()
        found += [v for v in violations(src, rel) if not any(v.startswith(k) for k in ALLOWED)]
    assert not found, "host conversions of possibly-device tensors (add .cpu() or .item()):\n" + "\n".join(found)
