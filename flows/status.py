"""What Prefect knows for `mmfusion status`: the last flow runs and the next scheduled one."""

from __future__ import annotations

from typing import Any


def _row(run, flow_names: dict) -> dict[str, Any]:
    duration = run.total_run_time.total_seconds() if run.total_run_time else None
    return {"flow": flow_names.get(run.flow_id, "?"), "name": run.name, "state": run.state_name,
            "start": run.start_time or run.expected_start_time, "duration_s": duration,
            "deployment_id": run.deployment_id}


def prefect_summary(last: int = 5) -> dict[str, Any]:
    """{"runs": the `last` flow runs, newest first; "next": the next scheduled run or None}."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        started = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(not_any_=[StateType.SCHEDULED])))
        runs = client.read_flow_runs(flow_run_filter=started, sort=FlowRunSort.START_TIME_DESC, limit=last)
        scheduled = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])))
        upcoming = client.read_flow_runs(flow_run_filter=scheduled, sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                                         limit=1)
        flow_names = {f.id: f.name for f in client.read_flows(limit=200)}
    return {"runs": [_row(r, flow_names) for r in runs],
            "next": _row(upcoming[0], flow_names) if upcoming else None}
