"""Model specs, artifacts and tracing: from `zoo:NAME?opt=v` or `pkg.mod:factory` to a
traced fx graph, its split executor and its cost graph.

A MODEL argument is `zoo:NAME` with options as a query string (`zoo:vgg16?width=0.25&in_channels=1`)
or `package.module:factory` (any importable callable returning an `nn.Module`, called with
no arguments). An artifact directory (`weights.safetensors` + `manifest.json`) pins the spec,
the input shape and the exits' held-out accuracies. A manifest's spec is data, not code: it is
built only when it is a `zoo:` spec, or when the caller names that same spec itself.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import torch
from torch import fx, nn

from dapdee.costgraph import CostGraph, CostGraphError, Exit, InputSpec, Node, Progressive, is_finite_number
from dapdee.data import DataError, FrameNormalize, shown
from dapdee.executor import GraphExecutor
from dapdee.names import MAX_INPUT_ELEMENTS, MODEL_NAME_RE, ModelError, check_model_name  # noqa: F401 (re-exported)
from dapdee.zoo import ZOO

MANIFEST = "manifest.json"
FRAME_NODE = "frame"  # the first node of an artifact's graph: raw uint8 frame -> normalised input
WEIGHTS = "weights.safetensors"
FACTOR_OPTIONS = ("width", "tail")  # zoo options that scale channel counts: finite numbers in (0, MAX_FACTOR]
# 4x the reference channel counts is already a 150M-parameter ResNet-18; past it a typo
# (width=100) would allocate gigabytes before anything could say why
MAX_FACTOR = 4.0
COUNT_OPTIONS = {"in_channels": (1, 64), "num_classes": (2, 10_000)}  # zoo options that are counts: int bounds


@dataclass(frozen=True)
class ModelSpec:
    spec: str
    kind: str  # "zoo" | "import"
    target: str  # zoo name, or "package.module:factory"
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def default_name(self) -> str:
        return self.target if self.kind == "zoo" else self.target.rsplit(":", 1)[1]


def _parse_value(v: str) -> Any:
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def _zoo_option_problem(opts: dict[str, Any]) -> str | None:
    """What is wrong with a zoo spec's channel factors or counts ("option: expected ..."), or
    None. O(options)."""
    for key in FACTOR_OPTIONS:
        v = opts.get(key)
        if v is not None and not (is_finite_number(v) and v > 0):
            return f"{key}: expected a finite number > 0, got {v!r}"
        if v is not None and v > MAX_FACTOR:
            return f"{key}: expected a factor of at most {MAX_FACTOR:g}, got {v!r}"
    for key, (low, high) in COUNT_OPTIONS.items():
        v = opts.get(key)
        if v is not None and not (isinstance(v, int) and low <= v <= high):
            return f"{key}: expected an integer in [{low}, {high}], got {v!r}"
    return None


def parse_spec(spec: str) -> ModelSpec:
    """The parsed MODEL argument (see the module doc); ModelError naming the problem for an
    empty spec, an unknown zoo model, a channel factor (`width`, `tail`) that is not a finite
    number in (0, MAX_FACTOR], a count (`in_channels`, `num_classes`) that is not an integer
    within `COUNT_OPTIONS`' bounds, or a spec of neither form. O(len(spec))."""
    if not isinstance(spec, str) or not spec:
        raise ModelError("model spec: empty")
    if spec.startswith("zoo:"):
        name, _, query = spec[4:].partition("?")
        if name not in ZOO:
            raise ModelError(f"model spec {spec!r}: unknown zoo model {name!r}; zoo has {', '.join(sorted(ZOO))}")
        opts = {k: _parse_value(v) for k, v in parse_qsl(query, keep_blank_values=True, strict_parsing=False)}
        problem = _zoo_option_problem(opts)
        if problem:
            raise ModelError(f"model spec {spec!r}: bad options ({problem})")
        return ModelSpec(spec, "zoo", name, opts)
    if spec.count(":") != 1:
        raise ModelError(f"model spec {spec!r}: expected zoo:NAME or package.module:factory")
    return ModelSpec(spec, "import", spec)


