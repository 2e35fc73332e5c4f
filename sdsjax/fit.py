"""`python -m sdsjax.fit`: fit a morphable head to one or many text prompts with SDS.

    python -m sdsjax.fit --prompt "an old man" --prompt "a young woman" --out runs/demo
    python -m sdsjax.fit --config configs/texture.yaml --prompts-file prompts.txt guidance_scale=50

Any config field can be overridden as KEY=VALUE or --KEY VALUE (dotted for sections, e.g.
raster.sigma=1e-5); `--print-config` shows them all. Bad input exits with code 2 and one line on
stderr, before anything is written. Per prompt the run writes, under --out/<slug>/: params.npz,
head.obj (+ head.mtl and texture.png with --texture), head.glb, turntable.png, evolution.gif
and metrics.jsonl; at the top run.json and index.html (a gallery of every prompt). Checkpoints
(orbax) go to --out/checkpoints; --resume continues a stopped or killed run to the same result
as an uninterrupted one. SIGTERM and SIGINT (Ctrl-C) checkpoint and exit with 143 and 130.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from sdsjax import host_memory
from sdsjax.errors import ConfigError
from sdsjax.errors import SdsjaxError
from sdsjax.run_folder import CHECKPOINTS
from sdsjax.run_folder import RUN_JSON
from sdsjax.run_folder import RUN_SPEC
from sdsjax.text_files import check_text
from sdsjax.text_files import read_text_file

MAX_PROMPTS_FILE_BYTES = 256 * 2**20
MAX_PROMPT_CHARS = 100_000  # CLIP keeps 77 tokens; far longer text only costs tokenizer time


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are one line (ConfigError) like every other bad input."""

  def error(self, message):
    raise ConfigError(f"{message} (see python -m sdsjax.fit --help)")


def build_parser() -> argparse.ArgumentParser:
  p = _Parser(
    prog="python -m sdsjax.fit",
    description="Fit a 3D morphable head to text prompts with Score Distillation Sampling.",
    epilog="Any config field can be overridden as KEY=VALUE or --KEY VALUE (e.g. "
    "guidance_scale=50, raster.sigma=1e-5); --print-config lists them.",
  )
  p.add_argument("--prompt", action="append", default=[], help="a text prompt (repeatable)")
  p.add_argument("--prompts-file", help="a UTF-8 text file with one prompt per line ('#' comments)")
  p.add_argument("--config", help="a YAML config, e.g. configs/default.yaml")
  p.add_argument("--model", help="Stable Diffusion: a diffusers folder, a hub id, or tiny-random")
  p.add_argument(
    "--head",
    help="builtin | flame:/path/generic_model.pkl | ict:/path/FaceXModel | /path/model.npz",
  )
  p.add_argument("--steps", type=int)
  p.add_argument("--seed", type=int)
  p.add_argument("--texture", action="store_true", default=None, help="also fit a UV texture")
  p.add_argument("--out", help="output folder (required unless --print-config)")
  p.add_argument("--resume", action="store_true", help="continue the run in --out")
  p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
  p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
  p.add_argument(
    "--compile-cache",
    metavar="DIR",
    help="JAX's persistent compilation cache (default $SDSJAX_CACHE/compile, "
    "~/.cache/sdsjax/compile): later starts reuse traced and compiled programs",
  )
  p.add_argument("--no-compile-cache", action="store_true", help="compile afresh every start")
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


def flag_overrides(unknown: list[str]) -> list[str]:
  """`--key value` / `--key=value` tokens argparse did not know -> KEY=VALUE overrides."""
  overrides, i = [], 0
  while i < len(unknown):
    token = unknown[i]
    if not token.startswith("--") or token == "--":
      raise ConfigError(f"unexpected argument {token!r} (see python -m sdsjax.fit --help)")
    if "=" in token:
      overrides.append(token[2:])
    elif i + 1 < len(unknown) and not unknown[i + 1].startswith("--"):
      overrides.append(f"{token[2:]}={unknown[i + 1]}")
      i += 1
    else:
      raise ConfigError(f"unknown flag {token} (a config override needs a value: {token}=VALUE)")
    i += 1
  return overrides


