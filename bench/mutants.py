"""Does the test suite catch real mistakes? Semantic mutants of the core, one at a time.

Copies the tree to a temporary directory, then for each mutation replaces one exact piece of
text in one file of the copy (the text must occur exactly once), runs the test files the mutation
names with this Python against the copy, and restores the file. A mutant is caught when a test
fails (or errors). Before that: the unmutated copy must pass every named test file, a sanity
mutant that breaks the core's import must be caught, and the copy's packages must be the ones
imported (the project is installed editable from its own checkout, so the copy is put first on
PYTHONPATH and its package-dir mappings are linked in as the installed finder maps them).
A mutation whose file or text is absent is skipped with a note (e.g. code that has not landed
yet). Not part of CI: it takes minutes.

    python bench/mutants.py [--only NAME_SUBSTRING] [--keep]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", ".ruff_cache", "*.egg-info", "results"
)

ORACLE = ("tests/test_costmodel_oracle.py",)
CODEC = ("tests/test_wire_spec.py", "tests/test_wire.py")
CALIBRATION = ("tests/test_calibration.py",)


@dataclass(frozen=True)
class Mutation:
    """Replace `find` (which must occur exactly once in `path`) by `replace`; run `tests`."""

    name: str
    path: str
    find: str
    replace: str
    tests: tuple[str, ...]


MUTATIONS: tuple[Mutation, ...] = (
    Mutation(
        "device load factor 1/(1-l) -> 1+l",
        "dapdee/costmodel.py",
        "return (1.0 / (1.0 - cond.device_load), uplink_ms(",
        "return (1.0 + cond.device_load, uplink_ms(",
        ORACLE,
    ),
    Mutation(
        "edge load ignored",
        "dapdee/costmodel.py",
        "cond.bandwidth_mbps), 1.0 / (1.0 - cond.edge_load))",
        "cond.bandwidth_mbps), 1.0)",
        ORACLE,
    ),
    Mutation(
        "uplink bytes*8 -> bytes*7",
        "dapdee/costmodel.py",
        "return sent_bytes * 8.0 / (bandwidth_mbps * 1000.0)",
        "return sent_bytes * 7.0 / (bandwidth_mbps * 1000.0)",
        ORACLE,
    ),
    Mutation(
        "rtt charged when E is empty",
        "dapdee/costmodel.py",
        "return device_ms + (uplink_ms + uses_edge * rtt_ms) + edge_ms",
        "return device_ms + (uplink_ms + rtt_ms) + edge_ms",
        ORACLE,
    ),
    Mutation(
        "bottleneck max -> sum (prediction)",
        "dapdee/costmodel.py",
        "bottleneck = max(device_ms, uplink_ms, edge_ms)",
        "bottleneck = device_ms + uplink_ms + edge_ms",
        ORACLE,
    ),
    Mutation(
        "bottleneck max -> sum (plan-map scan, small fronts)",
        "dapdee/planning/planmap.py",
        "max(d * wd, b * wb, e * we) if allowed is None or allowed[i] else np.inf",
        "(d * wd + b * wb + e * we) if allowed is None or allowed[i] else np.inf",
        ORACLE,
    ),
    Mutation(
        "bottleneck max -> sum (plan-map scan, vectorised)",
        "dapdee/planning/planmap.py",
        "return np.maximum(np.maximum(d * wd, b * wb), e * we)",
        "return d * wd + b * wb + e * we",
        ("tests/test_planning.py",),
    ),
    Mutation(
        "multi-consumer producer sent per consumer (partition)",
        "dapdee/costmodel.py",
        "transfer.append((u, graph.input.bytes if u == graph.input.name else graph.node(u).out_bytes))",
        "transfer.extend([(u, graph.input.bytes if u == graph.input.name else graph.node(u).out_bytes)]"
        " * len(readers))",
        ORACLE,
    ),
    Mutation(
        "multi-consumer producer sent per consumer (plan map)",
        "dapdee/planning/planmap.py",
        "sent += crossing[:, i] * st.out[i]",
        "sent += on[:, i] * sum(~on[:, c] for c in st.cons[i]) * st.out[i]",
        ORACLE,
    ),
    Mutation(
        "input bytes not counted (partition)",
        "dapdee/costmodel.py",
        "for u in [graph.input.name, *[n for n in needed if n in dev]]:",
        "for u in [n for n in needed if n in dev]:",
        ORACLE,
    ),
    Mutation(
        "input bytes not counted (plan map)",
        "dapdee/planning/planmap.py",
        "sent += ~_all_in(words, [st.input_cons_mask], 1)[:, 0] * st.input_bytes",
        "sent += 0 * st.input_bytes",
        ORACLE,
    ),
    Mutation(
        "inverse search walks shallow-first",
        "dapdee/planning/planmap.py",
        "order = sorted(exit_indices, reverse=True)",
        "order = sorted(exit_indices)",
        ORACLE,
    ),
    Mutation(
        "auto switch fps >= rate -> >",
        "dapdee/planning/planmap.py",
        "c.pred.throughput_fps >= req.frame_rate:",
        "c.pred.throughput_fps > req.frame_rate:",
        ORACLE,
    ),
    Mutation(
        "latency budget met only strictly",
        "dapdee/planning/planmap.py",
        "pred.latency_ms <= req.latency_budget_ms",
        "pred.latency_ms < req.latency_budget_ms",
        ORACLE,
    ),
    Mutation(
        "frame rate met only strictly",
        "dapdee/planning/planmap.py",
        "pred.bottleneck_ms <= 1000.0 / req.frame_rate",
        "pred.bottleneck_ms < 1000.0 / req.frame_rate",
        ORACLE,
    ),
    Mutation(
        "codec decodes FP32 big-endian",
        "dapdee/wire.py",
        '"FP32": (torch.float32, np.dtype("<f4")),',
        '"FP32": (torch.float32, np.dtype(">f4")),',
        CODEC,
    ),
    Mutation(
        "codec encodes big-endian",
        "dapdee/wire.py",
        'return memoryview(a.astype(a.dtype.newbyteorder("<"), copy=False)).cast("B")',
        'return memoryview(a.astype(a.dtype.newbyteorder(">"), copy=False)).cast("B")',
        CODEC,
    ),
    Mutation(
        "confidence >= -> > (is_confident)",
        "dapdee/training/confidence.py",
        "(confidence(logits.reshape(-1)) >= threshold)",
        "(confidence(logits.reshape(-1)) > threshold)",
        CALIBRATION,
    ),
    Mutation(
        "confidence >= -> > (first_confident_exit)",
        "dapdee/training/confidence.py",
        "(confidence(logits[k].reshape(n, -1)) >= t)",
        "(confidence(logits[k].reshape(n, -1)) > t)",
        CALIBRATION,
    ),
    Mutation(
        "confidence >= -> > (calibration's policy_stats)",
        "dapdee/training/confidence.py",
        "hit = undecided & (conf[k] >= thresholds[k])",
        "hit = undecided & (conf[k] > thresholds[k])",
        CALIBRATION,
    ),
    # Lease admission (DESIGN "The shared edge: leases"): an edge plan is admissible only if
    # Σ f·e <= ρ_max·C. Both the per-request choice and the rebalance keep that limit.
    Mutation(
        "lease admission ignores rho_max (assign)",
        "dapdee/fleet/assign.py",
        "f * e_i, rho_max * slot.capacity_ms_per_s)",
        "f * e_i, slot.capacity_ms_per_s)",
        ("tests/test_fleet_assign.py",),
    ),
    Mutation(
        "lease admission ignores rho_max (rebalance)",
        "dapdee/fleet/rebalance.py",
        "stated = rho_max * capacity_ms_per_s if",
        "stated = capacity_ms_per_s if",
        ("tests/test_fleet_rebalance.py",),
    ),
    # Rebalance objective: f·accuracy sums must be exact, or float noise outranks the held plans'
    # switching credit and like devices swap at every rebalance.
    Mutation(
        "rebalance accuracy term unrounded",
        "dapdee/fleet/rebalance.py",
        "return round(frames_per_s * (accuracy or 0.0) / ACCURACY_QUANTUM) * ACCURACY_QUANTUM",
        "return frames_per_s * (accuracy or 0.0)",
        ("tests/test_fleet_rebalance.py",),
    ),
    # A worker's reservations stay within ρ_max x the capacity its last heartbeat states, checked
    # in Redis (a replica's view may be older), and a rebalance that solved for more capacity
    # than the worker has now solves again.
    Mutation(
        "leases ignore the registry's capacity",
        "services/planner/leases.py",
        "  return math.min(limit, rho * capacity), string.format",
        "  return limit, string.format",
        ("tests/test_leases.py", "tests/test_fleet_service.py"),
    ),
    # Admission reads a worker's total kept beside its reservations: every write keeps it.
    Mutation(
        "a freed reservation stays in its worker's total",
        "services/planner/leases.py",
        "local delta = (load and tonumber(load) or 0) - (old and tonumber(old) or 0)",
        "local delta = load and tonumber(load) or 0",
        ("tests/test_leases.py",),
    ),
    Mutation(
        "expired reservations stay in their worker's total",
        "services/planner/leases.py",
        "  redis.call('DEL', prefix .. ':wsum:' .. worker)\nend",
        "end",
        ("tests/test_leases.py",),
    ),
    Mutation(
        "a worker's total is never summed again",
        "services/planner/leases.py",
        "if t[1] and tonumber(t[2]) < RESUM then",
        "if t[1] then",
        ("tests/test_leases.py",),
    ),
    Mutation(
        "a worker without reservations keeps a total",
        "services/planner/leases.py",
        "  if #vals > 0 then  -- a worker without reservations keeps no total",
        "  if true then  -- a worker without reservations keeps no total",
        ("tests/test_leases.py",),
    ),
    Mutation(
        "rebalance never solves again for a lower capacity",
        "services/planner/rebalancing.py",
        "CAPACITY_RETRIES = 3",
        "CAPACITY_RETRIES = 1",
        ("tests/test_fleet_service.py",),
    ),
    # A heartbeat refused for its capacity keeps its worker live and leaves that capacity
    # pending: admission books within it, and only its re-solve applies.
    Mutation(
        "a refused heartbeat lets its worker expire",
        "services/planner/workers.py",
        "    if tonumber(known) < now + ttl then redis.call('ZADD', KEYS[1], now + ttl, url) end\n",
        "",
        ("tests/test_leases.py",),
    ),
    Mutation(
        "admission ignores a refused capacity pending",
        "services/planner/leases.py",
        "  if pending and (not capacity or pending.capacity < capacity) then capacity = pending.capacity end",
        "",
        ("tests/test_leases.py",),
    ),
    Mutation(
        "a rebalance applies over a capacity drop being re-solved",
        "services/planner/leases.py",
        "  return {0, capacity}  -- solved for a capacity",
        "  local _ = {0, capacity}  -- solved for a capacity",
        ("tests/test_leases.py",),
    ),
    Mutation(
        "a rebalance after a capacity drop gives up while the lock is held",
        "services/planner/rebalancing.py",
        "                if await self.rebalance_if_leader() is not None:\n                    return",
        "                await self.rebalance_if_leader()\n                return",
        ("tests/test_fleet_service.py",),
    ),
    # The exact rebalance drops only the states whose LP bound cannot reach a known answer.
    Mutation(
        "the rebalance's LP bound undercounts what the other devices add",
        "dapdee/fleet/bounds.py",
        "out[:, c] = self.base_value[c] + np.interp(",
        "out[:, c] = self.base_value[c] + 0.5 * np.interp(",
        ("tests/test_fleet_bounds.py", "tests/test_fleet_rebalance.py"),
    ),
    Mutation(
        "the rebalance's bounds ignore the room a state leaves",
        "dapdee/fleet/rebalance.py",
        "bound = rest.upper(limit - layer.load)",
        "bound = rest.upper(limit + 0 * layer.load)",
        ("tests/test_fleet_bounds.py",),
    ),
    Mutation(
        "the accuracy bound rounds up past a quantum",
        "dapdee/fleet/rebalance.py",
        "acc = np.floor((upper[:, 1] + 1e-9) / ACCURACY_QUANTUM)",
        "acc = np.floor((upper[:, 1] + 1e-6) / ACCURACY_QUANTUM)",
        ("tests/test_fleet_bounds.py",),
    ),
    # A worker's capacity compares what its requests take (slot + event loop) with what leases
    # book for them (nodes + request cost), and its own start-up requests do not count.
    Mutation(
        "the capacity meter times the compute slot only",
        "services/edge_worker/app.py",
        "outside=thread_cpu_clock(),",
        "outside=None,",
        ("tests/test_edge_capacity.py",),
    ),
    Mutation(
        "the worker's start-up requests count in its capacity",
        "services/edge_worker/registration.py",
        "    state.capacity.reset()",
        "    pass",
        ("tests/test_request_cost.py",),
    ),
    Mutation(
        "a rebalance deletes the lock whoever holds it",
        "services/planner/redis_lock.py",
        "if redis.call('GET', KEYS[1]) == ARGV[1] then",
        "if true then",
        ("tests/test_fleet_service.py",),
    ),
    # The device's per-request CPU: a busy burst next to the probe pairs.
    Mutation(
        "the busy burst's CPU is not divided among its requests",
        "clients/device/probe.py",
        "return max(0.0, (cpu_ms - per_byte * sum(sizes)) / len(sizes))",
        "return max(0.0, cpu_ms - per_byte * sum(sizes))",
        ("tests/test_device_request_cost.py",),
    ),
    Mutation(
        "start-up keeps the probe pairs' figure over a busy burst's lower one",
        "clients/device/probe.py",
        "cost = min((c for c in costs if c is not None), default=None)",
        "cost = next((c for c in costs if c is not None), None)",
        ("tests/test_device_request_cost.py",),
    ),
    Mutation(
        "a failed burst request leaves the others sending",
        "services/web/tasks.py",
        "            if not task.done():\n                await stop_task(task, retry_s)",
        "            pass",
        ("tests/test_web_tasks.py", "tests/test_device_request_cost.py"),
    ),
    # Planning off the event loop: a plan that needs min-cuts runs in a plan thread.
    Mutation(
        "min-cut plans run on the event loop",
        "services/planner/plan_runner.py",
        "fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)",
        "fut = asyncio.get_running_loop().create_future()\n        fut.set_result(fn(*args))",
        ("tests/test_planner_api.py",),
    ),
)

SANITY = Mutation(
    "sanity: the core fails to import",
    "dapdee/costmodel.py",
    "from __future__ import annotations\n",
    "from __future__ import annotations\n\nraise ImportError('bench/mutants.py sanity mutant')\n",
    ORACLE + CODEC + CALIBRATION,
)


@dataclass
class Outcome:
    mutation: Mutation
    status: str  # caught | SURVIVED | skipped | error
    detail: str
    seconds: float


def make_copy(dest: Path) -> Path:
    """Copy the tree and link each package-dir mapping of pyproject.toml into the copy's `dapdee`
    package (as the installed editable finder maps them), so the copy's code is what is imported."""
    root = dest / "repo"
    shutil.copytree(REPO, root, ignore=IGNORE, symlinks=True)
    section = (root / "pyproject.toml").read_text().split("[tool.setuptools.package-dir]", 1)[-1].split("\n[", 1)[0]
    for pkg, folder in re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', section, re.M):
        parts = pkg.split(".")
        if parts[0] != "dapdee" or len(parts) != 2:
            continue
        link = root / "dapdee" / parts[1]
        if not link.exists():
            link.symlink_to(root / folder, target_is_directory=True)
    return root


