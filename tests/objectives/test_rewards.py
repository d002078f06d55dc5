"""The built-in rewards on a table of answers, their weighted sum, and user reward functions."""

import numpy as np
import pytest

from openvlm_jax.console import UserError
from openvlm_jax.objectives import rewards

# answer, reference, question -> relaxed, numeric, exact, format
TABLE = [
    ('15', '15', '', 1.0, 1.0, 1.0, 1.0),
    ('15.', '15', '', 1.0, 1.0, 1.0, 1.0),  # trailing punctuation is stripped
    ('14', '15', '', 0.0, 1 - 1 / 15, 0.0, 1.0),
    ('20', '20.5', '', 1.0, 1 - 0.5 / 20.5, 0.0, 1.0),  # within 5%
    ('1,500', '1500', '', 1.0, 1.0, 1.0, 1.0),  # thousands separator
    ('1.5k', '1500', '', 1.0, 1.0, 1.0, 1.0),
    ('12 mm', '12', 'How long is it, in mm?', 1.0, 1.0, 1.0, 1.0),  # the question's unit
    ('about 15', '15', '', 0.0, 0.0, 0.0, 0.0),  # not a bare number
    ('', '15', '', 0.0, 0.0, 0.0, 0.0),
    ('45', '15', '', 0.0, 0.0, 0.0, 1.0),  # relative error capped at 1
    ('0', '0', '', 1.0, 1.0, 1.0, 1.0),  # a zero reference asks for equal texts
    ('1', '0', '', 0.0, 0.0, 0.0, 1.0),
    ('Paris', 'paris', '', 1.0, 1.0, 1.0, 0.0),  # a label: equal texts
]


@pytest.mark.parametrize('answer,reference,question,relaxed,numeric,exact,format_', TABLE)
def test_built_in_rewards(answer, reference, question, relaxed, numeric, exact, format_):
  got = [rewards.BUILT_IN[name](answer, reference, question)
         for name in ('relaxed', 'numeric', 'exact', 'format')]
  np.testing.assert_allclose(got, [relaxed, numeric, exact, format_], rtol=1e-6)


def test_the_reward_is_the_weighted_sum_and_user_functions_import(tmp_path, monkeypatch):
  (tmp_path / 'my_rewards.py').write_text(
      'def short(answer, reference, question):\n  return float(len(answer) <= 1)\n')
  monkeypatch.syspath_prepend(str(tmp_path))
  spec = rewards.parse_rewards((('numeric', 1.0), ('format', 0.5), ('my_rewards:short', 2.0)))
  total, named = rewards.score_rewards(spec, ['14', 'x'], ['15', '15'], ['', ''])
  np.testing.assert_allclose(total, [1 - 1 / 15 + 0.5, 2.0], rtol=1e-6)
  assert sorted(named) == ['format', 'my_rewards:short', 'numeric']
  assert total.dtype == np.float32
  with pytest.raises(UserError, match="cannot import 'string:no_such_function'"):
    rewards.parse_rewards((('string:no_such_function', 1.0),))
  with pytest.raises(UserError, match='rewards is empty'):
    rewards.parse_rewards(())
