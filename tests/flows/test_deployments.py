"""deployments/prefect.yaml: every entrypoint loads and every parameter set validates against its flow."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())


@pytest.mark.parametrize("deployment", SPEC["deployments"], ids=lambda d: d["name"])
def test_deployment_parameters_validate(deployment):
    from prefect.flows import load_flow_from_entrypoint

    path, _, name = deployment["entrypoint"].partition(":")
    flow = load_flow_from_entrypoint(f"{ROOT / path}:{name}")
    params = deployment.get("parameters", {})
    # What a worker does with the stored parameters before calling the flow.
    validated = flow.validate_parameters(params)
    assert set(params) <= set(validated)
    assert deployment["work_pool"]["name"] == "dataworth-gpu"
    for schedule in deployment.get("schedules", []):
        assert schedule["active"] is False  # shipped paths are the demo's; users switch schedules on


def test_bad_parameters_are_refused():
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(f"{ROOT / 'flows/evaluate.py'}:evaluate_flow")
    with pytest.raises(Exception, match="proj_dims"):
        flow.validate_parameters({"config": {"calibrate": {"proj_dims": [0]}}})


def test_log_shards_gets_log_gradients_arguments_typed():
    """The index flow's arguments for log_gradients reach a log-shards run as JSON; the flow types them back."""
    from dataworth.config import LoggingConfig, ModelConfig
    from flows.shards import for_workers, typed_arguments

    sent = {"index_uri": "rel/index", "model": ModelConfig(name_or_path=str(ROOT)), "logging": LoggingConfig()}
    args = for_workers(sent)
    assert args["index_uri"] == str(Path("rel/index").resolve()) and isinstance(args["model"], dict)
    typed = typed_arguments(args)
    assert typed["model"] == sent["model"] and typed["logging"] == sent["logging"]
    with pytest.raises(ValueError, match="no argument shard_count"):
        typed_arguments({"shard_count": 3})
