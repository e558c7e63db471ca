"""Running every selected experiment in order, each cell from the cache or measured."""

from __future__ import annotations

from typing import Any

from dapdee.bench.paperbench.adaptation import adaptation
from dapdee.bench.paperbench.experiments import Bench, fig6, fig7, heavy, light


async def run_all(b: Bench) -> dict[str, Any]:
    """Light and heavy load per model and network, both sweeps per model, then adaptation;
    the services are stopped at the end (started only if a cell had to be measured)."""
    o = b.o
    res: dict[str, Any] = {"light": [], "heavy": [], "fig6": [], "fig7": [], "adaptation": None}
    try:
        for m in b.models:
            for net in o.networks:
                if "light" in o.only:
                    res["light"].append(await light(b, m, net))
                if "heavy" in o.only:
                    res["heavy"].append(await heavy(b, m, net))
        for m in b.models if "fig6" in o.only else []:
            res["fig6"].append(await fig6(b, m))
        for m in b.models if "fig7" in o.only else []:
            res["fig7"].append(await fig7(b, m))
        candidates = [o.adapt_model] if o.adapt_model else b.models
        if candidates and o.adapt_phases and "adapt" in o.only:
            res["adaptation"] = await adaptation(b, candidates)
    finally:
        await b.close()
    return res