def environment(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def check_imports(root: Path) -> None:
    """Refuse to go on unless the core, the services and the tests resolve inside the copy."""
    code = (
        "import dapdee.costmodel, dapdee.wire, dapdee.planner.app, dapdee.web.server_thread, tests.oracle\n"
        "for m in (dapdee.costmodel, dapdee.wire, dapdee.planner.app, dapdee.web.server_thread, tests.oracle):\n"
        "    print(m.__file__)\n"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=environment(root), capture_output=True, text=True, timeout=120
    )
    if p.returncode != 0:
        raise SystemExit(f"cannot import from the copy:\n{p.stderr[-2000:]}")
    outside = [f for f in p.stdout.split() if not Path(f).resolve().is_relative_to(root.resolve())]
    if outside:
        raise SystemExit(f"modules imported from outside the copy {root}: {outside}")


def run_tests(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(root), *tests]
    p = subprocess.run(cmd, cwd=root, env=environment(root), capture_output=True, text=True, timeout=900)
    return p.returncode, p.stdout + p.stderr


def first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" - ")[0][:100]
    m = re.search(r"^E\s+(.*)$", output, re.M)
    return m.group(1)[:100] if m else output.strip().splitlines()[-1][:100] if output.strip() else ""


def apply(root: Path, mut: Mutation) -> tuple[Path, str] | str:
    """Patch the copy; returns (file, original text), or why it cannot be applied."""
    target = root / mut.path
    if not target.is_file():
        return f"{mut.path} does not exist"
    text = target.read_text()
    n = text.count(mut.find)
    if n != 1:
        return f"target text found {n} times in {mut.path} (need exactly 1)"
    target.write_text(text.replace(mut.find, mut.replace))
    return target, text


