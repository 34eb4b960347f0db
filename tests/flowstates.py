"""Task-run states of a finished flow run, read back from the Prefect API."""


def task_states(flow_state) -> dict[str, str]:
    """task run name -> state name (Completed, Cached, ...) of the flow run behind `flow_state`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id]))
        )
    return {r.name: r.state.name for r in runs}
