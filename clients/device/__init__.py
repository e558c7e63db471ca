"""The device runtime (`dapdee device run`, `dapdee up`), in parts with one job each:

- `types`: frames, plans, leases, per-frame records, the runtime's errors;
- `config`: requirements, runtime behaviour, planner access settings;
- `plans`: plans checked from a planner's answer, a fixed cut, or Device-Only;
- `plan_source`: where plans come from (`PlannerPlanSource` through the SDK, `FixedPlanSource`);
- `edge`: edge access through the SDK (validation, finite timeouts, token scope, back-off);
- `sensing`, `probe`: bandwidth, round trip and load, and the probes that keep them fresh;
- `profile`: the device profile, measured or loaded, published to the planner;
- `compute`: `TorchCompute` (real, K x emulated) and `EmulatedCompute` (sleeps, no CPU);
- `fallback`: the exit a locally finished frame leaves at;
- `runtime`: the frame loop, pipelining and readiness; `replanner`: re-planning;
- `frame_path`: one frame under a plan, and whether it may still go to the edge;
- `frames`: random inputs, datasets, image folders, videos and cameras;
- `report`, `metrics`: summaries, JSON lines, per-frame logs, Prometheus metrics;
- `session`: a live device assembled from settings; `commands`, `up`: the command line.
"""
