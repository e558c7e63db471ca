"""The fleet benchmark's parts (`bench/fleet.py` is the command line):

- `scenario`: what one run is (system, N, K, model, requirements, the uplink mix) and the
  device profile the emulation sleeps and the planner plans with (profiled device time x K);
- `stack`: Redis, the planner and one edge worker (1 compute slot, batch 1) as `dapdee serve`
  subprocesses on 127.0.0.1 with tokens; the planner and the worker restarted per run;
- `systems`: how each compared system gets its plans;
- `devices`: the client process: N emulated devices on one event loop, each the real device
  runtime with `EmulatedCompute`, fed by a 10 frames/s camera that drops frames when full;
- `runner`: one run end to end (planner, client processes, warm-up, measured window);
- `metrics`: goodput, SLO attainment, percentiles, utilisation, plan changes, prediction error;
- `report`: the tables, the targets with PASS/FAIL and the plot.
"""