def build_module(spec: ModelSpec) -> nn.Module:
    """Instantiate the spec's nn.Module (eval mode)."""
    if spec.kind == "zoo":
        try:
            module = ZOO[spec.target](**spec.options)
        except (TypeError, ValueError) as exc:
            reason = str(exc).partition("\n")[0]  # one line: torch's messages carry a C++ trace
            raise ModelError(f"model spec {spec.spec!r}: bad options ({reason})") from None
    else:
        mod_name, fn_name = spec.target.split(":")
        try:
            mod = importlib.import_module(mod_name)
        except (Exception, SystemExit) as exc:  # any import-time failure is the user's module's
            raise ModelError(
                f"model spec {spec.spec!r}: cannot import {mod_name!r} ({exc}); a module of your own must be "
                "importable: installed, or its directory on PYTHONPATH"
            ) from None
        factory = getattr(mod, fn_name, None)
        if factory is None:
            raise ModelError(f"model spec {spec.spec!r}: module {mod_name!r} has no attribute {fn_name!r}")
        if not callable(factory):
            raise ModelError(f"model spec {spec.spec!r}: {fn_name!r} is not callable")
        try:
            module = factory()
        except (Exception, SystemExit) as exc:  # a user's sys.exit() must not end the command silently
            raise ModelError(f"model spec {spec.spec!r}: factory raised {type(exc).__name__}: {exc}") from None
        if not isinstance(module, nn.Module):
            raise ModelError(f"model spec {spec.spec!r}: factory returned {type(module).__name__}, not an nn.Module")
    return module.eval()


def default_input_shape(spec: ModelSpec) -> tuple[int, ...] | None:
    if spec.kind == "zoo":
        return (1, int(spec.options.get("in_channels", 3)), 32, 32)
    return None


# ---- tracing ------------------------------------------------------------------------------


def exit_names(n: int) -> list[str]:
    """The names of an n-output model's exits, shallow -> deep: `exit1 ... exit{n-1}, final`
    (the one naming rule: tracing, training and calibration use it). O(n)."""
    return [f"exit{i + 1}" for i in range(n - 1)] + ["final"]


def _op_name(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return type(modules[node.target]).__name__.lower()
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return str(node.target)
    return node.op


def _nbytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, (tuple, list)):
        return sum(_nbytes(x) for x in v)
    if isinstance(v, (int, float, bool)):
        return 8
    return 0