def join_config_flags(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
  """`--key value` of a config field -> `key=value`, before argparse sees it.

  argparse would otherwise take the value for a positional override wherever the flag stands
  (`--negative-prompt 1.5` at the end of a line lost its value). Options of the parser itself,
  and unique prefixes of them, are left alone.
  """
  options = [o for action in parser._actions for o in action.option_strings]
  joined, i = [], 0
  while i < len(argv):
    token = argv[i]
    if token == "--":
      joined += argv[i:]
      break
    name = token.split("=", 1)[0]
    is_option = any(o.startswith(name) for o in options)
    if token.startswith("--") and len(token) > 2 and not is_option:
      if "=" in token:
        joined.append(token[2:])
      elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        joined.append(f"{token[2:]}={argv[i + 1]}")
        i += 1
      else:
        joined.append(token)  # no value: flag_overrides says so
    else:
      joined.append(token)
    i += 1
  return joined


def parse_args(argv):
  """argparse plus `--key value` overrides of config fields; returns (args, overrides)."""
  parser = build_parser()
  args, unknown = parser.parse_known_intermixed_args(join_config_flags(parser, list(argv)))
  overrides: list = [*args.overrides, *flag_overrides(unknown)]
  for name in ("model", "head", "steps", "seed", "texture"):
    value = getattr(args, name)
    if value is not None:
      overrides.append({name: value})
  return args, overrides


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    text = read_text_file(args.prompts_file, "--prompts-file", MAX_PROMPTS_FILE_BYTES)
    prompts += [
      line.strip()
      for line in text.splitlines()
      if line.strip() and not line.lstrip().startswith("#")
    ]
  if not prompts:
    raise ConfigError("no prompt given: pass --prompt TEXT (repeatable) or --prompts-file FILE")
  for i, p in enumerate(prompts, 1):
    if not p.strip():
      raise ConfigError("empty prompt: every --prompt needs some text")
    check_text(p, f"prompt {i}", MAX_PROMPT_CHARS)
  return [p.strip() for p in prompts]


def check_out_dir(out_arg: str | None, resume: bool, overwrite: bool) -> Path:
  """Fails before any work if --out cannot be written or would clobber another run."""
  if out_arg is None:
    raise ConfigError("--out is required: the folder the run writes to")
  if not out_arg.strip():
    raise ConfigError("--out is empty: give the folder the run writes to")
  if resume and overwrite:
    raise ConfigError(
      "--resume and --overwrite contradict each other: --overwrite would delete the run "
      "--resume continues"
    )
  if "\0" in out_arg:
    raise ConfigError("--out contains a NUL character: give a folder name without it")
  out = Path(out_arg).expanduser()
  # Names no filesystem takes (ENAMETOOLONG), which even exists() would raise on.
  for part in out.parts:
    if len(os.fsencode(part)) > 255:
      raise ConfigError(
        f"--out: the folder name {part[:40]!r}... is too long ({len(os.fsencode(part))} bytes, "
        "at most 255): choose a shorter one"
      )
  if len(os.fsencode(str(out.absolute()))) >= 4096:
    raise ConfigError("--out is too long a path (4096 bytes or more): choose a shorter one")
  if out.exists() and not out.is_dir():
    raise ConfigError(f"--out {out} exists and is not a folder")
  probe = out.absolute()
  while not probe.exists():
    if probe.is_symlink():
      raise ConfigError(f"--out {out}: {probe} is a broken symbolic link: fix or remove it")
    probe = probe.parent
  if not probe.is_dir():
    raise ConfigError(f"--out {out} is not writable ({probe} is not a folder)")
  # Permission bits lie on special filesystems (/proc, /sys, read-only mounts): really try.
  try:
    Path(tempfile.mkdtemp(prefix=".sdsjax-probe-", dir=probe)).rmdir()
  except OSError as e:
    raise ConfigError(
      f"--out {out} is not writable (cannot create anything in {probe}: {e.strerror})"
    ) from None
  has_run = (out / CHECKPOINTS).exists() or (out / RUN_JSON).exists()
  if resume and not (out / CHECKPOINTS / RUN_SPEC).is_file():
    raise ConfigError(
      f"--resume: no run to resume in {out} (no {CHECKPOINTS}/{RUN_SPEC}; a run stopped before "
      "it saved anything): run again without --resume"
    )
  ours = (out / CHECKPOINTS / RUN_SPEC).is_file() or (out / RUN_JSON).is_file()
  if (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).iterdir()) and not ours:
    # --overwrite would delete it, and a run would mix its checkpoints with the user's.
    raise ConfigError(
      f"--out {out} holds a checkpoints/ folder that is not an sdsjax run's: choose another "
      "folder for the run"
    )
  if has_run and not resume and not overwrite:
    raise ConfigError(
      f"--out {out} already holds a run: pass --resume to continue it, "
      "--overwrite to replace it, or choose another folder"
    )
  return out


