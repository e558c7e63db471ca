"""Zero-cost leases and the reservation view's log: a zero-cost edge plan's lease is on its worker (listed
in GET /workers, rebalanced with that worker's leases, kept there by a rebalance's apply), and the
reservation view's log of the reservations made while refreshes are in flight stays bounded
however the refreshes overlap. Real planners on a real Redis; the view is the real class."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from dapdee.planner.leases import ReservationView
from tests.test_fleet_service import chain_graph, leased, workers
from tests.test_planner_service import beat, planner

ZERO_EDGE = {"kind": "edge", "timings_ms": {"a": 0.0, "b": 0.0}, "meta": {"edge_request_ms": 0.0}}
PAID_EDGE = {"kind": "edge", "timings_ms": {"a": 2.0, "b": 2.0}, "meta": {"edge_request_ms": 4.0}}
PHONE = {"kind": "device", "timings_ms": {"a": 60.0, "b": 60.0}, "meta": {"device_request_ms": 1.0}}


def put_model(c: httpx.Client, model: str, edge: dict[str, Any]) -> None:
    """`chain_graph` as `model`, its edge profile of tier "t" `edge`, its device profile "phone"."""
    assert c.put(f"/models/{model}", json=chain_graph(model)).status_code == 201
    assert c.put(f"/models/{model}/profiles/t", json=edge).status_code == 201
    assert c.put(f"/models/{model}/profiles/phone", json=PHONE).status_code == 201


def test_a_zero_cost_edge_lease_is_listed_and_rebalanced_on_its_worker(planner_prefix: str) -> None:
    """An edge profile whose timings and request cost are all 0 is accepted; a device planned on
    it runs Edge-Only with e_i = 0, and its lease, on the worker GET /devices names, is counted
    there by GET /workers and solved by a rebalance of that worker, reserving 0 ms/s: what the
    paid lease beside it books and is priced at stays its own."""
    with planner(planner_prefix, rebalance_s=0) as c:
        put_model(c, "cam", ZERO_EDGE)
        put_model(c, "cam2", PAID_EDGE)
        assert beat(c, "http://w1:1", ["cam", "cam2"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        paid = c.post("/plan", json=leased("p1", model="cam2")).json()["lease"]
        assert (paid["worker"], paid["edge_ms_per_frame"]) == ("http://w1:1", pytest.approx(8.0))
        zero = c.post("/plan", json=leased("z1")).json()
        assert zero["device_nodes"] == [] and zero["edge_nodes"] == ["a", "b"]
        assert (zero["lease"]["worker"], zero["lease"]["edge_ms_per_frame"]) == ("http://w1:1", 0.0)
        assert c.get("/devices/z1").json()["lease"]["worker"] == "http://w1:1"
        w1 = workers(c)["http://w1:1"]
        assert (w1["leases"], w1["leased_ms_per_s"]) == (2, pytest.approx(80.0))
        # the zero lease adds 0 to what the others book: p1 is still priced at an idle worker
        again = c.post("/plan", json=leased("p1", model="cam2")).json()
        assert again["predicted"]["edge_ms"] == pytest.approx(8.0) and again["lease"]["worker"] == "http://w1:1"
        report = c.post("/fleet/rebalance").json()
        (solved,) = [r for r in report["workers"] if r["worker"] == "http://w1:1"]
        assert solved["applied"] and {d["device_id"] for d in solved["devices"]} == {"p1", "z1"}
        assert solved["after"]["leased_ms_per_s"] == pytest.approx(80.0)
        w1 = workers(c)["http://w1:1"]
        assert (w1["leases"], w1["leased_ms_per_s"]) == (2, pytest.approx(80.0))
        assert c.get("/devices/z1").json()["lease"]["worker"] == "http://w1:1"
        assert c.delete("/devices/z1").status_code == 204
        assert workers(c)["http://w1:1"]["leases"] == 1


def test_a_rebalance_that_puts_a_device_only_lease_on_a_zero_cost_worker_keeps_it_there(
    planner_prefix: str,
) -> None:
    """A lease held while no worker served its model (on no worker) is brought by a rebalance
    onto the first of two zero-cost workers with e_i = 0: it is on that worker (listed there),
    and the second worker's solve neither takes it away nor is refused for it."""
    with planner(planner_prefix, rebalance_s=0) as c:
        put_model(c, "cam", ZERO_EDGE)
        assert c.post("/plan", json=leased("z1")).json()["lease"]["worker"] is None
        for url in ("http://w1:1", "http://w2:1"):
            assert beat(c, url, ["cam"], "t", 0.0, capacity_ms_per_s=1000.0).status_code == 200
        report = c.post("/fleet/rebalance").json()
        assert report["workers"] and all(r["applied"] for r in report["workers"])
        lease = c.get("/devices/z1").json()["lease"]
        assert (lease["worker"], lease["edge_ms_per_frame"], lease["assigned"]) == ("http://w1:1", 0.0, True)
        seen = workers(c)
        assert (seen["http://w1:1"]["leases"], seen["http://w2:1"]["leases"]) == (1, 0)
        # the device picks the assigned plan up and stays listed on its worker
        assert c.post("/plan", json=leased("z1")).json()["lease"]["worker"] == "http://w1:1"
        assert workers(c)["http://w1:1"]["leases"] == 1