def _flops(node: fx.Node, modules: dict[str, nn.Module], args: tuple, out: Any) -> int:
    """Multiply-adds x2 for conv / linear / matmul; one op per output element elsewhere."""
    if not isinstance(out, torch.Tensor):
        return 0
    n_out = out.numel()
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.modules.conv._ConvNd):
            k = math.prod(m.kernel_size) * (m.in_channels // m.groups)
            return 2 * k * n_out
        if isinstance(m, nn.Linear):
            return 2 * m.in_features * n_out
        if isinstance(m, (nn.Flatten, nn.Identity, nn.Dropout)):
            return 0
        return n_out
    if node.op == "call_function" and node.target in (torch.matmul, torch.bmm, torch.mm, operator.matmul):
        a = args[0]
        return 2 * a.shape[-1] * n_out if isinstance(a, torch.Tensor) else 0
    if node.op == "call_function" and node.target in (torch.flatten, torch.reshape, operator.getitem):
        return 0
    if node.op == "call_method" and node.target in ("view", "reshape", "flatten", "size", "contiguous"):
        return 0
    return n_out


def example_input(
    input_shape: tuple[int, ...], dtype: str = "float32", generator: torch.Generator | None = None
) -> torch.Tensor:
    """A random graph input: uniform pixel levels for a uint8 frame, standard normal otherwise."""
    if dtype == "uint8":
        return torch.randint(0, 256, tuple(input_shape), dtype=torch.uint8, generator=generator)
    return torch.randn(tuple(input_shape), generator=generator)


def check_input_shape(shape: Any, where: str) -> tuple[int, ...]:
    """`shape` as a tuple when it is a model input shape: positive integers, the first (the
    batch) 1, at most MAX_INPUT_ELEMENTS elements in all (an example input is allocated at it);
    else ModelError `where: ...` saying which rule it breaks. O(len(shape))."""
    if not isinstance(shape, (list, tuple)) or not shape or not all(_is_count(s, 1) for s in shape):
        raise ModelError(f"{where}: expected positive integers [1, C, H, W], got {shown(shape)}")
    if shape[0] != 1:
        raise ModelError(f"{where}: the batch (first) dimension must be 1, got {shown(list(shape))}")
    if math.prod(shape) > MAX_INPUT_ELEMENTS:
        raise ModelError(f"{where}: {shown(list(shape))} has more than {MAX_INPUT_ELEMENTS} elements")
    return tuple(int(s) for s in shape)


def _insert_frame_node(gm: fx.GraphModule, frame: nn.Module, name: str) -> None:
    """Make `frame` the graph's first node, named `frame` (FRAME_NODE): every user of the input
    placeholder reads its output. ModelError naming the clash when model `name`'s traced graph
    already has a node or an attribute of that name (it would be replaced or renamed)."""
    clash = hasattr(gm, FRAME_NODE) or any(n.name == FRAME_NODE for n in gm.graph.nodes)
    if clash:
        raise ModelError(
            f"{name}: the model has its own {FRAME_NODE!r} (a submodule, attribute or traced node of that "
            f"name); a graph taking the raw frame names its normalising first node {FRAME_NODE!r}: rename the model's"
        )
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return  # trace() reports the arity problem
    ph = placeholders[0]
    gm.add_submodule(FRAME_NODE, frame)
    with gm.graph.inserting_after(ph):
        node = gm.graph.call_module(FRAME_NODE, (ph,))
    ph.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    gm.recompile()


def _mutates_its_input(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` changes its first argument in place: a module built with `inplace=True`,
    a call given `inplace=True`, or a torch in-place function or method (`relu_`, `add_`). fx
    traces `a += b` as an out-of-place `add`. O(1)."""
    if node.op == "call_module":
        return getattr(modules[str(node.target)], "inplace", False) is True
    if node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_method":
        name = str(node.target)
    else:
        return False
    return name.endswith("_") and not name.endswith("__")


def _refuse_shared_in_place(gm: fx.GraphModule, modules: dict[str, nn.Module], name: str) -> None:
    """ModelError for a node that changes a tensor in place while another node reads it too: a
    cut between the two would run the in-place node on the device before that tensor is sent,
    and the edge would compute on the changed values (a whole run reads them in program order).
    O(V + E)."""
    for node in gm.graph.nodes:
        if not node.args or not isinstance(node.args[0], fx.Node) or not _mutates_its_input(node, modules):
            continue
        src = node.args[0]
        others = sorted(u.name for u in src.users if u is not node)
        if others:
            raise ModelError(
                f"{name}: node {node.name} changes {src.name} in place, which {others[0]} also reads; a cut "
                "between them would send the changed values: use the out-of-place op (e.g. inplace=False)"
            )


def _run_once(
    ex: GraphExecutor, modules: dict[str, nn.Module], in_name: str, x: torch.Tensor, outputs: list[str]
) -> tuple[dict[str, Any], dict[str, int]]:
    """Every node's value and FLOPs on one run of `x` through the executor. O(one forward pass)."""
    env: dict[str, Any] = {in_name: x}
    flops: dict[str, int] = {}
    with torch.inference_mode():
        for node in ex.schedule([in_name], outputs):
            args = fx.node.map_arg(node.args, lambda n: env[n.name])
            env[node.name] = ex.run_node(node, env)
            flops[node.name] = _flops(node, modules, args, env[node.name])
    return env, flops


def _cost_nodes(
    gm: fx.GraphModule, ex: GraphExecutor, modules: dict[str, nn.Module], env: dict[str, Any], flops: dict[str, int]
) -> list[Node]:
    """The cost graph's nodes from one recorded run (nodes no output depends on are left out);
    marks the executor's scalar-valued nodes. A node whose value is not a tensor (a Python
    number such as `x.size(0)`, a torch.Size, a tuple) is `sendable=False`: the wire carries
    tensors only, and a number read off the batch (its size) would be wrong in the edge's
    batches, so a plan keeps it on the side that reads it. O(V + E)."""
    nodes = []
    for fxn in gm.graph.nodes:
        if fxn.op in ("placeholder", "output") or fxn.name not in env:
            continue  # nodes no output depends on are dead code for every exit
        v = env[fxn.name]
        if isinstance(v, (int, float, bool)):
            ex.scalar_nodes.add(fxn.name)
        nodes.append(
            Node(
                name=fxn.name,
                op=_op_name(fxn, modules),
                inputs=tuple(dict.fromkeys(i.name for i in fxn.all_input_nodes)),
                out_bytes=_nbytes(v),
                flops=flops.get(fxn.name, 0),
                shape=tuple(v.shape) if isinstance(v, torch.Tensor) else None,
                sendable=isinstance(v, torch.Tensor),
            )
        )
    return nodes


def trace(
    module: nn.Module, input_shape: tuple[int, ...], name: str, frame: nn.Module | None = None
) -> tuple[fx.GraphModule, CostGraph, GraphExecutor]:
    """Trace `module` with torch.fx, run it once on a random input of `input_shape` to record
    every node's output size and FLOPs, and return (graph module, cost graph, executor).
    With `frame` (a :class:`dapdee.data.FrameNormalize`), the graph's input is the raw uint8
    frame and node `frame` turns it into the float input `module` expects, so a cut before any
    layer ships 1 byte per pixel. Timings are left empty (see `dapdee.profiler`). O(one forward pass)."""
    check_model_name(name)
    input_shape = check_input_shape(input_shape, f"{name}: input shape")
    try:
        gm = fx.symbolic_trace(module)
    except Exception as exc:
        raise ModelError(f"torch.fx cannot trace {name}: {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
    if frame is not None:
        _insert_frame_node(gm, frame, name)
    gm.eval()
    ex = GraphExecutor(gm)
    if len(ex.placeholders) != 1:
        raise ModelError(f"{name}: forward must take exactly one tensor input, it takes {len(ex.placeholders)}")
    in_name = ex.placeholders[0]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    out_nodes = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    if not out_nodes or not all(isinstance(n, fx.Node) for n in out_nodes):
        raise ModelError(f"{name}: forward must return a tensor or a tuple of tensors (one per exit)")
    modules = dict(gm.named_modules())
    _refuse_shared_in_place(gm, modules, name)
    try:
        x = example_input(input_shape, "uint8" if frame is not None else "float32", torch.Generator().manual_seed(0))
        env, flops = _run_once(ex, modules, in_name, x, [n.name for n in out_nodes])
    except Exception as exc:
        raise ModelError(
            f"{name} rejects input shape {list(input_shape)}: {type(exc).__name__}: {str(exc).splitlines()[0]}"
        ) from None
    for n in out_nodes:
        if not isinstance(env[n.name], torch.Tensor):
            raise ModelError(f"{name}: output {n.name} is not a tensor")
    nodes = _cost_nodes(gm, ex, modules, env, flops)
    graph = CostGraph(
        model=name,
        input=InputSpec(in_name, tuple(input_shape), str(x.dtype).removeprefix("torch."), _nbytes(x)),
        nodes=tuple(nodes),
        exits=tuple(Exit(en, n.name) for en, n in zip(exit_names(len(out_nodes)), out_nodes, strict=True)),
    )
    graph.validate()
    return gm, graph, ex


# ---- artifacts and loading ----------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _is_number(v: Any) -> bool:
    """Whether `v` is a finite int or float (not a bool; an int too large for a float is not)."""
    return is_finite_number(v)


def _is_count(v: Any, least: int) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _is_shape(v: Any, n: int) -> bool:
    return isinstance(v, list) and len(v) == n and all(_is_count(x, 1) for x in v)


def _is_unit(v: Any) -> bool:
    return _is_number(v) and 0 <= v <= 1


def _manifest_field(obj: dict[str, Any], key: str, ok: Any, want: str, where: str, prefix: str = "") -> None:
    """ModelError `where: field PREFIXkey: expected WANT, got V` unless `obj[key]` is absent,
    null, or passes `ok`. O(size of the field)."""
    v = obj.get(key)
    if v is not None and not ok(v):
        raise ModelError(f"{where}: field {prefix}{key}: expected {want}, got {shown(v)}")


def _check_preprocess(pre: Any, where: str) -> None:
    """ModelError naming the bad field of a manifest's `preprocess` recipe. A field that is
    absent takes its default (`FrameNormalize.from_recipe`, `capture_frames`); one that is null
    is refused like any other bad value. O(channels)."""
    if not isinstance(pre, dict):
        raise ModelError(f"{where}: field preprocess: expected an object")
    checks = (
        ("scale", lambda v: _is_number(v) and v > 0, "a finite number > 0"),
        ("mean", lambda v: isinstance(v, list) and v and all(_is_number(x) for x in v), "a list of numbers"),
        ("std", lambda v: isinstance(v, list) and v and all(_is_number(x) and x > 0 for x in v), "numbers > 0"),
        ("resize", lambda v: v in ("none", "pad", "bilinear"), "none, pad or bilinear"),
        ("channels", lambda v: v in ("as-is", "replicate"), "as-is or replicate"),
        (
            "source_shape",  # every frame is resized to it: bounded as an input is
            lambda v: _is_shape(v, 3) and math.prod(v) <= MAX_INPUT_ELEMENTS,
            f"3 positive integers [C, H, W], at most {MAX_INPUT_ELEMENTS} elements",
        ),
    )
    for key, ok, want in checks:
        if key in pre and pre[key] is None:
            raise ModelError(f"{where}: field preprocess.{key}: expected {want}, got null (leave it out: the default)")
        _manifest_field(pre, key, ok, want, where, "preprocess.")
    if isinstance(pre.get("mean"), list) and isinstance(pre.get("std"), list) and len(pre["mean"]) != len(pre["std"]):
        raise ModelError(f"{where}: field preprocess: mean and std have different lengths")


def _check_exits(exits: Any, where: str) -> None:
    """ModelError naming the bad entry of a manifest's `exits` list (a name given twice
    included: which accuracy holds would be a guess). O(exits)."""
    if not isinstance(exits, list):
        raise ModelError(f"{where}: field exits: expected a list of {{name, accuracy}} objects")
    seen: set[str] = set()
    for i, e in enumerate(exits):
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) or not e["name"]:
            raise ModelError(f"{where}: field exits[{i}]: expected an object with a name (a string)")
        if e["name"] in seen:
            raise ModelError(f"{where}: field exits[{i}].name: {e['name'][:80]!r} is given twice")
        seen.add(e["name"])
        for key in ("accuracy", "calib_accuracy", "train_accuracy"):
            _manifest_field(e, key, _is_unit, "null or a number in [0, 1]", where, f"exits[{i}].")


def _check_confidence_exits(ce: Any, where: str) -> None:
    """ModelError naming the bad field of a manifest's `confidence_exits` (`dapdee calibrate`'s
    record; `progressive_of` checks its per-exit outcomes). O(exits)."""
    if not isinstance(ce, dict):
        raise ModelError(f"{where}: field confidence_exits: expected an object")
    ts = ce.get("thresholds")
    if ts is not None and not isinstance(ts, dict):
        raise ModelError(f"{where}: field confidence_exits.thresholds: expected an object")
    for k, t in (ts or {}).items():
        if t is not None and not _is_unit(t):
            raise ModelError(f"{where}: field confidence_exits.thresholds.{k}: expected null or a number in [0, 1]")
    for split in ("calib", "test"):
        _manifest_field(ce, split, lambda v: isinstance(v, dict), "an object", where, "confidence_exits.")
        by_exit = f"confidence_exits.{split}."
        _manifest_field(ce.get(split) or {}, "by_exit", lambda v: isinstance(v, dict), "an object", where, by_exit)


def check_manifest(manifest: Any, where: str) -> dict[str, Any]:
    """`manifest` when its fields have the types and ranges the loaders read (model a spec
    string; optional name, dataset; classes a list of names; input_shape 4 positive integers;
    preprocess; exits a list of
    {name, accuracy null or in [0, 1]}; splits an object of sample counts; accuracy_split;
    confidence_exits); else ModelError `where: field F: ...` naming the field. O(size).
    The input shape is also held to `check_input_shape` (batch 1, bounded size)."""
    if not isinstance(manifest, dict) or "model" not in manifest:
        raise ModelError(f"{where} has no 'model' field")
    if not isinstance(manifest["model"], str) or not manifest["model"]:
        raise ModelError(f"{where}: field model: expected a model spec string, got {json.dumps(manifest['model'])}")
    for key in ("name", "dataset", "weights_sha256"):
        _manifest_field(manifest, key, lambda v: isinstance(v, str), "a string", where)
    _manifest_field(
        manifest,
        "classes",
        lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
        "a list of names",
        where,
    )
    _manifest_field(manifest, "input_shape", lambda v: _is_shape(v, 4), "4 positive integers [1, C, H, W]", where)
    if manifest.get("input_shape") is not None:
        check_input_shape(manifest["input_shape"], f"{where}: field input_shape")
    _manifest_field(
        manifest, "accuracy_split", lambda v: v in ("train", "calib", "test"), "train, calib or test", where
    )
    _manifest_field(manifest, "splits", lambda v: isinstance(v, dict), "an object", where)
    for split in ("train", "calib", "test"):
        _manifest_field(manifest.get("splits") or {}, split, lambda v: _is_count(v, 0), "a count", where, "splits.")
    if manifest.get("preprocess") is not None:
        _check_preprocess(manifest["preprocess"], where)
    if manifest.get("exits") is not None:
        _check_exits(manifest["exits"], where)
    if manifest.get("confidence_exits") is not None:
        _check_confidence_exits(manifest["confidence_exits"], where)
    return manifest


def read_manifest(artifact: str | Path) -> dict[str, Any]:
    """The artifact's manifest.json, checked (`check_manifest`): ModelError naming the file, or
    the field that a loader could not use. O(size)."""
    path = Path(artifact)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise ModelError(f"artifact {str(path)!r}: no {MANIFEST} (expected a directory written by `dapdee train`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser's stack
        reason = str(exc)[:200]
        raise ModelError(f"artifact {str(path)!r}: {MANIFEST} is not valid JSON ({reason})") from None
    return check_manifest(manifest, f"artifact {str(path)!r}: {MANIFEST}")


def load_weights(module: nn.Module, artifact: str | Path, manifest: dict[str, Any]) -> None:
    """Load `weights.safetensors` (never pickle) into `module`, checking the manifest's sha256."""
    from safetensors.torch import load_file

    wpath = Path(artifact) / WEIGHTS
    if not wpath.is_file():
        raise ModelError(f"artifact {str(artifact)!r}: no {WEIGHTS}")
    want = manifest.get("weights_sha256")
    if want and sha256_file(wpath) != want:
        raise ModelError(f"artifact {str(artifact)!r}: {WEIGHTS} does not match the manifest's sha256")
    try:
        state = load_file(str(wpath))
        _check_weights(state, module.state_dict())
        module.load_state_dict(state, strict=True)
    except Exception as exc:
        raise ModelError(
            f"artifact {str(artifact)!r} does not fit model {manifest.get('model')!r}: {str(exc).splitlines()[0]}"
        ) from None


def _check_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """ValueError naming the first tensor of `state` whose dtype differs from the module's
    (`load_state_dict` would cast it silently: float16 weights are not the model that was
    profiled) or, floating, that holds NaN or an infinity (a diverged run's weights answer
    garbage without an error). Names are `load_state_dict`'s to check. O(weights)."""
    for name, t in state.items():
        want = expected.get(name)
        if want is None:
            continue
        if t.dtype != want.dtype:
            raise ValueError(f"weight {name!r} is {t.dtype}, the model's is {want.dtype}")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"weight {name!r} holds NaN or an infinity")


@dataclass
class LoadedModel:
    """A ready-to-run model: module, fx graph, split executor and cost graph (no timings)."""

    name: str
    spec: str
    module: nn.Module
    gm: fx.GraphModule
    graph: CostGraph
    executor: GraphExecutor
    input_shape: tuple[int, ...]
    manifest: dict[str, Any] | None = None

    @property
    def input_name(self) -> str:
        return self.graph.input.name

    def example_input(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random input of the graph's shape and dtype (a uint8 frame for artifacts)."""
        return example_input(self.input_shape, self.graph.input.dtype, generator)

    def exit_node(self, exit_name: str | None = None) -> str:
        return self.graph.exit(exit_name).node

    def run_exit(self, x: torch.Tensor, exit_name: str | None = None) -> torch.Tensor:
        """The exit's logits for a whole-model run on the input batch `x`."""
        node = self.exit_node(exit_name)
        with torch.inference_mode():
            return self.executor.compute({self.input_name: x}, [node])[node]


def progressive_of(manifest: dict[str, Any] | None, where: str = MANIFEST) -> Progressive | None:
    """The cost graph's `progressive` field from an artifact manifest: the calibrated thresholds
    and the per-planned-exit outcomes `dapdee calibrate` recorded on the split the exits'
    accuracies are measured on (`accuracy_split`). None without such a record; ModelError
    `where: field confidence_exits ...` when it is malformed. O(exits²)."""
    ce = (manifest or {}).get("confidence_exits")
    split = (manifest or {}).get("accuracy_split") or "test"
    measured = ce.get(split) if isinstance(ce, dict) else None
    if not isinstance(measured, dict) or "by_exit" not in measured:
        return None
    raw = {
        "rule": ce.get("rule") or "max_softmax",
        "split": split,
        "thresholds": ce.get("thresholds"),
        "by_exit": measured["by_exit"],
    }
    try:
        return Progressive.from_dict(raw)
    except ValueError as exc:  # CostGraphError names the field under `progressive`
        raise ModelError(f"{where}: field confidence_exits ({split} split): {exc}") from None


def _artifact_spec(manifest: dict[str, Any], spec: str, artifact: str | Path) -> str:
    """The spec to build an artifact's model from: the caller's `spec` when given (it must be
    the manifest's), else the manifest's `model`, which must then be a `zoo:` spec: a
    `package.module:factory` spec would import a module and call a function that the
    manifest's writer chose, so it is built only when the caller names it too. ModelError
    naming the manifest otherwise. O(len(spec))."""
    trained = manifest["model"]
    if spec:
        if not _same_model(trained, spec):
            raise ModelError(f"artifact {str(artifact)!r} was trained for {trained!r}, not {spec!r}")
        return trained  # one spelling per artifact
    if not trained.startswith("zoo:"):
        raise ModelError(
            f"artifact {str(artifact)!r}: {MANIFEST}: field model: {trained!r} is not a zoo: spec; building it "
            "would import and run code that the file names, so it is only built when you name that spec yourself "
            "(--model; the edge worker's --models takes SPEC@ARTIFACT)"
        )
    return trained


def _same_model(a: str, b: str) -> bool:
    """Whether two specs build the same model: equal, or the same zoo model and options written
    in another order or number format (`width=0.5&in_channels=1` is `in_channels=1&width=.5`).
    O(len(a) + len(b))."""
    if a == b:
        return True
    try:
        pa, pb = parse_spec(a), parse_spec(b)
    except ModelError:
        return False
    return (pa.kind, pa.target, pa.options) == (pb.kind, pb.target, pb.options)


def _frame_of(manifest: dict[str, Any], shape: tuple[int, ...], where: str) -> FrameNormalize:
    """The artifact graph's first node, from the manifest's `preprocess` recipe, for a model of
    input `shape`; ModelError naming the manifest's field when the recipe cannot serve it."""
    try:
        return FrameNormalize.from_recipe(manifest["preprocess"], int(shape[1]) if len(shape) > 1 else 1)
    except DataError as exc:
        raise ModelError(f"{where}: field {exc}") from None


def load_model(
    spec: str,
    input_shape: tuple[int, ...] | None = None,
    weights: str | Path | None = None,
    name: str | None = None,
    frame_input: bool = True,
) -> LoadedModel:
    """Build, optionally load an artifact's weights, and trace. With an artifact, its manifest's
    spec, input shape, name and exit accuracies are used unless given explicitly (the manifest's
    spec only when it is a `zoo:` spec, `_artifact_spec`), and (unless `frame_input` is false)
    the graph takes the raw uint8 camera frame at the model's resolution, its first node `frame`
    normalising it as the manifest's `preprocess` says: a camera's frame is 1 byte per pixel, so
    that is what an Edge-Only plan ships. `module` stays the float-input network the artifact was
    trained as. The manifest's calibrated confidence exits, when recorded per planned exit, become
    the graph's `progressive` field (`progressive_of`). The input shape must pass
    `check_input_shape`. ModelError naming the spec, artifact or field otherwise."""
    manifest = None
    where = ""
    if weights is not None:
        manifest = read_manifest(weights)
        where = f"artifact {str(weights)!r}: {MANIFEST}"
        spec = _artifact_spec(manifest, spec, weights)
        input_shape = input_shape or tuple(manifest.get("input_shape") or ()) or None
        name = name or manifest.get("name")
    ms = parse_spec(spec)
    if input_shape is not None:
        check_input_shape(input_shape, "input shape")
    module = build_module(ms)
    if manifest is not None:
        load_weights(module, weights, manifest)
    shape = input_shape or default_input_shape(ms)
    if shape is None:
        raise ModelError(f"model spec {spec!r}: give --input-shape (e.g. 1,3,32,32)")
    frame = None
    if manifest is not None and frame_input and isinstance(manifest.get("preprocess"), dict):
        frame = _frame_of(manifest, tuple(shape), where)
    gm, graph, ex = trace(module, tuple(shape), check_model_name(name or ms.default_name), frame)
    if manifest is not None:
        acc = {e["name"]: e.get("accuracy") for e in manifest.get("exits") or [] if isinstance(e, dict)}
        graph = graph.with_accuracies(acc)
    progressive = progressive_of(manifest, where or MANIFEST)
    graph = CostGraph(graph.model, graph.input, graph.nodes, graph.exits, meta={"spec": spec}, progressive=progressive)
    try:
        graph.validate()
    except CostGraphError as exc:  # the calibrated record does not match the traced exits
        raise ModelError(f"{where or MANIFEST}: field confidence_exits: {exc}") from None
    return LoadedModel(graph.model, spec, module, gm, graph, ex, tuple(shape), manifest)
