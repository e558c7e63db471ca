"""The paper's evaluation (Ding et al., JEIT 2025), measured end to end through the services.

`python bench/paper.py [--quick | --smoke]` (or `dapdee bench paper`) starts the planner and
one edge worker as `dapdee serve` processes on 127.0.0.1, starts an emulated device (the device
runtime, K x slower than this machine) against them per model, and runs real Fashion-MNIST test
images through every planner's plan over a token-bucket-shaped uplink: light load, heavy load,
the Figure 6 and 7 analogues, prediction fidelity and adaptation. Parts, one job each:

- `options`: what is measured (models, networks, frames, sweeps) from the command line;
- `systems`: the services and the devices, and the plan requests (DAPDEE and baselines);
- `measure`: one fixed plan through the device runtime (`FixedPlanSource`);
- `experiments`, `adaptation`, `runner`: the cells, cached in `cells`;
- `scoring`: the target lines, the noise band, fidelity; `report`, `plots`: the outputs;
- `cli`: the entry point.
"""
