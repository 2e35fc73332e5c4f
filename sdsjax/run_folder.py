"""Names inside a run's `--out` folder.

The CLI checks these before it imports jax (`sdsjax.fit`) and the run writes them
(`sdsjax.fit_run`), so they live in a module that imports nothing.
"""

CHECKPOINTS = "checkpoints"  # the run's resumable state; no prompt's folder takes this name
RUN_SPEC = "run_spec.json"  # in CHECKPOINTS: the prompts and config the run was started with
RUN_JSON = "run.json"  # each prompt's status and folder, and the outputs: the gallery's index
