"""Start-up cost with JAX's persistent compilation cache (`python -m sdsjax.fit --compile-cache`).

    python -m benchmarks.bench_compile_cache                  # tiny-random, configs/tiny.yaml
    python -m benchmarks.bench_compile_cache --set render_resolution=64

Runs `python -m sdsjax.fit` as a user would, one process per start, each into a fresh --out:
1. `cold`: an empty cache folder (compiles and fills it);
2. `warm`: the same run again (reads the program from the cache);
3. `changed`: a changed config (`guidance_scale`, a constant of the program) with the warm cache:
   it must compile anew, not reuse the stale program;
4. `no-cache`: `--no-compile-cache`, for reference.
Reports the fit's own `timings.compile_s` from run.json (trace, lower and compile of the step) and
the process's wall time. prompts_per_device is fixed at 1, so no automatic sizing runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent


def start(out: Path, cache: Path | None, overrides: list[str]) -> dict:
  argv = [sys.executable, "-m", "sdsjax.fit", "--model", "tiny-random"]
  argv += ["--config", str(ROOT / "configs" / "tiny.yaml"), "--prompt", "a bust of a man"]
  argv += ["--out", str(out), "--steps", "2", "--no-progress", "prompts_per_device=1"]
  argv += ["--compile-cache", str(cache)] if cache else ["--no-compile-cache"]
  argv += overrides
  t0 = time.perf_counter()
  done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if done.returncode != 0:
    raise RuntimeError(done.stderr.strip().splitlines()[-1])
  run = json.loads((out / "run.json").read_text())
  with np.load(out / run["prompts"][0]["folder"] / "params.npz") as params:
    weights = params["weights"].tobytes()
  return {"compile_s": run["timings"]["compile_s"], "process_s": wall, "params": weights}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
  parser.add_argument("--json", help="also write the JSON report here")
  args = parser.parse_args(argv)
  log = common.logger("bench_compile_cache")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = Path(tmp)
    cache = tmp / "cache"
    plan = [
      ("cold", cache, args.set),
      ("warm", cache, args.set),
      ("changed", cache, [*args.set, "guidance_scale=50"]),
      ("no-cache", None, args.set),
    ]
    rows = []
    for name, folder, overrides in plan:
      log(f"start: {name}")
      row = start(tmp / name, folder, overrides)
      rows.append({"start": name, **row})
    entries = sum(1 for p in cache.rglob("*") if p.is_file())
  same = rows[1]["params"] == rows[0]["params"]
  for row in rows:
    del row["params"]
  report = {
    **common.run_info("benchmarks.bench_compile_cache", config_overrides=args.set),
    "rows": rows,
    "cache_files": entries,
    "warm_equals_cold": same,
  }
  table = common.markdown_table(
    ["start", "compile_s (run.json)", "process wall s"],
    [[r["start"], common.fmt(r["compile_s"]), common.fmt(r["process_s"])] for r in rows],
  )
  notes = (
    f"cache files after the runs: {entries}; warm run's params.npz equals the cold one's: {same}; "
    f"on {common.cpu_name()}"
  )
  common.emit(report, [table, notes], args.json)
  return 0


if __name__ == "__main__":
  sys.exit(main())
