"""Planning for a fleet of devices that share edge workers (docs/DESIGN.md, "The shared edge").

- `assign`: one device's exact plan given the other devices' leases (edge load from their
  reservations, the admission threshold, the choice of worker).
- `rebalance`: all leases of one worker re-solved together (a multiple-choice knapsack,
  exact for up to 64 leases per worker).
"""
