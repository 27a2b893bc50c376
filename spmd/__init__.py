"""spmd: a JAX SPMD training engine.

Importing spmd does not start JAX's backend, so `simulate_cpu_devices` can still run.
"""

from spmd.errors import SpmdError
from spmd.layout import Layout
from spmd.mesh import MESH_AXES, MeshConfig, make_mesh, parse_mesh, simulate_cpu_devices
from spmd.models import Model, get_model, model_names
from spmd.rules import Rules, constrain, logical_to_spec, sharding_context

__all__ = [
    "MESH_AXES",
    "Layout",
    "MeshConfig",
    "Model",
    "Rules",
    "SpmdError",
    "constrain",
    "get_model",
    "logical_to_spec",
    "make_mesh",
    "model_names",
    "parse_mesh",
    "sharding_context",
    "simulate_cpu_devices",
]
