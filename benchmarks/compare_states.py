"""Do two checkouts of cqd_mpi give the same runs? state.h5 content and model bytes, per run.

    python benchmarks/compare_states.py record --repo CHECKOUT --work DIR --out runs.json
    python benchmarks/compare_states.py compare before.json after.json

`record` runs, with CHECKOUT's code (PYTHONPATH, one torch thread), the LLM demo at a few
generations, a run of each search method (cycleqd, qd, cma-es, nsga2) over a tiny probe
family, a CycleQD run with pipeline depth 1 and a model-store budget (members evicted and
rebuilt), a run killed (kill -9) and resumed, and the SAM demo at a few generations; then it
writes, per run, a sha256 of every state.h5 dataset and attribute and of every file under
models/ and final/ (but report.json, which holds wall times). The timing columns
(`/history/*_s`) and the attributes that describe the launch (`config`, `config_hash`,
`package_version`, `world_size`, `checksum`, and `inputs`, the digests of the experts' files,
which a checkout before #26 does not write) are left out. The tiny family and the demo models
are built once under DIR (and in DIR/cache) and reused by every later `record`, so both
checkouts read the same experts. With `--start-repo OTHER`, each probe run is started by
OTHER's code, killed (kill -9) at its 9th evaluation and resumed by CHECKOUT's: compared with
an uninterrupted run, that checks that states written by OTHER resume to the same end.
`compare` lists every entry that differs, and the entries only one side has; it exits 1 on
a difference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
SKIPPED_ATTRS = {"config", "config_hash", "package_version", "world_size", "checksum", "inputs"}
TIMINGS = {"merge_s", "transfer_s", "eval_s", "total_s"}
PROBE = "tests.runtime.probe_task:ProbeTask"
METHODS = {
    "cycleqd": {"generations": 6},
    "qd": {"method": "qd", "generations": 4},
    "cma-es": {"method": "cma-es", "generations": 5, "coefficients": {"population": 3, "sigma0": 0.3}},
    "nsga2": {"method": "nsga2", "generations": 5, "coefficients": {"population": 3}},
}


def family(work: Path) -> dict:
    """The tests' tiny family (tests/conftest.py): a random tiny Llama and three noisy copies."""
    root = work / "family"
    if not (root / "done").exists():
        code = ("import sys; from pathlib import Path; from cqd_mpi.engines.tiny import build_tiny_llama; "
                "from tests.conftest import perturbed_copy; root = Path(sys.argv[1]); "
                "base = build_tiny_llama(root / 'base', seed=0, hidden_size=32, num_layers=2, num_heads=2); "
                "[perturbed_copy(base, root / f'expert-{n}', seed=i + 1, scale=0.25) "
                "for i, n in enumerate(('alpha', 'beta', 'gamma'))]")
        subprocess.run([sys.executable, "-c", code, str(root)], check=True, env=env(REPO))
        (root / "done").write_text("")
    return {"base": root / "base", "experts": {n: root / f"expert-{n}" for n in ("alpha", "beta", "gamma")}}


def probe_config(fam: dict, run_dir: Path, qd: dict, runtime: dict | None = None) -> dict:
    return {
        "base": str(fam["base"]),
        "experts": [{"task": n, "path": str(p)} for n, p in fam["experts"].items()],
        "tasks": [{"name": n, "kind": PROBE, "settings": {"n_items": 16, "salt": n}, "batch_size": 5}
                  for n in fam["experts"]],
        "qd": {"n_bins": 4, "mutation": {"kind": "svd", "rank": 4, "w_max": 0.3}, **qd},
        "runtime": {"run_dir": str(run_dir), "seed": 3, "threads": 1, **(runtime or {})},
        "engine": {"device": "cpu", "settings": {"batch_size": 8}},
    }


def env(repo: Path, **extra) -> dict:
    out = dict(os.environ)
    out["PYTHONPATH"] = str(repo)
    out["OMP_NUM_THREADS"] = "1"
    out.pop("CQD_MPI_FAULT", None)
    out.update(extra)
    return out


