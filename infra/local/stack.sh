#!/usr/bin/env bash
# A local "cluster": a Ray head, a Prefect server and an MLflow server, each a real service.
# Usage: infra/local/stack.sh start|stop   (state under $MMFUSION_HOME/stack, default ./.mmfusion)
set -euo pipefail
home="${MMFUSION_HOME:-.mmfusion}"
state="$home/stack"
mkdir -p "$state"
export RAY_USAGE_STATS_ENABLED=0 DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false \
       MLFLOW_DISABLE_TELEMETRY=true

start() {
  # Every service on 127.0.0.1 (see infra/README.md, "Network exposure"). Ray's gRPC ports
  # listen on all interfaces whatever the flags, so Ray keeps token auth on (its token:
  # ~/.ray/auth_token, made on first start; `mmfusion` and `ray` read it from there).
  RAY_AUTH_MODE=token ray start --head --port 6379 --node-ip-address 127.0.0.1 \
      --dashboard-host 127.0.0.1 --disable-usage-stats >"$state/ray.log" 2>&1
  PREFECT_HOME="$home/prefect" nohup prefect server start --host 127.0.0.1 --port 4200 \
      >"$state/prefect.log" 2>&1 & echo $! >"$state/prefect.pid"
  nohup mlflow server --host 127.0.0.1 --port 5000 \
      --backend-store-uri "sqlite:///$(cd "$home" && pwd)/mlflow-server.db" \
      --artifacts-destination "$(cd "$home" && pwd)/mlflow-server-artifacts" \
      >"$state/mlflow.log" 2>&1 & echo $! >"$state/mlflow.pid"
  cat <<MSG
started. Point mmfusion at them (the same variables a real cluster uses):
  export RAY_ADDRESS=127.0.0.1:6379
  export PREFECT_API_URL=http://127.0.0.1:4200/api
  export MLFLOW_TRACKING_URI=http://127.0.0.1:5000
dashboards: Ray http://127.0.0.1:8265  Prefect http://127.0.0.1:4200  MLflow http://127.0.0.1:5000
logs in $state/
MSG
}

stop() {
  ray stop >/dev/null 2>&1 || true
  for svc in prefect mlflow; do
    [ -f "$state/$svc.pid" ] && kill "$(cat "$state/$svc.pid")" 2>/dev/null || true
    rm -f "$state/$svc.pid"
  done
  echo stopped
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
