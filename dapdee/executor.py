"""The split executor: run any downward-closed part of a traced model.

One executor serves the device (input -> boundary tensors), the edge worker (boundary
tensors -> exit logits) and whole-model runs, so partial execution is defined once.
It walks the torch.fx graph directly: only the nodes a request needs are computed. A walk
(`GraphExecutor.walk`) can pause at points of the graph order, hand out values, drop rows of
the batch and go on, or be abandoned: progressive (confidence) exits run on it
(`dapdee.progressive_run`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import torch
from torch import fx

from dapdee.bounded_cache import BoundedCache

# names the step-plan cache holds at most (given, targets, schedule and releases; ~20 bytes
# each, so ~10 MB): requests may name arbitrary cuts
PLAN_CACHE_NAMES = 1 << 19


class MissingInputsError(ValueError):
    """The given boundary values do not determine the requested outputs."""

    def __init__(self, targets: Sequence[str], missing: Sequence[str]) -> None:
        self.missing = list(missing)
        super().__init__(f"inputs do not determine {', '.join(targets)}: missing values for {', '.join(self.missing)}")


class GraphExecutor:
    """Executes fx graph nodes by name. `compute` is O(nodes needed) after a cached O(V + E) walk."""

    def __init__(self, gm: fx.GraphModule, plan_cache_names: int = PLAN_CACHE_NAMES) -> None:
        self.gm = gm
        self.nodes: dict[str, fx.Node] = {}
        self.placeholders: list[str] = []
        self.scalar_nodes: set[str] = set()  # nodes whose traced output is a Python scalar
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                self.placeholders.append(n.name)
            if n.op != "output":
                self.nodes[n.name] = n
        self.order = {name: i for i, name in enumerate(self.nodes)}
        # the batch data: the inputs and the nodes that depend on them (per-row values, or a number
        # read off them such as `x.shape[0]`); parameters, buffers and what is computed from them
        # alone are not, whatever their first dimension
        self.batch_nodes = _input_dependent(gm.graph)
        self._modules = dict(gm.named_modules())
        self._plans: BoundedCache[tuple[frozenset[str], tuple[str, ...]], tuple[list[fx.Node], list[list[str]]]] = (
            BoundedCache(plan_cache_names)
        )

    def schedule(self, given: Collection[str], targets: Sequence[str]) -> list[fx.Node]:
        """Nodes to run, in topological order, to get `targets` from the values in `given`.
        Raises MissingInputsError naming the unsupplied graph inputs / nodes it would need."""
        return self._step_plan(given, targets)[0]

    def _step_plan(self, given: Collection[str], targets: Sequence[str]) -> tuple[list[fx.Node], list[list[str]]]:
        """(schedule, releases): `releases[i]` names the values no step after `i` reads and that
        are not targets, so they can be dropped once step `i` has run; `releases[-1]` (one entry
        past the schedule) names given values no step reads. Cached per (given, targets), the
        most recently used within `plan_cache_names` names; a miss is O(V + E)."""
        key = (frozenset(given), tuple(targets))
        cached = self._plans.get(key)
        if cached is not None:
            return cached
        unknown = [t for t in [*targets, *given] if t not in self.nodes]
        if unknown:
            raise KeyError(f"unknown nodes: {', '.join(unknown)}")
        need: set[str] = set()
        missing: list[str] = []
        stack = [t for t in targets if t not in key[0]]
        while stack:
            name = stack.pop()
            if name in need:
                continue
            node = self.nodes[name]
            if node.op == "placeholder":
                missing.append(name)
                continue
            need.add(name)
            for inp in node.all_input_nodes:
                if inp.name not in key[0] and inp.name not in need:
                    stack.append(inp.name)
        if missing:
            raise MissingInputsError(targets, sorted(set(missing), key=self.order.__getitem__))
        plan = sorted((self.nodes[n] for n in need), key=lambda n: self.order[n.name])
        result = (plan, _releases(plan, key[0], set(targets)))
        names = len(key[0]) + len(key[1]) + len(plan) + sum(len(r) for r in result[1])
        self._plans.put(key, result, names)
        return result

    def compute(
        self,
        given: Mapping[str, Any],
        targets: Sequence[str],
        allowed: Collection[str] | None = None,
    ) -> dict[str, Any]:
        """Values of `targets` from the boundary values `given` (node or input name -> value).

        Runs only what the targets need and was not given. With `allowed`, refuses to run any
        node outside it (the device side of a partition). Scalars shipped as 0-d tensors are
        turned back into Python numbers where the traced model produced a number.

        Memory: a value is dropped as soon as the last scheduled step that reads it has run
        (targets are kept), so what the executor holds at any moment is the live frontier of the
        schedule, not every intermediate. Time: O(nodes needed) plus the nodes' own work.
        """
        run = self.walk(given, targets, allowed=allowed)
        run.run_until(None)
        return {t: run.value(t) for t in targets}

    def walk(
        self,
        given: Mapping[str, Any],
        targets: Sequence[str],
        keep: Sequence[str] = (),
        allowed: Collection[str] | None = None,
    ) -> Walk:
        """A pausable run of the schedule that gets `targets` and `keep` from `given` (the
        schedule of `compute`, in graph order; `keep` values are held like targets until the run
        is dropped). Nothing runs until `Walk.run_until` is called; a walk that is abandoned
        never computes the rest. Same errors as `compute`. O(nodes needed) for the schedule
        (cached)."""
        return Walk(self, given, [*targets, *keep], allowed)

    def _scheduled(
        self, env: Mapping[str, Any], targets: Sequence[str], allowed: Collection[str] | None
    ) -> tuple[list[fx.Node], list[list[str]]]:
        plan, releases = self._step_plan(env.keys(), targets)
        if allowed is not None:
            outside = [n.name for n in plan if n.name not in allowed]
            if outside:
                raise ValueError(f"partition would need nodes outside it: {', '.join(outside[:5])}")
        return plan, releases

    def run_node(self, node: fx.Node, env: dict[str, Any]) -> Any:
        """The value of fx `node` from the values of its inputs in `env` (name -> value): one
        module, function or method call, or a parameter read. The schedules run every node
        through it; the profiler times it node by node, and the tracer records what it computes.
        O(the node's op)."""
        args = fx.node.map_arg(node.args, lambda n: env[n.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
        if node.op == "call_module":
            return self._modules[node.target](*args, **kwargs)
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            obj, *rest = args
            return getattr(obj, node.target)(*rest, **kwargs)
        if node.op == "get_attr":
            obj: Any = self.gm
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise ValueError(f"cannot execute fx node {node.name} of op {node.op}")


class Walk:
    """One run of a schedule that can stop at points of the graph order (`run_until`), read
    values there (`value`), keep only some rows of the batch (`select_rows`), and go on or be
    dropped. `GraphExecutor.compute` is a walk run to its end. Memory: the schedule's live
    frontier plus the targets and kept values."""

    def __init__(
        self, ex: GraphExecutor, given: Mapping[str, Any], targets: Sequence[str], allowed: Collection[str] | None
    ) -> None:
        env: dict[str, Any] = {}
        for name, v in given.items():
            if name in ex.scalar_nodes and isinstance(v, torch.Tensor):
                v = v.item()
            env[name] = v
        self._ex = ex
        self._plan, self._releases = ex._scheduled(env, targets, allowed)
        for name in self._releases[-1]:
            del env[name]
        self._env = env
        self._step = 0
        first = next(
            (v for k, v in given.items() if k in ex.batch_nodes and isinstance(v, torch.Tensor) and v.dim() > 0), None
        )
        self.rows: int | None = None if first is None else int(first.shape[0])

    @property
    def done(self) -> bool:
        """Whether every scheduled step has run."""
        return self._step >= len(self._plan)

    def run_until(self, node: str | None) -> None:
        """Run the remaining steps that come no later than `node` in the graph order (any node
        or input of the graph, computed here or not; None: every remaining step). O(steps run)
        plus their work."""
        limit = None if node is None else self._ex.order[node]
        plan, releases, env = self._plan, self._releases, self._env
        while self._step < len(plan):
            fx_node = plan[self._step]
            if limit is not None and self._ex.order[fx_node.name] > limit:
                return
            env[fx_node.name] = self._ex.run_node(fx_node, env)
            for name in releases[self._step]:
                del env[name]
            self._step += 1

    def value(self, name: str) -> Any:
        """A value given, computed so far, or kept (KeyError when it is not held)."""
        return self._env[name]

    def select_rows(self, rows: torch.Tensor) -> bool:
        """Keep only the batch rows `rows` (indices into the current rows, ascending) of every
        value held that is batch data (`GraphExecutor.batch_nodes`: it depends on the graph
        input; a parameter is left whole), so the rest of the walk computes those rows only.
        Returns False and changes nothing when some such value cannot be cut by rows (not a
        tensor with the batch first, e.g. a traced `x.shape[0]`); the walk then goes on with
        every row. O(values held)."""
        if self.rows is None:
            return False
        cut = [name for name in self._env if name in self._ex.batch_nodes]
        if not all(row_major(self._env[name], self.rows) for name in cut):
            return False
        for name in cut:
            self._env[name] = self._env[name].index_select(0, rows)
        self.rows = int(rows.numel())
        return True


def _input_dependent(graph: fx.Graph) -> frozenset[str]:
    """The names of the graph's placeholders and of every node that reads one of them, directly
    or through other nodes (the graph is in topological order). O(V + E)."""
    found: set[str] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or (node.op != "output" and any(inp.name in found for inp in node.all_input_nodes)):
            found.add(node.name)
    return frozenset(found)


def row_major(v: Any, rows: int) -> bool:
    """Whether `v` is a tensor whose first dimension is the batch of `rows` rows."""
    return isinstance(v, torch.Tensor) and v.dim() > 0 and int(v.shape[0]) == rows


def _releases(plan: Sequence[fx.Node], given: Collection[str], targets: Collection[str]) -> list[list[str]]:
    """For each step of `plan`, the values (given or computed, never a target) whose last reader
    is that step, plus one trailing entry: the given values no step reads. O(plan + its edges)."""
    last: dict[str, int] = {}
    for i, node in enumerate(plan):
        for inp in node.all_input_nodes:
            last[inp.name] = i
    releases: list[list[str]] = [[] for _ in range(len(plan) + 1)]
    for i, node in enumerate(plan):
        if node.name not in targets and node.name not in last:  # computed, read by nobody
            releases[i].append(node.name)
    for name, i in last.items():
        if name not in targets:
            releases[i].append(name)
    releases[-1] = [g for g in given if g not in last and g not in targets]
    return releases
