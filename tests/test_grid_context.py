"""The grid context: one object per grid and forward carries RoPE tables, the backend and what it reads of the grid.

Checks that the models build it once per forward (SDT-P) or per stage (SDT-H), never per block, and hand the same
object to every attention layer; that a backend receives exactly the grid tensors it declares; that the models
never name a backend nor build grid tensors themselves; and that ``count_parameters`` is defined once.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_transformer

import sdt_diffusion
from sdt_diffusion.attention import backends as ab
from sdt_diffusion.attention import spatial_decay as eq
from sdt_diffusion.attention.grid import GridContext
from sdt_diffusion.attention.modes import DECAY_MODES
from sdt_diffusion.models import SDTH, SpatialDecayAttention, count_parameters

MODELS_DIR = Path(sdt_diffusion.__file__).parent / "models"
BUILTIN_BACKENDS = ("math", "sdpa", "augmented", "dense", "flex")
SDT_H_TINY = dict(embed_dims=(16, 32, 32, 32), depths=(2, 2, 1, 3), num_heads=(2, 4, 4, 4),
                  mlp_ratios=(2.0, 2.0, 2.0, 2.0), gate_rank=4, head_hidden_size=24, drop_path_rate=0.0, num_labels=5)


def counting_build(monkeypatch) -> list[GridContext]:
    """Replace ``GridContext.build`` by a wrapper that records every context it returns."""
    built: list[GridContext] = []
    build = GridContext.build

    def spy(cls, *args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(GridContext, "build", classmethod(spy))
    return built


def contexts_seen_by_attention(model: torch.nn.Module) -> list[GridContext]:
    """Register hooks that record the context each attention layer is called with."""
    seen: list[GridContext] = []
    for module in model.modules():
        if isinstance(module, SpatialDecayAttention):
            module.register_forward_pre_hook(lambda m, args: seen.append(args[1]))
    return seen


def sdt_p_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 4, 8, 8, generator=g), torch.tensor([10, 500])[:batch], torch.tensor([1, 3])[:batch]


# ---------------------------------------------------------------------------------------------- once per forward
@pytest.mark.parametrize("checkpointing", [False, True])
def test_sdt_p_builds_one_context_per_forward_shared_by_every_block(monkeypatch, checkpointing):
    model = make_tiny_transformer(num_layers=3)
    if checkpointing:
        model.enable_gradient_checkpointing()
        model.train()
    built = counting_build(monkeypatch)
    seen = contexts_seen_by_attention(model)
    out = model(*sdt_p_inputs()).sample
    if checkpointing:
        out.square().mean().backward()  # the recomputation reuses the forward's context
    assert len(built) == 1
    assert len(seen) >= 3 and all(ctx is built[0] for ctx in seen)
    model(*sdt_p_inputs())
    assert len(built) == 2  # a new one for the next forward


def test_sdt_h_builds_one_context_per_stage(monkeypatch):
    torch.manual_seed(0)
    model = SDTH(**SDT_H_TINY).eval()
    built = counting_build(monkeypatch)
    seen = contexts_seen_by_attention(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    assert [(ctx.height, ctx.width) for ctx in built] == [(16, 24), (8, 12), (4, 6), (2, 3)]
    assert [ctx.decay_mode for ctx in built] == list(model.decay_modes)
    per_stage = [ctx for ctx, depth in zip(built, SDT_H_TINY["depths"]) for _ in range(depth)]
    assert len(seen) == len(per_stage) and all(a is b for a, b in zip(seen, per_stage))


# ---------------------------------------------------------------------------------------------- what is built
@pytest.mark.parametrize("mode", DECAY_MODES)
@pytest.mark.parametrize("backend", BUILTIN_BACKENDS)
def test_build_computes_exactly_the_grid_tensors_the_backend_declares(mode, backend):
    ctx = GridContext.build(3, 5, head_dim=8, decay_mode=mode, backend=backend)
    needs = ab.grid_needs(backend, mode)
    assert ctx.backend_name == backend and ctx.backend is ab.ATTENTION_BACKENDS[backend]
    assert (ctx.codes is not None) == ("codes" in needs)
    assert (ctx.distance is not None) == ("distance" in needs)
    if ctx.codes is not None:
        assert torch.equal(ctx.codes, eq.threshold_codes(3, 5))
    if ctx.distance is not None:
        assert torch.equal(ctx.distance, eq.manhattan_distance(3, 5))
    low_rank = mode in ("cdsf", "fixed")
    assert needs == {"augmented": {"codes"} if low_rank else set(),
                     "dense": {"distance"} if mode == "cdsf" else set()}.get(backend, set())


def test_build_resolves_auto_and_makes_rope_tables_in_the_model_dtype():
    ctx = GridContext.build(4, 4, head_dim=8, decay_mode="cdsf", device="cpu", dtype=torch.float64)
    assert ctx.backend_name == ab.auto_backend_name("cpu", "cdsf", 16) and ctx.tokens == 16
    cos, sin = eq.rope_tables(eq.rope_2d_angles(4, 4, 8).double())
    assert ctx.rope[0].dtype == torch.float64
    assert torch.equal(ctx.rope[0], cos) and torch.equal(ctx.rope[1], sin)
    assert GridContext.build(4, 4, head_dim=8, decay_mode="cdsf", use_rope=False).rope is None
    assert GridContext.build(4, 4, head_dim=8, decay_mode="cdsf", dtype=torch.bfloat16).rope[0].dtype == torch.float32


def test_build_and_layer_refuse_bad_inputs_by_name():
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        GridContext.build(4, 4, head_dim=8, decay_mode="cdsf", backend="flash")
    with pytest.raises(ValueError, match="decay_mode must be one of"):
        GridContext.build(4, 4, head_dim=8, decay_mode="gaussian")
    with pytest.raises(ValueError, match="positive integer sides"):
        GridContext.build(0, 4, head_dim=8, decay_mode="cdsf")
    attn = SpatialDecayAttention(16, 2, decay_mode="cdsf", gate_rank=4)
    x = torch.randn(1, 12, 16)
    with pytest.raises(ValueError, match="decay_mode 'fixed'.*'cdsf'"):
        attn(x, GridContext.build(3, 4, head_dim=8, decay_mode="fixed"))
    with pytest.raises(ValueError, match="12 tokens.*4 x 4"):
        attn(x, GridContext.build(4, 4, head_dim=8, decay_mode="cdsf"))
    with pytest.raises(ValueError, match="16 wide.*head width is 8"):
        attn(x, GridContext.build(3, 4, head_dim=16, decay_mode="cdsf"))
    with pytest.raises(ValueError, match="must be a GridContext"):
        attn(x, (3, 4))


def test_a_registered_backend_receives_what_it_declares_once_per_forward():
    """A new backend plugs in by name with its grid needs; every layer gets the same precomputed tensor."""
    received = []

    def recording_math(q, k, v, decay):
        received.append(decay.distance)
        return ab.math_attention(q, k, v, decay)

    ab.register_attention_backend("recording", recording_math, lambda spec: frozenset({"distance"}))
    try:
        model = make_tiny_transformer(num_layers=3, attention_backend="recording")
        reference = make_tiny_transformer(num_layers=3, attention_backend="math")
        with torch.no_grad():
            out = model(*sdt_p_inputs()).sample
            torch.testing.assert_close(out, reference(*sdt_p_inputs()).sample, rtol=0, atol=0)
        assert len(received) == 3 and all(d is received[0] for d in received)
        assert torch.equal(received[0], eq.manhattan_distance(4, 4))
        ab.register_attention_backend("recording", recording_math, lambda spec: frozenset({"gates"}))
        with pytest.raises(ValueError, match=r"'recording' needs unknown grid tensors \['gates'\]"):
            model(*sdt_p_inputs())
    finally:
        ab.ATTENTION_BACKENDS.pop("recording", None)
        ab.BACKEND_GRID_NEEDS.pop("recording", None)
    with pytest.raises(ValueError, match="other than 'auto'"):
        ab.register_attention_backend("auto", recording_math)


# ---------------------------------------------------------------------------------------------- models' source
def model_sources() -> dict[str, ast.Module]:
    return {path.name: ast.parse(path.read_text()) for path in sorted(MODELS_DIR.glob("*.py"))}


def docstrings(tree: ast.Module) -> set[int]:
    """ids of the string constants that are docstrings (module, class, function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def test_models_never_name_a_backend_nor_build_grid_tensors():
    """Backend choice and what a backend reads of the grid belong to the attention package (``GridContext``)."""
    assert set(BUILTIN_BACKENDS) <= set(ab.ATTENTION_BACKENDS)
    internals = {"resolve_backend", "resolve_backend_name", "auto_backend_name", "ATTENTION_BACKENDS",
                 "BACKEND_GRID_NEEDS", "grid_needs", "threshold_codes", "manhattan_distance", "rope_tables",
                 "rope_2d_angles"}
    offences = []
    sources = model_sources()
    assert "transformer_sdt.py" in sources and "sdt_h.py" in sources
    for name, tree in sources.items():
        skip = docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
                if any(node.value == b or f"'{b}'" in node.value or f'"{b}"' in node.value for b in BUILTIN_BACKENDS):
                    offences.append(f"{name}:{node.lineno}: backend name in {node.value!r}")
            elif isinstance(node, ast.Name) and node.id in internals:
                offences.append(f"{name}:{node.lineno}: {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr in internals:
                offences.append(f"{name}:{node.lineno}: .{node.attr}")
            elif isinstance(node, ast.alias) and node.name in internals:
                offences.append(f"{name}:{node.lineno}: imports {node.name}")
    assert not offences, offences


def test_count_parameters_is_defined_once():
    definitions = [name for name, tree in model_sources().items() for node in ast.walk(tree)
                   if isinstance(node, ast.FunctionDef) and node.name == "count_parameters"]
    assert definitions == ["utils.py"]
    assert sdt_diffusion.count_parameters is count_parameters
    assert inspect.getmodule(count_parameters).__name__ == "sdt_diffusion.models.utils"
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 6 and count_parameters(layer, trainable_only=False) == 8


def test_no_long_function_in_attention_or_models_without_its_reason():
    """A function over 80 lines carries a ``# long: <reason>`` comment on the line above its ``def``."""
    long_ones = []
    for folder in ("attention", "models"):
        for path in sorted((MODELS_DIR.parent / folder).glob("*.py")):
            lines = path.read_text().splitlines()
            for node in ast.walk(ast.parse("\n".join(lines))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                    if not lines[first - 2].strip().startswith("# long:"):
                        long_ones.append(f"{folder}/{path.name}:{node.lineno} {node.name}")
    assert not long_ones, long_ones
