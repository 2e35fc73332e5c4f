"""`python -m sdsjax.fit`: fit a morphable head to one or many text prompts with SDS.

    python -m sdsjax.fit --prompt "an old man" --prompt "a young woman" --out runs/demo
    python -m sdsjax.fit --config configs/texture.yaml --prompts-file prompts.txt guidance_scale=50

Any config field can be overridden as KEY=VALUE or --KEY=VALUE (dotted for sections,
e.g. raster.sigma=1e-5). Bad input exits with code 2 and one line on stderr, before anything
is written. Per prompt the run writes, under --out/<slug>/: params.npz, head.obj (+ head.mtl and
texture.png with --texture), head.glb, turntable.png, evolution.gif and metrics.jsonl; and
run.json at the top. Checkpoints (orbax) go to --out/checkpoints; --resume continues a killed
run to the same result as an uninterrupted one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from sdsjax import host_memory
from sdsjax.errors import ConfigError
from sdsjax.errors import SdsjaxError

RUN_SPEC = "run_spec.json"


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line (ConfigError) like every other bad input."""

  def error(self, message):
    raise ConfigError(f"{message} (see python -m sdsjax.fit --help)")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m sdsjax.fit",
    description="Fit a 3D morphable head to text prompts with Score Distillation Sampling.",
    epilog="Any config field can be overridden as KEY=VALUE (e.g. guidance_scale=50, "
    "raster.sigma=1e-5). See configs/default.yaml for the fields.",
  )
  p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
  p.add_argument("--prompts-file", help="a text file with one prompt per line")
  p.add_argument("--config", help="a YAML config, e.g. configs/default.yaml")
  p.add_argument("--model", help="Stable Diffusion: a diffusers folder, a hub id, or tiny-random")
  p.add_argument("--head", help="builtin | flame:/path/generic_model.pkl | /path/model.npz")
  p.add_argument("--steps", type=int)
  p.add_argument("--seed", type=int)
  p.add_argument("--texture", action="store_true", default=None, help="also fit a UV texture")
  p.add_argument("--out", required=True, help="output folder")
  p.add_argument("--resume", action="store_true", help="continue the run in --out")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
  p.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first (multi-host TPU pods, GPU clusters); "
    "on TPU pods the flags below are detected automatically",
  )
  p.add_argument("--coordinator-address", help="HOST:PORT of process 0 (implies --distributed)")
  p.add_argument(
    "--num-processes", type=int, help="number of processes (with --coordinator-address)"
  )
  p.add_argument("--process-id", type=int, help="this process's index (with --coordinator-address)")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
  return p


def parse_args(argv):
  """argparse plus `--key=value` / `--key value` overrides of config fields."""
  parser = build_parser()
  known = {flag for action in parser._actions for flag in action.option_strings}
  takes_value = {
    flag for action in parser._actions for flag in action.option_strings if action.nargs != 0
  }
  # Unknown --key [=] value pairs become KEY=VALUE overrides before argparse sees them.
  rewritten, i = [], 0
  while i < len(argv):
    token = argv[i]
    flag = token.split("=", 1)[0]
    if token.startswith("--") and flag not in known:
      if "=" in token:
        rewritten.append(token[2:])
      elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        rewritten.append(f"{token[2:]}={argv[i + 1]}")
        i += 1
      else:
        raise ConfigError(f"unknown flag {token} (a config override needs a value: {token}=VALUE)")
    else:
      rewritten.append(token)
      if token in takes_value and i + 1 < len(argv):
        rewritten.append(argv[i + 1])  # a flag's value is never an override
        i += 1
    i += 1
  args = parser.parse_intermixed_args(rewritten)
  overrides: list = list(args.overrides)
  for name in ("model", "head", "steps", "seed", "texture"):
    value = getattr(args, name)
    if value is not None:
      overrides.append({name: value})
  return args, overrides


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    try:
      text = Path(args.prompts_file).read_text()
    except OSError as e:
      raise ConfigError(f"cannot read --prompts-file {args.prompts_file}: {e.strerror}") from None
    prompts += [
      line.strip()
      for line in text.splitlines()
      if line.strip() and not line.lstrip().startswith("#")
    ]
  if not prompts:
    raise ConfigError("no prompt given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
  for p in prompts:
    if not p.strip():
      raise ConfigError("empty prompt: every --prompt needs some text")
  return [p.strip() for p in prompts]


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
  """Fails before any work if --out cannot be written or would clobber another run."""
  if out.exists() and not out.is_dir():
    raise ConfigError(f"--out {out} exists and is not a folder")
  probe = out
  while not probe.exists():
    probe = probe.parent
  if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
    raise ConfigError(f"--out {out} is not writable (no write permission on {probe})")
  has_run = (out / "checkpoints").exists() or (out / "run.json").exists()
  if resume and not (out / "checkpoints" / RUN_SPEC).exists():
    raise ConfigError(f"--resume: no run to resume in {out} (no checkpoints/{RUN_SPEC})")
  if has_run and not resume and not overwrite:
    raise ConfigError(
      f"--out {out} already holds a run: pass --resume to continue it, "
      "--overwrite to replace it, or choose another folder"
    )


def main(argv=None) -> int:
  try:
    return run(sys.argv[1:] if argv is None else argv)
  except SdsjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("interrupted: continue with the same command plus --resume", file=sys.stderr)
    return 130


def run(argv) -> int:
  from sdsjax import config as config_lib

  args, overrides = parse_args(argv)
  out = Path(args.out)
  check_out_dir(out, args.resume, args.overwrite)
  spec_path = out / "checkpoints" / RUN_SPEC
  if args.resume:
    # The run's own prompts and config, so the resumed run is the same run.
    spec = json.loads(spec_path.read_text())
    given = read_prompts(args) if (args.prompt or args.prompts_file) else spec["prompts"]
    cfg = config_lib.load_config(None, [spec["config"]])
    if given != spec["prompts"]:
      raise ConfigError(
        "--resume: the prompts differ from the run being resumed; omit them or pass the same ones"
      )
    if args.config or overrides:
      requested = config_lib.load_config(args.config, [spec["config"], *overrides])
      if config_lib.to_dict(requested) != spec["config"]:
        raise ConfigError("--resume: the config differs from the run being resumed")
    prompts = spec["prompts"]
  else:
    prompts = read_prompts(args)
    cfg = config_lib.load_config(args.config, overrides)

  # Before JAX's first computation: see host_memory for why (a third of a CPU step).
  host_memory.keep_freed_memory()
  if args.distributed or args.coordinator_address:
    import jax

    jax.distributed.initialize(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
    )
  from sdsjax import fit_run

  return fit_run.fit(
    cfg, prompts, out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
  )


if __name__ == "__main__":
  sys.exit(main())
