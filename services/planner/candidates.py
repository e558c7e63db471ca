"""The workers a device of a model may plan with, each with its plan map: the candidates of a
fleet plan choice (`dapdee.planner.plan_choice.Candidate`) and of a plan against one worker.

A worker is a candidate when the plan map of its timings can be had: the device's profile (or
the graph's own device timings), its tier's edge profile (or the graph's own edge timings) and
the model's graph (`dapdee.planner.planmaps.PlanMapCache`, which reads and builds the maps). The
model and its profiles come from this replica's model cache (`dapdee.planner.model_cache`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from dapdee.planner.errors import MissingTimings, ModelUnreachable
from dapdee.planner.model_cache import ModelCache
from dapdee.planner.modelstate import ModelState, Profile
from dapdee.planner.plan_choice import Candidate
from dapdee.planner.planmaps import PlanMapCache
from dapdee.planner.workers import Worker


class CandidateFinder:
    """Candidate workers with their plan maps, from `models` (the model cache) and `planmaps`
    (module docstring)."""

    def __init__(self, models: ModelCache, planmaps: PlanMapCache) -> None:
        self.models = models
        self.planmaps = planmaps

    async def among(
        self, name: str, st: ModelState, dev: Profile | None, workers: list[Worker], until: float | None = None
    ) -> list[Candidate]:
        """The workers a device of this model may use, each with its plan map (`timed`).
        MissingTimings when none has its timings. O(workers) map look-ups."""
        return [c async for c in self.timed(name, st, dev, workers, until=until)]

    async def timed(
        self,
        name: str,
        st: ModelState,
        dev: Profile | None,
        workers: list[Worker],
        progressive: bool = False,
        until: float | None = None,
    ) -> AsyncIterator[Candidate]:
        """Those of `workers`, in their order, whose timings are complete, each with its plan map
        (its tier's edge profile; the graph's own edge timings where the tier has none; the
        confidence-exit map with `progressive`), maps waited for until `until`
        (`PlanMapCache.get`); a worker whose timings are missing is left out. Raises the first
        one's MissingTimings when none is left. A map look-up per worker taken."""
        missing: MissingTimings | None = None
        found = False
        for w in workers:
            edge = st.profiles.get(w.tier)
            edge = edge if edge is not None and edge.kind == "edge" else None
            hint = "" if edge is not None else f" and there is no edge profile for tier {w.tier!r} of worker {w.url}"
            try:
                pm = await self.planmaps.get(name, st, dev, edge, hint, progressive=progressive, until=until)
            except MissingTimings as exc:
                missing = missing or exc
                continue
            found = True
            yield Candidate(w, pm)
        if not found and missing is not None:
            raise missing

    async def by_name(self, name: str, device_tier: str | None, workers: Sequence[Worker]) -> list[Candidate]:
        """`among` by model name and device tier ([] when either is gone: a lease outlived them).
        The fleet's `CandidatesFor`."""
        try:
            st = await self.models.get(name)
        except ModelUnreachable:
            return []
        if st is None:
            return []
        dev = st.profiles.get(device_tier) if device_tier is not None else None
        if device_tier is not None and (dev is None or dev.kind != "device"):
            return []
        try:
            return await self.among(name, st, dev, list(workers))
        except MissingTimings:
            return []
