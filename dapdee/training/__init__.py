"""Offline joint training of early-exit models (BranchyNet loss), evaluation of artifacts and
calibration of confidence exits. Heavy imports stay inside the submodules."""
