"""Evaluation configs reject what the flow could not run, before any training."""

import pytest
from pydantic import ValidationError

from dataworth.evaluation.config import BrittlenessConfig, CalibrateConfig, EvaluateConfig


def test_defaults_are_consistent():
    cfg = EvaluateConfig()
    assert set(cfg.brittleness.methods) <= {*cfg.score.modes, *cfg.baselines}
    assert cfg.logging.precondition == "kfac" and cfg.calibrate.proj_dims == []


def test_brittleness_method_must_be_scored():
    with pytest.raises(ValidationError, match=r"brittleness.methods \['bm25'\].*baselines"):
        EvaluateConfig(baselines=[], brittleness=BrittlenessConfig(methods=["bm25"]))
    # the default drops what this run does not score
    assert EvaluateConfig(baselines=[]).brittleness.methods == ["relatif"]
    assert EvaluateConfig(baselines=[], score={"modes": ["dot"]}).brittleness.methods == ["dot"]
    with pytest.raises(ValidationError, match=r"\['kronfluence'\]"):
        EvaluateConfig(brittleness=BrittlenessConfig(methods=["relatif", "kronfluence"]))
    # disabled brittleness does not care
    EvaluateConfig(baselines=[], brittleness=BrittlenessConfig(enabled=False))


def test_calibrate_proj_dims_are_positive_and_deduplicated():
    assert CalibrateConfig(proj_dims=[64, 16, 64]).proj_dims == [16, 64]
    with pytest.raises(ValidationError, match="positive projection sizes"):
        CalibrateConfig(proj_dims=[0, 16])


def test_fact_proxy_needs_a_fact_benchmark():
    with pytest.raises(ValidationError, match=r"calibrate.proxy='lds'"):
        EvaluateConfig(benchmark="lm-small", calibrate=CalibrateConfig(enabled=True))
    EvaluateConfig(benchmark="lm-small", calibrate=CalibrateConfig(enabled=True, proxy="lds"))
    EvaluateConfig(benchmark="lm-small", calibrate=CalibrateConfig(proxy="fact_mrr"))  # not enabled: nothing to check
    EvaluateConfig(benchmark="facts-medium", calibrate=CalibrateConfig(enabled=True))
