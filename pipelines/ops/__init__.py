"""Service management for `mmfusion stack`: real local servers (PostgreSQL, Prefect server and a
process worker, MLflow server, a Ray head and one Ray worker node), each bound to 127.0.0.1.

`procs` starts and stops process groups, `postgres` runs a private PostgreSQL cluster, `stack`
knows the services, their order, their health checks and the state file under
`$MMFUSION_HOME/stack/`. Nothing here imports Prefect: the servers are separate processes.
"""

from pipelines.ops.stack import Stack, StackError

__all__ = ["Stack", "StackError"]