def try_mutant(root: Path, mut: Mutation) -> Outcome:
    t0 = time.monotonic()
    missing = [t for t in mut.tests if not (root / t.split("::")[0]).is_file()]
    patched = apply(root, mut)
    if isinstance(patched, str) or missing:
        note = patched if isinstance(patched, str) else f"test files missing: {missing}"
        return Outcome(mut, "skipped", note, 0.0)
    target, original = patched
    try:
        rc, out = run_tests(root, mut.tests)
    finally:
        target.write_text(original)
    dt = time.monotonic() - t0
    if rc == 0:
        return Outcome(mut, "SURVIVED", "all named tests passed", dt)
    if rc == 5:
        return Outcome(mut, "error", "no tests ran", dt)
    return Outcome(mut, "caught", first_failure(out), dt)


def table(outcomes: list[Outcome]) -> str:
    w = max(len(o.mutation.name) for o in outcomes)
    lines = [f"{'mutation':{w}}  {'status':8}  {'s':>5}  {'file':28}  first failure / note"]
    for o in outcomes:
        lines.append(f"{o.mutation.name:{w}}  {o.status:8}  {o.seconds:5.1f}  {o.mutation.path:28}  {o.detail}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="run only mutations whose name contains this text")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    args = ap.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m.name]
    tmp = Path(tempfile.mkdtemp(prefix="dapdee-mutants-"))
    try:
        root = make_copy(tmp)
        check_imports(root)
        print(f"copy: {root}\npython: {sys.executable}")
        tests = tuple(dict.fromkeys(t for m in chosen for t in m.tests if (root / t).is_file()))
        rc, out = run_tests(root, tests)
        if rc != 0:
            print(out[-3000:])
            raise SystemExit(f"the unmutated copy fails {' '.join(tests)}: fix that first")
        sanity = try_mutant(root, SANITY)
        if sanity.status != "caught":
            raise SystemExit(f"sanity mutant not caught ({sanity.detail}): the copy is not what the tests import")
        outcomes = [try_mutant(root, m) for m in tqdm(chosen, desc="mutants", unit="mutant")]
    finally:
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table([sanity, *outcomes]))
    ran = [o for o in outcomes if o.status != "skipped"]
    caught = sum(o.status == "caught" for o in ran)
    for o in outcomes:
        if o.status == "skipped":
            print(f"note: skipped {o.mutation.name!r}: {o.detail}")
    skipped = len(outcomes) - len(ran)
    print(f"\ncaught {caught}/{len(ran)}" + (f" ({skipped} skipped)" if skipped else ""))
    return 0 if caught == len(ran) else 1


if __name__ == "__main__":
    sys.exit(main())
