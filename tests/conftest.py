"""Shared pytest set-up: one torch thread, hypothesis profiles (ci: fewer examples, no deadline)."""

import os

import torch
from hypothesis import HealthCheck, settings

torch.set_num_threads(1)  # small models: one thread is fastest and deterministic across machines

settings.register_profile("ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
