"""The saved step programs (`sdsjax.program_cache`): a later start compiles without tracing, gives
bitwise the traced program's results, and never reuses a program for other inputs."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sdsjax import program_cache


@flax.struct.dataclass
class State:
  params: dict
  opt_state: optax.OptState


def make_step(scale: float, traces: list):
  optimizer = optax.adam(0.1)

  def step(state: State, x):
    traces.append(1)  # runs once per trace, never when the saved program is used
    grads = jax.tree.map(lambda p: scale * jnp.sin(p * x.sum()), state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return State(params, opt_state), {"norm": optax.tree.norm(grads)}

  def init():
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    return State(params, optimizer.init(params))

  return jax.jit(step, donate_argnums=(0,)), init


def run(program, init, x, steps=3):
  state, history = init(), []
  for _ in range(steps):
    state, metrics = program(state, x)
    history.append(float(metrics["norm"]))
  return jax.tree.map(np.asarray, state), history


def test_second_compile_reads_the_saved_program_and_matches(tmp_path):
  traces = []
  step, init = make_step(2.0, traces)
  x = jnp.linspace(0.0, 1.0, 4)
  first = program_cache.compile_step(step, (init(), x), {"scale": 2.0}, tmp_path)
  assert len(traces) == 1 and len(list(tmp_path.glob("*" + program_cache.SUFFIX))) == 1
  later_step, _ = make_step(2.0, traces)  # as a later start builds it: a new function
  again = program_cache.compile_step(later_step, (init(), x), {"scale": 2.0}, tmp_path)
  assert len(traces) == 1, "the saved program was traced again"
  plain = step.lower(init(), x).compile()
  want_state, want_history = run(plain, init, x)
  for program in (first, again):
    state, history = run(program, init, x)
    assert history == want_history
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(want_state)):
      np.testing.assert_array_equal(got, want)
  assert again.memory_analysis() is not None


def test_other_identity_shapes_or_a_damaged_file_are_traced_anew(tmp_path):
  """Each call builds a new step, so JAX's in-memory trace cache cannot hide a trace."""
  traces = []
  x = jnp.ones(4)

  def compile_new(identity, x):
    step, init = make_step(2.0, traces)
    return program_cache.compile_step(step, (init(), x), identity, tmp_path), step, init

  compile_new({"scale": 2.0}, x)
  compile_new({"scale": 3.0}, x)  # another config
  compile_new({"scale": 2.0}, jnp.ones(5))  # other shapes
  assert len(traces) == 3 and len(list(tmp_path.glob("*" + program_cache.SUFFIX))) == 3
  compile_new({"scale": 2.0}, x)
  assert len(traces) == 3
  for path in tmp_path.glob("*" + program_cache.SUFFIX):
    path.write_bytes(b"not a program")
  program, step, init = compile_new({"scale": 2.0}, x)
  assert len(traces) == 4
  assert run(program, init, x)[1] == run(step.lower(init(), x).compile(), init, x)[1]
  compile_new({"scale": 2.0}, x)  # the damaged file was replaced by a good one
  assert len(traces) == 4
  # A readable program that does not fit the arguments (here: another shape's) is made again.
  path = tmp_path / (
    program_cache.program_key({"scale": 2.0}, (make_step(2.0, [])[1](), x)) + program_cache.SUFFIX
  )
  other_step, other_init = make_step(2.0, [])
  program_cache.compile_step(other_step, (other_init(), jnp.ones(7)), {"other": 1}, tmp_path)
  newest = max(tmp_path.glob("*" + program_cache.SUFFIX), key=lambda q: q.stat().st_mtime)
  path.write_bytes(newest.read_bytes())
  program, step, init = compile_new({"scale": 2.0}, x)
  assert len(traces) == 5
  assert run(program, init, x)[1] == run(step.lower(init(), x).compile(), init, x)[1]


def test_no_folder_or_a_wrapped_step_compiles_plainly(tmp_path):
  traces = []
  step, init = make_step(2.0, traces)
  x = jnp.ones(4)
  program_cache.compile_step(step, (init(), x), {}, None)

  class Wrapped:  # no .trace: e.g. a test's instrumented step
    def lower(self, *args):
      return step.lower(*args)

  program_cache.compile_step(Wrapped(), (init(), x), {}, tmp_path)
  assert not list(tmp_path.iterdir())


def test_key_covers_the_source_and_the_arrays():
  a = program_cache.array_digest({"x": np.zeros(3)})
  assert a != program_cache.array_digest({"x": np.zeros(4)})
  assert a != program_cache.array_digest({"y": np.zeros(3)})
  assert a != program_cache.array_digest({"x": np.ones(3)})
  assert len(program_cache.source_digest()) == 64
