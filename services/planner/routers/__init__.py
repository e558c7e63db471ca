"""The planner's HTTP routes, one module per area."""
