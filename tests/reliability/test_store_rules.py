"""The store rule under generated sequences of real operations (see store_machine.py): a few short examples here,
500+ steps in benchmarks/store_rules.py."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings

from .store_machine import StoreMachine

pytestmark = [pytest.mark.reliability, pytest.mark.slow]

TestStoreRule = StoreMachine.TestCase
TestStoreRule.settings = settings(max_examples=5, stateful_step_count=10, deadline=None, database=None,
                                  suppress_health_check=list(HealthCheck))
