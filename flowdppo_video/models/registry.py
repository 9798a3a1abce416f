"""The model families, one spec each. A family is one module of this package that calls
:func:`register` once at import; every module here is imported on the first look-up, so adding a
family is adding its module (a test can register a tiny one the same way). Nothing outside
``models/`` names a family: the rest of the package reads ``model.family`` and asks this registry.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch

from .base import ModelError, SequenceParallelPlan, VideoFlowAdapter

if TYPE_CHECKING:                                   # the config is typed only (models/ sits below it)
    from flowdppo_video.runs.config import ModelConfig
    from .activations import ActivationProfile


def _max_sequence_length(adapter: VideoFlowAdapter) -> int:
    return int(adapter.max_sequence_length)


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """Everything the package knows about one family (``model.family == name``)."""

    name: str                                       # model.family
    pipeline: str                                   # the diffusers pipeline model_index.json names
    adapter: type[VideoFlowAdapter]                 # its adapter class (subclasses are the same family)
    # (cfg, resolved model.path or None, device) -> the adapter, loaded from the path or built from
    # cfg.init with random weights; what trains is set up afterwards by build_adapter.
    build: Callable[["ModelConfig", str | None, torch.device], VideoFlowAdapter]
    tiny_init: Mapping[str, Mapping[str, Any]]      # the tiny test model's model.init defaults
    # The planner: saved-for-backward bytes of one training expert (transformer, dtype bytes).
    activation_profile: Callable[[torch.nn.Module, int], "ActivationProfile"] | None = None
    # The planner: conditioning tokens each video token attends to.
    text_tokens: Callable[[VideoFlowAdapter], int] = _max_sequence_length
    # The planner: model.init from a folder of <part>/config.json files and the parts it lacks.
    init_from_folder: Callable[[Path], tuple[dict[str, Any], list[str]]] | None = None
    # Where Ulysses sequence parallelism cuts a transformer of this family (None: not supported).
    sequence_parallel_plan: Callable[[torch.nn.Module], SequenceParallelPlan] | None = None
    two_experts: bool = False                       # model.train_experts may name a second expert
    # The build honours models.common.building: it can make the conditioning encoders alone or the
    # denoiser alone, so a run's start never holds both (False: every part is built at once).
    staged: bool = False
    # Pipelines of this model line that no family here trains, and what they are ("image-to-video"):
    # named in errors instead of "not a checkpoint of any family".
    unsupported_pipelines: Mapping[str, str] = dataclasses.field(default_factory=dict)


_SPECS: dict[str, FamilySpec] = {}
_loaded = False


def register(spec: FamilySpec) -> FamilySpec:
    """Add ``spec`` (a family module calls it once, at import); a second family of the same name or
    pipeline is a programming error."""
    clash = [s.name for s in _SPECS.values() if s.name == spec.name or s.pipeline == spec.pipeline]
    if clash:
        raise ValueError(f"model family {spec.name!r} ({spec.pipeline}) clashes with the registered {clash[0]!r}")
    _SPECS[spec.name] = spec
    spec.adapter.family_spec = spec      # what VideoFlowAdapter.sequence_parallel_plan reads
    return spec


def unregister(name: str) -> FamilySpec:
    """Remove the family ``name`` (a plugin unloading, or a test restoring the registry); its spec."""
    if name not in _SPECS:
        raise KeyError(f"model family {name!r} is not registered")
    return _SPECS.pop(name)


def families() -> dict[str, FamilySpec]:
    """Every registered family by name (imports this package's modules on the first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
            if not module.name.startswith("_"):
                importlib.import_module(f"{__package__}.{module.name}")
    return dict(_SPECS)


def family(name: str) -> FamilySpec:
    """The spec of ``model.family=name``; a one-line error listing the known ones."""
    specs = families()
    if name not in specs:
        raise ModelError(f"model.family={name!r} is not one of {', '.join(specs)}")
    return specs[name]


def spec_for(adapter: VideoFlowAdapter) -> FamilySpec | None:
    """The family of ``adapter``: the spec of the nearest class in its MRO (None: unregistered)."""
    by_class = {s.adapter: s for s in families().values()}
    for cls in type(adapter).__mro__:
        if cls in by_class:
            return by_class[cls]
    return None


def family_of_pipeline(pipeline: str | None, path: Path) -> str | None:
    """The family whose checkpoints name ``pipeline`` (``model_index.json``'s ``_class_name``); a
    :class:`ModelError` for a pipeline of a known line that no family trains; None otherwise."""
    for spec in families().values():
        if pipeline == spec.pipeline:
            return spec.name
    for spec in families().values():
        if pipeline in spec.unsupported_pipelines:
            raise ModelError(f"model.path {path} holds a {pipeline} ({spec.unsupported_pipelines[pipeline]}), which "
                             f"this project does not train; model.family {spec.name!r} takes its text-to-video "
                             "checkpoints")
    return None
