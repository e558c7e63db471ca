"""What one fleet run is: the system, N devices, the slowdown K, the model, the requirements,
each device's uplink; and the device profile the devices are emulated with.

Requirements (the targets', unchanged by default): every device offers 10 frames/s and asks for a 250 ms
latency budget (mode `auto`, no accuracy floor). Uplinks: a fixed cycle of 8 networks, 3/8 4G,
2/8 WiFi, 2/8 3G and 1/8 CAT1 (device i takes `NETWORK_CYCLE[i % 8]`, so N = 1 is a 4G device
and every N >= 8 has the same proportions), each with a 20 ms round trip added per request (as
bench/paper.py uses).

The emulated device's profile is the device profile this machine measures the way a device
runtime does (`dapdee.device.profile.measure_device_profile`: per-node medians through the K x
emulation, calibrated to whole frames, whose idle gaps leave caches cold) at BASE_K = 10, the
paper benchmark's K, cached under bench/results/fleet_profiles/; the device at K runs every
node in its time x K / BASE_K. The planner plans with exactly the time `EmulatedCompute`
sleeps. (Measured at K = 1 instead, whole frames run back to back with hot caches and take
about half as long: the profile would no longer be what a slow device's frames take.)
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from dapdee.costgraph import CostGraph
from dapdee.device.config import Requirements, default_tier
from dapdee.models import LoadedModel
from dapdee.netem import NETWORKS

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
PROFILE_DIR = RESULTS / "fleet_profiles"
MODELS: dict[str, Path] = {
    "resnet18": REPO / "artifacts" / "fmnist-resnet18",
    "resnet18-224": REPO / "artifacts" / "fmnist-resnet18-224",
}
NETWORK_CYCLE = ("4G", "WiFi", "3G", "CAT1", "4G", "WiFi", "3G", "4G")
RTT_MS = 20.0
FRAME_RATE = 10.0
BUDGET_MS = 250.0
PROFILE_REPEATS = 20
BASE_K = 10.0


@dataclass(frozen=True)
class DeviceSpec:
    """One emulated device: its id, its network's name and uplink rate, its added round trip."""

    device_id: str
    network: str
    rate_mbps: float
    rtt_ms: float


def device_specs(n: int, rtt_ms: float = RTT_MS, tag: str = "cam") -> list[DeviceSpec]:
    """The N devices of a run: device i on `NETWORK_CYCLE[i % 8]`. O(n)."""
    nets = [NETWORK_CYCLE[i % len(NETWORK_CYCLE)] for i in range(n)]
    return [DeviceSpec(f"{tag}-{i:03d}", net, NETWORKS[net], rtt_ms) for i, net in enumerate(nets)]


@dataclass(frozen=True)
class Scenario:
    """One measured run: `system` (a key of `systems.SYSTEMS`), `n` devices at slowdown `k` on
    `model` (a key of MODELS) with the requirements `frame_rate`, `budget_ms` and `min_accuracy`
    (None: no floor); `warmup_s` unmeasured seconds (plans settle), then `window_s` measured
    ones; at most `per_process` devices per client process."""

    system: str
    n: int
    k: float
    model: str = "resnet18"
    warmup_s: float = 20.0
    window_s: float = 30.0
    frame_rate: float = FRAME_RATE
    budget_ms: float = BUDGET_MS
    min_accuracy: float | None = None
    rtt_ms: float = RTT_MS
    per_process: int = 16

    def requirements(self) -> Requirements:
        """What every device asks for (mode auto)."""
        return Requirements(self.budget_ms, self.min_accuracy, self.frame_rate, mode="auto")

    @property
    def tier(self) -> str:
        return default_tier(self.k)

    @property
    def artifact(self) -> Path:
        return MODELS[self.model]

    def devices(self) -> list[DeviceSpec]:
        return device_specs(self.n, self.rtt_ms)

    def groups(self) -> list[list[DeviceSpec]]:
        """The devices split over client processes in contiguous runs of device ids, as evenly as
        `per_process` allows (sizes differ by at most one). Contiguous, not strided: 8
        consecutive devices are one whole NETWORK_CYCLE, so a process of 8 or more devices holds
        every network, and one of a multiple of 8 (N = 16, 32, 64 at 16 per process) the run's
        proportions exactly; a stride dividing the cycle would give each process one or two
        networks, so the processes' event-loop delays would differ by network. O(n)."""
        specs = self.devices()
        parts = -(-len(specs) // self.per_process)
        size, extra = divmod(len(specs), max(parts, 1))
        bounds = [i * size + min(i, extra) for i in range(parts + 1)]
        return [specs[a:b] for a, b in pairwise(bounds)]

    def label(self) -> str:
        return f"{self.system} N={self.n} K={self.k:g} {self.model}"


def profile_path(model: str) -> Path:
    return PROFILE_DIR / f"{model}.device-k{BASE_K:g}.device.json"


def base_profile(loaded: LoadedModel, model: str, repeats: int = PROFILE_REPEATS) -> CostGraph:
    """The device profile at BASE_K: cached in PROFILE_DIR when it matches the model, else
    measured (`measure_device_profile`) and written there."""
    from dapdee.device.profile import device_profile

    PROFILE_DIR.mkdir(parents=True, exist_ok=True)
    return device_profile(loaded, BASE_K, profile_path(model), repeats)


def scaled_profile(base: CostGraph, k: float) -> CostGraph:
    """`base` (at BASE_K) with every node's device time x k / BASE_K: what the emulated device
    sleeps and the profile the planner plans it with. O(V)."""
    meta = {**base.meta.get("device", {}), "slowdown": k, "emulated": f"profile at K={BASE_K:g} x {k / BASE_K:g}"}
    return base.with_timings("device", {n.name: (n.device_ms or 0.0) * k / BASE_K for n in base.nodes}, meta)


def exit_device_ms(graph: CostGraph, exit_name: str | None = None) -> float:
    """Σ device_ms over A(exit): the exit's Device-Only time (ms). O(V)."""
    ex = graph.exit(exit_name)
    return sum(graph.node(n).device_ms or 0.0 for n in graph.ancestors(ex.node))
