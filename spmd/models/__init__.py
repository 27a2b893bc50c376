"""Model registry: a name (and `--set` overrides) -> a `Model` the trainer can drive."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from spmd import params as param_lib
from spmd.errors import SpmdError
from spmd.models import gpt, mlp, moe


@dataclasses.dataclass(frozen=True)
class Model:
    """What the engine needs of a model: its parameters, its loss, and its batch's axes."""

    name: str
    cfg: Any
    param_specs: Callable[[Any], Any]
    loss_fn: Callable[[Any, Any, Any], Any]
    batch_axes: Mapping[str, tuple]
    # `(cfg, key) -> params` for models whose parameters are created together (a Flax module,
    # spmd.interop.flax_adapter); None: each ParamSpec's own initializer, keyed by position.
    init_fn: Callable[[Any, Any], Any] | None = None
    has_aux: bool = False  # loss_fn returns (loss, metrics), a dict of arrays

    def specs(self):
        return self.param_specs(self.cfg)

    def init(self, key):
        """Unsharded parameter values; jit this with `out_shardings` to create them sharded."""
        if self.init_fn is None:
            return param_lib.init_unsharded(self.specs(), key)
        return self.init_fn(self.cfg, key)

    def loss(self, params, batch):
        out = self.loss_fn(params, batch, self.cfg)
        return out[0] if self.has_aux else out

    def loss_and_metrics(self, params, batch):
        """(loss, the model's own metrics): what the train step differentiates."""
        out = self.loss_fn(params, batch, self.cfg)
        return out if self.has_aux else (out, {})

    @property
    def n_params(self) -> int:
        return param_lib.count(self.specs())


def model_names() -> list[str]:
    return [*gpt.presets(), *moe.presets()]


def get_model(name: str, overrides: Mapping[str, Any] | None = None) -> Model:
    """A preset by name, with config fields overridden (`{"n_layers": 2}`, values may be str)."""
    if name in moe.presets():
        cfg = with_overrides(moe.presets()[name], overrides or {})
        return Model(name, cfg, moe.param_specs, moe.loss_fn, moe.BATCH_AXES, has_aux=True)
    presets = gpt.presets()
    if name not in presets:
        raise SpmdError(f"unknown model {name!r}; choose one of {', '.join(model_names())}")
    cfg = with_overrides(presets[name], overrides or {})
    return Model(name, cfg, gpt.param_specs, gpt.loss_fn, gpt.BATCH_AXES)


def mlp_model(cfg: mlp.MLPConfig | None = None) -> Model:
    return Model("mlp", cfg or mlp.MLPConfig(), mlp.param_specs, mlp.loss_fn, mlp.BATCH_AXES)


def with_overrides(cfg, overrides: Mapping[str, Any]):
    """Replace dataclass fields, converting strings to the field's type. Unknown keys fail."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    values = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise SpmdError(f"unknown model field {key!r}; fields are {', '.join(fields)}")
        values[key] = _convert(key, raw, hints[key])
    return dataclasses.replace(cfg, **values)


def parse_overrides(text: str | None) -> dict[str, str]:
    """`"d_model=256,n_layers=2"` -> {"d_model": "256", "n_layers": "2"}."""
    out = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise SpmdError(f"--set entry {part!r} must look like KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def _convert(key: str, raw, kind):
    if not isinstance(raw, str):
        return raw
    if isinstance(kind, types.UnionType):
        kind = typing.get_args(kind)[0]
    if kind is bool:  # bool("false") is True
        if raw.lower() not in ("true", "false"):
            raise SpmdError(f"model field {key}={raw!r} must be true or false")
        return raw.lower() == "true"
    try:
        return kind(raw) if kind in (int, float, str) else raw
    except ValueError:
        raise SpmdError(f"model field {key}={raw!r} is not a valid {kind.__name__}") from None