def cli(repo: Path, *args, check: bool = True, **extra) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "cqd_mpi", *map(str, args)], env=env(repo, **extra),
                            capture_output=True, text=True, cwd=repo)
    if check and result.returncode != 0:
        raise SystemExit(f"cqd_mpi {' '.join(map(str, args))} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def digest_array(value) -> str:
    array = np.asarray(value)
    h = hashlib.sha256(f"{array.shape}|".encode())
    if array.dtype.kind in "OSU":
        for item in array.reshape(-1).tolist():
            data = item if isinstance(item, bytes) else str(item).encode()
            h.update(len(data).to_bytes(8, "little") + data)
    else:
        h.update(array.dtype.str.encode() + np.ascontiguousarray(array).tobytes())
    return h.hexdigest()


def digest_run(run_dir: Path) -> dict[str, str]:
    import h5py

    out: dict[str, str] = {}
    with h5py.File(run_dir / "state.h5", "r", locking=False) as f:
        def visit(group) -> None:
            for name in sorted(group.attrs):
                if not (group.name == "/" and name in SKIPPED_ATTRS):
                    out[f"state@{group.name}/{name}"] = digest_array(group.attrs[name])
            for name in sorted(group):
                item = group[name]
                if isinstance(item, h5py.Group):
                    visit(item)
                elif not (group.name == "/history" and name in TIMINGS):
                    out[f"state:{item.name}"] = digest_array(item[()])
        visit(f)
    for sub in ("models", "final"):
        root = run_dir / sub
        for path in sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []:
            if path.name != "report.json":
                out[f"{sub}/{path.relative_to(root)}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def record(args) -> int:
    repo, work = Path(args.repo).resolve(), Path(args.work).resolve()
    runs = work / f"runs-{time.strftime('%H%M%S')}"
    runs.mkdir(parents=True)
    fam = family(work)
    cache = work / "cache"
    results: dict[str, dict] = {}
    seconds: dict[str, float] = {}

    def finish(name: str, run_dir: Path, started: float) -> None:
        seconds[name] = round(time.perf_counter() - started, 1)
        results[name] = digest_run(run_dir)
        print(f"{name}: {len(results[name])} entries, {seconds[name]} s", flush=True)
        Path(args.out).write_text(json.dumps({"repo": str(repo), "runs_dir": str(runs), "seconds": seconds,
                                             "runs": results}, indent=1, sort_keys=True) + "\n")

    only = set(args.only.split(",")) if args.only else None

    def run(config: Path) -> None:
        """The run, or with --start-repo: killed (kill -9) mid-search under that checkout's code,
        then resumed from its state.h5 with this one's."""
        if args.start_repo:
            killed = cli(Path(args.start_repo).resolve(), "run", config, check=False, CQD_MPI_FAULT="eval:kill:9")
            if killed.returncode != -9:
                raise SystemExit(f"the killed run ended with {killed.returncode}:\n{killed.stderr[-2000:]}")
        cli(repo, "run", config)

    for name, qd in METHODS.items():
        if only and name not in only:
            continue
        started = time.perf_counter()
        config = runs / f"{name}.yaml"
        config.write_text(yaml.safe_dump(probe_config(fam, runs / name, qd)))
        run(config)
        finish(name, runs / name, started)
    if not only or "store" in only:
        started = time.perf_counter()
        config = runs / "store.yaml"
        config.write_text(yaml.safe_dump(probe_config(
            fam, runs / "store", {"generations": 8},
            {"pipeline_depth": 1, "model_store_bytes": "100KB", "model_store_depth": 2})))
        run(config)
        finish("store", runs / "store", started)
    if not only or "resumed" in only:
        started = time.perf_counter()
        config = runs / "resumed.yaml"
        config.write_text(yaml.safe_dump(probe_config(fam, runs / "resumed", {"generations": 6})))
        killed = cli(repo, "run", config, check=False, CQD_MPI_FAULT="eval:kill:9")
        if killed.returncode != -9:
            raise SystemExit(f"the killed run ended with {killed.returncode}:\n{killed.stderr[-2000:]}")
        cli(repo, "run", config)
        finish("resumed", runs / "resumed", started)
    for demo, generations in (("llm", args.demo_generations), ("sam", args.sam_generations)):
        if (only and demo not in only) or generations <= 0:
            continue
        started = time.perf_counter()
        cli(repo, "demo", demo, "--run-dir", runs / demo, "--generations", generations, "--cache-dir", cache)
        finish(demo, runs / demo, started)
    return 0


def compare(args) -> int:
    a, b = (json.loads(Path(p).read_text())["runs"] for p in (args.before, args.after))
    differ = False
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b:
            print(f"{name}: only in {'after' if name not in a else 'before'}")
            differ = True
            continue
        changed = sorted(k for k in set(a[name]) & set(b[name]) if a[name][k] != b[name][k])
        only_a, only_b = sorted(set(a[name]) - set(b[name])), sorted(set(b[name]) - set(a[name]))
        same = len(set(a[name]) & set(b[name])) - len(changed)
        print(f"{name}: {same} entries equal, {len(changed)} differ, {len(only_a)} only before, "
              f"{len(only_b)} only after")
        for label, keys in (("differs", changed), ("only before", only_a), ("only after", only_b)):
            for key in keys:
                print(f"  {label}: {key}")
        differ = differ or bool(changed or only_a or only_b)
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--repo", default=str(REPO), help="the checkout whose code runs (default: this one)")
    rec.add_argument("--work", required=True, help="where the family, the demo cache and the runs go")
    rec.add_argument("--out", required=True)
    rec.add_argument("--only", default=None, help="comma-separated run names (default: all)")
    rec.add_argument("--start-repo", default=None,
                     help="start each probe run with this checkout, kill it (-9) at the 9th evaluation, resume "
                          "with --repo: does a state the other code wrote resume to the same end?")
    rec.add_argument("--demo-generations", type=int, default=6)
    rec.add_argument("--sam-generations", type=int, default=4)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before")
    cmp.add_argument("after")
    args = parser.parse_args()
    return record(args) if args.command == "record" else compare(args)


if __name__ == "__main__":
    sys.exit(main())
