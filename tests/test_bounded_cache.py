"""`BoundedCache` against a plain list model of an LRU cache bounded by cost, and the split
executor's step plans held within their budget however many cuts requests name."""

from __future__ import annotations

import random
import sys
import threading
import time

import pytest
import torch

from dapdee.bounded_cache import BoundedCache
from dapdee.executor import GraphExecutor
from dapdee.models import load_model
from tests.test_graph_executor import random_cut


@pytest.mark.parametrize("seed", range(40))
def test_the_cache_holds_what_a_list_model_of_least_recently_used_holds(seed: int) -> None:
    """Random gets and puts: the same entries held, in the same order of use, and the total
    within the budget. The model: a list of (key, value, cost), most recently used last; a put
    replaces the key, then drops from the front while over budget (not kept past it alone)."""
    rng = random.Random(seed)
    budget = rng.choice([1, 5, 20, 100])
    cache: BoundedCache[int, str] = BoundedCache(budget)
    model: list[tuple[int, str, int]] = []
    for step in range(300):
        key = rng.randrange(12)
        if rng.random() < 0.4:
            found = [e for e in model if e[0] == key]
            if found:
                model.remove(found[0])
                model.append(found[0])
            assert cache.get(key) == (found[0][1] if found else None), step
            continue
        value, cost = f"v{step}", rng.choice([0, 1, 3, 7, budget, budget + 1])
        model = [e for e in model if e[0] != key]
        if cost <= budget:
            while sum(e[2] for e in model) + cost > budget:
                model.pop(0)
            model.append((key, value, cost))
        cache.put(key, value, cost)
        assert cache.total == sum(e[2] for e in model) <= budget, step
        # getting each in the model's order moves each to the end in that order: no change
        assert len(cache) == len(model) and all(cache.get(k) == v for k, v, _ in model), step


def test_a_budget_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="budget"):
        BoundedCache(0)


def test_the_executors_step_plans_stay_within_their_budget_and_answer_as_a_fresh_executor() -> None:
    """Requests naming many different cuts: the cached step plans hold at most the budget's
    names (a count cap let a large model's plans add up to tens of megabytes), and every
    schedule equals the one an executor with nothing cached computes."""
    m = load_model("zoo:inception?width=0.25")
    budget = 3000  # a few of this model's plans
    small = GraphExecutor(m.executor.gm, plan_cache_names=budget)
    rng = random.Random(3)
    ex = m.graph.exits[-1]
    for _ in range(60):
        device = set(random_cut(m.graph, ex.name, rng))
        given = [m.input_name] + [n for n in device if any(c not in device for c in m.graph.consumers()[n])]
        fresh = GraphExecutor(m.executor.gm)
        assert small.schedule(given, [ex.node]) == fresh.schedule(given, [ex.node])
        assert 0 < small._plans.total <= budget and len(small._plans) >= 1
    x = torch.randn(1, *m.input_shape[1:])
    with torch.inference_mode():
        assert torch.equal(small.compute({m.input_name: x}, [ex.node])[ex.node], m.module(x)[-1])


def test_threads_sharing_the_cache_neither_fail_nor_lose_its_room() -> None:
    """The executor's cache is used by the event loop and the compute threads at once. Threads
    getting and putting at random (evictions all the time) raise nothing, and afterwards the
    whole budget is still usable: `budget` new entries of cost 1 are all held. Unlocked, a get
    raced an eviction (KeyError), and lost updates to the total shrank the room until every
    miss failed."""
    budget = 60
    cache: BoundedCache[int, int] = BoundedCache(budget)
    errors: list[BaseException] = []
    stop = time.monotonic() + 1.5

    def work(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop:
                key = rng.randrange(200)
                if cache.get(key) is None:
                    cache.put(key, key, rng.randint(1, 9))
        except BaseException as exc:  # noqa: BLE001 - any error fails the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # threads hand over often (the services run at 0.5 ms)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]
    for key in range(1000, 1000 + budget):
        cache.put(key, key, 1)
    assert cache.total == budget and all(cache.get(k) == k for k in range(1000, 1000 + budget))
