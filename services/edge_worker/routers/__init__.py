"""HTTP routers of the edge worker."""
