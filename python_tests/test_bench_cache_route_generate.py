"""``benchmarks.cache_route_generate`` runs its three arms (two decoding steps) and reports the check."""

from __future__ import annotations

from benchmarks import cache_route_generate


def test_three_arms_and_the_check(capsys):
    cache_route_generate.main(["--repeats", "1", "--new-tokens", "2"])
    out = capsys.readouterr().out
    assert "the first generate's check: True" in out
    for arm in ("plain", "grown", "recomputed"):
        assert f"  {arm} " in out