def read_run_spec(out: Path) -> dict:
  path = out / CHECKPOINTS / RUN_SPEC
  try:
    spec = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError) as e:
    raise ConfigError(
      f"--resume: {path} is damaged ({type(e).__name__}); the run cannot be resumed: "
      "start over with --overwrite"
    ) from None
  if not (
    isinstance(spec, dict)
    and isinstance(spec.get("prompts"), list)
    and spec["prompts"]
    and all(isinstance(p, str) and p.strip() for p in spec["prompts"])
    and isinstance(spec.get("config"), dict)
  ):
    raise ConfigError(f"--resume: {path} is not a run spec; start over with --overwrite")
  return spec


def setup_compile_cache(args) -> Path | None:
  """JAX's persistent compilation cache, so the same program compiles once, not every start.
  Returns the folder of saved step programs (`sdsjax.program_cache`) inside it, or None.

  JAX's key covers the program's HLO (shapes, the head model's constants), the compile
  options and the JAX/XLA versions, so a changed config or model compiles anew.
  """
  if args.no_compile_cache:
    return None
  folder = args.compile_cache or os.path.join(
    os.environ.get("SDSJAX_CACHE") or os.path.expanduser("~/.cache/sdsjax"), "compile"
  )
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    if args.compile_cache:
      raise ConfigError(f"--compile-cache {folder} cannot be created ({e.strerror})") from None
    return None  # the default place is not writable: run without a cache
  import jax

  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return Path(folder) / "programs"


def init_distributed(args) -> None:
  import jax

  try:
    jax.distributed.initialize(
      coordinator_address=args.coordinator_address,
      num_processes=args.num_processes,
      process_id=args.process_id,
      initialization_timeout=int(os.environ.get("SDSJAX_DISTRIBUTED_TIMEOUT", "300")),
    )
  except Exception as e:  # jax raises ValueError/RuntimeError/XlaRuntimeError with long texts
    reason = " ".join(str(e).split())[:200]
    raise ConfigError(
      f"--distributed: no cluster to join ({type(e).__name__}: {reason}); on one machine drop "
      "--distributed, elsewhere pass --coordinator-address/--num-processes/--process-id"
    ) from None


def main(argv=None) -> int:
  from sdsjax import fit_run

  try:
    return run(sys.argv[1:] if argv is None else argv)
  except SdsjaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except fit_run.Interrupted as e:
    print(str(e), file=sys.stderr)
    return e.code
  except KeyboardInterrupt:
    print("interrupted: continue with the same command plus --resume", file=sys.stderr)
    return 130


def run(argv) -> int:
  from sdsjax import config as config_lib

  args, overrides = parse_args(argv)
  if args.print_config:
    from omegaconf import OmegaConf

    cfg = config_lib.load_config(args.config, overrides)
    print(OmegaConf.to_yaml(config_lib.to_dict(cfg)), end="")
    return 0
  out = check_out_dir(args.out, args.resume, args.overwrite)
  if args.resume:
    # The run's own prompts and config, so the resumed run is the same run.
    spec = read_run_spec(out)
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
  programs = setup_compile_cache(args)
  if args.distributed or args.coordinator_address:
    init_distributed(args)
  from sdsjax import fit_run

  return fit_run.fit(
    cfg,
    prompts,
    out,
    resume=args.resume,
    overwrite=args.overwrite,
    progress=not args.no_progress,
    program_cache=programs,
  )


if __name__ == "__main__":
  sys.exit(main())
