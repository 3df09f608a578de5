import numpy as np

from pfn.evaluate import Cases, last_value, score


def _rising_cases(n: int, rise: float) -> Cases:
    """n straight lines from 0.2 rising by ``rise`` over 20 epochs, cut after 5."""
    x = np.arange(1.0, 21.0)
    y = 0.2 + rise * (x - 1) / 19
    return Cases([x[:5]] * n, [y[:5]] * n, [x[5:]] * n, [y[5:]] * n, np.full(n, 20.0))


def test_above_90_counts_the_points_over_the_interval():
    """The last value's N(y_5, 0.05^2) misses rising curves on the upper side only: a steep
    rise puts every later point beyond z = 1.645 sd whose offset exceeds 0.082; a flat curve
    puts none there."""
    steep = _rising_cases(3, 0.5)
    r = score(steep, last_value(steep), "s", "5", "last_value")
    y = np.concatenate(steep.yq[:1])
    expect = float((y - steep.y[0][-1] > 1.6448536 * 0.05).mean())
    assert 0.5 < expect < 1 and abs(r.above_90 - expect) < 1e-9
    assert abs(r.coverage_90 + r.above_90 - 1) < 1e-9  # nothing below
    flat = _rising_cases(3, 0.0)
    r = score(flat, last_value(flat), "f", "5", "last_value")
    assert r.above_90 == 0 and r.coverage_90 == 1
