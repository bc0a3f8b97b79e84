"""benchmarks/step_profile.py reads compiled HLO text to say what each traced op is; these check
that reading on an excerpt of a real train step's HLO and on a freshly compiled function."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from step_profile import HloModule  # noqa: E402

_BACKWARD = "jit(train_step)/transpose(jvp(Mirasol3B))/Mirasol3B.encode_media/combiner/transformer/layers_0"
# Cut from the peer-scale train step's compiled HLO (jaxlib 0.10.2), op names shortened.
EXCERPT = f"""\
HloModule jit_train_step, entry_computation_layout={{(f32[2944,1536]{{1,0}})->f32[2944,384]{{1,0}}}}

%fused_computation.293 (param_0.418: f32[2944,1536], param_1.424: f32[384,1536]) -> f32[2944,384] {{
  %param_0.418 = f32[2944,1536]{{1,0}} parameter(0)
  %param_1.424 = f32[384,1536]{{1,0}} parameter(1)
  ROOT %dot.455 = f32[2944,384]{{1,0}} dot(%param_0.418, %param_1.424), lhs_contracting_dims={{1}}, rhs_contracting_dims={{1}}, metadata={{op_name="{_BACKWARD}/mlp/wi/dot_general"}}
}}

%fused_computation.1428 (param_0.2545: f32[128,23,1536]) -> f32[1536,2944] {{
  %param_0.2545 = f32[128,23,1536]{{2,1,0}} parameter(0)
  %transpose.1123 = f32[1536,128,23]{{0,2,1}} transpose(%param_0.2545), dimensions={{2,0,1}}
  %copy.1490 = f32[1536,128,23]{{2,1,0}} copy(%transpose.1123)
  ROOT %bitcast.1012 = f32[1536,2944]{{1,0}} bitcast(%copy.1490)
}}

%fused_computation.7 (param_0.1: f32[384,1536], param_1.1: f32[]) -> f32[384,1536] {{
  %param_0.1 = f32[384,1536]{{1,0}} parameter(0)
  %param_1.1 = f32[] parameter(1)
  %broadcast.1 = f32[384,1536]{{1,0}} broadcast(%param_1.1), dimensions={{}}
  ROOT %multiply.1 = f32[384,1536]{{1,0}} multiply(%param_0.1, %broadcast.1)
}}

ENTRY %main.688 (a.1: f32[2944,1536], w.1: f32[384,1536], g.1: f32[128,23,1536], s.1: f32[]) -> (f32[2944,384], /*index=1*/f32[1536,2944]) {{
  %a.1 = f32[2944,1536]{{1,0}} parameter(0)
  %w.1 = f32[384,1536]{{1,0}} parameter(1)
  %g.1 = f32[128,23,1536]{{2,1,0}} parameter(2)
  %s.1 = f32[] parameter(3)
  %ynn_fusion.293 = f32[2944,384]{{1,0}} fusion(%a.1, %w.1), kind=kCustom, calls=%fused_computation.293, metadata={{op_name="{_BACKWARD}/mlp/wi/dot_general"}}
  %copy_bitcast_fusion.78 = f32[1536,2944]{{1,0}} fusion(%g.1), kind=kLoop, calls=%fused_computation.1428, metadata={{op_name="{_BACKWARD}/mlp/add_any"}}
  %multiply_fusion.7 = f32[384,1536]{{1,0}} fusion(%w.1, %s.1), kind=kLoop, calls=%fused_computation.7, metadata={{op_name="jit(train_step)/mul"}}
  ROOT %tuple.1 = (f32[2944,384]{{1,0}}, f32[1536,2944]{{1,0}}) tuple(%ynn_fusion.293, %copy_bitcast_fusion.78)
}}
"""


def test_step_profile_reads_kind_part_direction_and_dot_flops_from_hlo():
    hlo = HloModule(EXCERPT)
    assert hlo.kind("ynn_fusion.293") == "matmuls"
    assert hlo.dot_flops("ynn_fusion.293") == 2 * 2944 * 384 * 1536
    assert hlo.part("ynn_fusion.293") == ("combiner", "backward")
    # A fusion that only transposes and copies is data movement, whatever XLA named it.
    assert hlo.kind("copy_bitcast_fusion.78") == "data movement"
    assert hlo.dot_flops("copy_bitcast_fusion.78") == 0
    # Outside the model: the optimizer's update.
    assert hlo.kind("multiply_fusion.7") == "elementwise and reductions"
    assert hlo.part("multiply_fusion.7") == ("loss and optimizer", "update")
    # Computation headers, the entry's included, are not read as instructions of the one before.
    assert "ynn_fusion.293" not in hlo.body["fused_computation.7"]
    assert hlo.instructions("copy_bitcast_fusion.78")[1:] == [
        "param_0.2545", "transpose.1123", "copy.1490", "bitcast.1012"]


def test_step_profile_counts_the_dot_flops_of_a_freshly_compiled_function():
    m, k, n = 64, 48, 32
    fn = jax.jit(lambda x, w: jnp.tanh(x @ w))
    text = fn.lower(jnp.ones((m, k)), jnp.ones((k, n))).compile().as_text()
    hlo = HloModule(text)
    entry = hlo.body[hlo.entry]
    matmuls = [name for name in entry if hlo.kind(name) == "matmuls"]
    assert matmuls, f"no matmul found among {entry}"
    assert sum(hlo.dot_flops(name) for name in matmuls) == pytest.approx(2 * m * k * n)


def test_step_profile_sets_apart_the_dots_eigen_runs_untimed():
    t, k, n = 256, 48, 32  # a weight gradient: contraction over the tokens, which YNNPACK does not take
    fn = jax.jit(lambda x, dy, w: (jnp.einsum("tk,tn->kn", x, dy), jnp.tanh(x @ w)))
    text = fn.lower(jnp.ones((t, k)), jnp.ones((t, n)), jnp.ones((k, n))).compile().as_text()
    hlo = HloModule(text)
    assert hlo.entry and hlo.entry.startswith("main")
    library = hlo.library_dots()
    assert [hlo.dot_flops(d) for d in library] == [2 * t * k * n]
    fused = [name for name in hlo.body[hlo.entry] if hlo.kind(name) == "matmuls" and name not in library]
    assert sum(hlo.dot_flops(name) for name in fused) == pytest.approx(2 * t * k * n)  # x @ w, in a fusion