def _agrees(view: ReservationView, truth: dict[str, dict[str, float]]) -> bool:
    """Whether `view` holds the reservations `truth` (worker -> device -> ms/s) on its workers."""
    return all(view.leased(url) == (pytest.approx(sum(per.values())), len(per)) for url, per in truth.items())


def test_the_log_of_sets_made_during_refreshes_stays_bounded_when_refreshes_overlap() -> None:
    """Refreshes sent each before the previous one is answered (the refresh loop beside a
    rebalance's or a model delete's refresh), a reservation made while each is in flight, and
    every answer read by Redis before that reservation: each answer with the reservations made
    since its read was sent holds what Redis holds, and the log of those reservations stays a
    few entries long instead of growing with every reservation while some read is in flight."""
    view = ReservationView()
    truth: dict[str, dict[str, float]] = {"http://w": {}}
    mark, answer = view.read_started(), {"http://w": {}}
    for i in range(3000):
        nxt, nxt_answer = view.read_started(), {"http://w": dict(truth["http://w"])}
        device, load = f"d{i % 40}", float(i % 7 + 1)
        truth["http://w"][device] = load
        view.set(device, "http://w", load)
        view.replace(answer, every=True, mark=mark)  # read before `device`'s reservation
        view.read_ended(mark)  # the oldest read in flight: reads end in the order sent
        assert _agrees(view, truth), i
        assert len(view._since) <= 4, (i, len(view._since))
        mark, answer = nxt, nxt_answer
    view.replace(answer, every=True, mark=mark)
    view.read_ended(mark)
    assert _agrees(view, truth) and view._since == []


def test_reads_ending_out_of_order_still_replay_what_they_may_have_missed() -> None:
    """Three overlapping reads ending out of order, each named by its mark: the log is cut only
    below the oldest read still in flight, so each answer gets every reservation made since its
    own read was sent (a zero-cost lease on a worker, `held`, among them), and nothing is left
    once every read ended."""
    view = ReservationView()
    truth: dict[str, dict[str, float]] = {"http://w": {}, "http://v": {}}

    def reserve(device: str, worker: str, load: float, held: bool = False) -> None:
        for per in truth.values():
            per.pop(device, None)
        truth[worker][device] = load
        view.set(device, worker, load, held=held)

    def snapshot() -> dict[str, dict[str, float]]:
        return {url: dict(per) for url, per in truth.items()}

    a, at_a = view.read_started(), snapshot()
    reserve("d1", "http://w", 10.0)
    b, at_b = view.read_started(), snapshot()
    reserve("d2", "http://v", 0.0, held=True)
    c, at_c = view.read_started(), snapshot()
    reserve("d3", "http://w", 5.0)
    view.replace(at_b, every=True, mark=b)
    view.read_ended(b)  # the middle read ends first: a's reservations since its mark stay
    assert _agrees(view, truth) and view.leased("http://v") == (0.0, 1)
    reserve("d1", "http://v", 7.0)
    view.replace(at_a, every=True, mark=a)
    view.read_ended(a)
    assert _agrees(view, truth)
    view.replace(at_c, every=True, mark=c)
    view.read_ended(c)
    assert _agrees(view, truth) and view._since == []
    view.set("d4", "http://w", 1.0)  # no read in flight: nothing logged
    assert view._since == []
