"""Device mesh, the one logical-axis rules table, and sharded model construction.

The mesh has three axes: `data` (batch), `fsdp` (batch + parameter sharding along
the model width) and `tensor` (Megatron-style tensor parallelism: q/k/v/gate/up
split over heads/FFN columns, o/down over their rows, the vocab over `tensor`).
Model code names logical axes only; `LOGICAL_RULES` is the single place that maps
them onto the mesh.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import jax
from flax import nnx
from flax.core import spmd as flax_spmd
from jax.sharding import Mesh, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes, or None = replicated).
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Parameters.
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("position", None),
    # Activations (see `constrain`).
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)

M = TypeVar("M", bound=nnx.Module)


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    tensor: int = 1,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types over `devices` (default: all).

    `data=-1` takes whatever the other two axes leave. The product must equal the
    number of devices.
    """
    devices = list(devices if devices is not None else jax.devices())
    if data == -1:
        if len(devices) % (fsdp * tensor):
            raise ValueError(
                f"{len(devices)} devices do not divide into fsdp={fsdp} x tensor={tensor}"
            )
        data = len(devices) // (fsdp * tensor)
    if data * fsdp * tensor != len(devices):
        raise ValueError(
            f"mesh data={data} x fsdp={fsdp} x tensor={tensor} = {data * fsdp * tensor} "
            f"does not match the {len(devices)} devices; change mesh.data/mesh.fsdp/mesh.tensor"
        )
    return jax.make_mesh(
        (data, fsdp, tensor),
        MESH_AXES,
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices,
    )


def _rules_for(mesh_axes: Sequence[str], rules: Sequence[tuple] = LOGICAL_RULES) -> tuple:
    """`rules` with mesh axes missing from `mesh_axes` dropped (replicated)."""

    def keep(target):
        if target is None:
            return None
        if isinstance(target, str):
            return target if target in mesh_axes else None
        kept = tuple(t for t in target if t in mesh_axes)
        return kept or None

    return tuple((name, keep(target)) for name, target in rules)


def logical_to_spec(
    axes: Sequence[str | None], rules: Sequence[tuple] = LOGICAL_RULES
) -> PartitionSpec:
    """The PartitionSpec of logical `axes` under `rules` (an unknown name is an error)."""
    table = dict(rules)
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
        elif name in table:
            spec.append(table[name])
        else:
            raise KeyError(f"logical axis {name!r} has no entry in neva_jax.sharding.LOGICAL_RULES")
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axis names.

    Under a mesh set with `jax.set_mesh`, constrains `x` to the spec that the active
    `nnx.logical_axis_rules` (else LOGICAL_RULES) give; with no mesh set (plain
    single-device code) it returns `x` unchanged, as there is nothing to constrain.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    rules = flax_spmd.get_logical_axis_rules() or LOGICAL_RULES
    spec = logical_to_spec(axes, _rules_for(mesh.axis_names, rules))
    return jax.lax.with_sharding_constraint(x, spec)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Sequence[tuple] = LOGICAL_RULES) -> Iterator[Mesh]:
    """Enters `mesh` (`jax.set_mesh`) and the logical axis rules together.

    Inside it, modules built eagerly are born sharded and `constrain` is active.
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(_rules_for(mesh.axis_names, rules)):
        yield mesh


def abstract_sharded(
    constructor: Callable[[], M], mesh: Mesh, rules: Sequence[tuple] = LOGICAL_RULES
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state) of `constructor()`: ShapeDtypeStructs with their shardings.

    Nothing is allocated; use it as an Orbax restore target or to place loaded
    weights directly onto their shards.
    """
    with use_mesh(mesh, rules):
        abstract = nnx.eval_shape(constructor)
        graphdef, state = nnx.split(abstract)
        shardings = nnx.get_named_sharding(state, mesh)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings
    )
    return graphdef, state


def abstract_state(
    constructor: Callable[[], M], mesh: Mesh | None
) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs with their shardings) of `constructor()`.

    Nothing is allocated. With a mesh each array is placed by its logical axes
    (`abstract_sharded`); without one every array belongs on the first device.
    """
    if mesh is not None:
        return abstract_sharded(constructor, mesh)
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(constructor))
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return graphdef, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=one), state
    )


def state_shardings(module: nnx.Module) -> nnx.State:
    """The NamedSharding of every array in `module`'s state (for jit in/out_shardings)."""
    return jax.tree.map(lambda a: a.sharding, nnx.state(module))


def create_sharded(
    constructor: Callable[[], M], mesh: Mesh, rules: Sequence[tuple] = LOGICAL_RULES
) -> M:
    """Builds `constructor()` with every parameter created directly on its shards.

    The constructor runs under `jax.jit` with `out_shardings` taken from the logical
    axis names, so no device ever holds a full unsharded copy. Example:
    `llm = create_sharded(lambda: Llama(cfg, rngs=nnx.Rngs(0)), make_mesh(4, 1, 2))`.
    """
    graphdef, abstract = abstract_sharded(constructor, mesh, rules)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    def init():
        return nnx.state(constructor())

    with use_mesh(mesh, rules):
        lowered = jax.jit(init, out_shardings=shardings).lower()
        state = lowered.compile(compiler_options=_init_compiler_options())()
    return nnx.merge(graphdef, state)


def _init_compiler_options() -> dict[str, Any] | None:
    """XLA options for the one-off initialisation program.

    On CPU, random initialisation is thousands of small threefry fusions that LLVM
    spends 10+ s optimising for a program that runs once in milliseconds; without
    backend optimisation it compiles ~5x faster (values agree to ~1e-8).
    """
    if jax.default_backend() == "cpu":
        return {"xla_backend_optimization_level": 0}
    return None


def unsharded(constructor: Callable[[], M]) -> M:
    """Builds `constructor()` on the default device, ignoring sharding annotations.

    The constructor runs as one compiled program (see `_init_compiler_options`).
    """
    with nnx.use_eager_sharding(False):
        graphdef, _ = nnx.split(nnx.eval_shape(constructor))
        lowered = jax.jit(lambda: nnx.state(constructor())).lower()
        state = lowered.compile(compiler_options=_init_compiler_options())()
    return nnx.merge(graphdef, state)
