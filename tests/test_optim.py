"""The learning-rate schedules of `optim.learning_rate_schedule`."""

import ml_collections
import numpy as np
import pytest

from mmelectra import errors, optim


def _opt(schedule, **kw):
  return ml_collections.ConfigDict(dict(learning_rate=1e-3, warmup_steps=100, schedule=schedule,
                                        end_learning_rate_fraction=0.0, decay_fraction=0.2, **kw))


def _rates(schedule, steps):
  return np.array([float(schedule(s)) for s in steps])


def test_linear_warms_up_then_decays_over_every_later_step():
  rates = _rates(optim.learning_rate_schedule(_opt("linear"), 1000), [0, 50, 100, 550, 1000])
  np.testing.assert_allclose(rates, [0.0, 5e-4, 1e-3, 5e-4, 0.0], atol=1e-9)


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
  c = _opt("wsd")
  c.end_learning_rate_fraction = 0.1
  rates = _rates(optim.learning_rate_schedule(c, 1000), [0, 100, 500, 800, 900, 1000, 1200])
  # Warmup to 1e-3 by step 100, flat to step 800, then linear to 1e-4 over the last 200.
  np.testing.assert_allclose(rates, [0.0, 1e-3, 1e-3, 1e-3, 5.5e-4, 1e-4, 1e-4], atol=1e-9)


def test_wsd_decay_longer_than_the_steps_after_warmup_is_all_decay():
  c = _opt("wsd")
  c.decay_fraction = 1.0
  rates = _rates(optim.learning_rate_schedule(c, 200), [100, 150, 200])
  np.testing.assert_allclose(rates, [1e-3, 5e-4, 0.0], atol=1e-9)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_wsd_rejects_a_decay_fraction_outside_0_1(fraction):
  c = _opt("wsd")
  c.decay_fraction = fraction
  with pytest.raises(errors.InvalidInput, match="decay_fraction"):
    optim.learning_rate_schedule(c, 1000)


def test_unknown_schedule_is_named():
  with pytest.raises(errors.InvalidInput, match="'step'"):
    optim.learning_rate_schedule(_opt("step"), 1000)
