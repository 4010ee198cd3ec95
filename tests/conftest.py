"""Settings shared by the whole suite."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# Generated-input tests: no per-example deadline (this 2-core host runs other suites beside
# them), and under CI a fixed seed sequence so that a failure there reproduces here.
settings.register_profile(
    "stockade",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=os.environ.get("CI") == "true",
)
settings.load_profile("stockade")
