#!/usr/bin/env bash
# `make demo`: the whole system for real on the local cluster. The operator is
# installed with its Helm chart and runs from its own pods; the research team's
# agents and workflow engine run as real processes on the process node.
#
# It can run again: the cluster is reused, the chart upgraded, the example
# re-applied, and a new run started. `make demo-down` removes everything.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
venv="$repo/.venv/bin"
export PATH="$venv:$PATH"
bin=$(tools/build-controlplane.sh)
helm="$bin/helm"
namespace=research

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "Local control plane, kwok nodes, process node and NATS"
eval "$("$venv/python" -m troupe_devcluster up)"
export KUBECONFIG NATS_URL
kubectl get nodes

step "Troupe operator and gateway, installed with its Helm chart"
"$helm" upgrade --install troupe charts/troupe --namespace troupe-system --create-namespace \
  --set nats.url="$NATS_URL" --wait --timeout 3m
kubectl -n troupe-system get pods -o wide

step "The research team (examples/research-team): a local model, an MCP tool server, three agents"
kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -k examples/research-team -n "$namespace"
# The model server loads a 93 MB model; the provider turns Ready once its probe reaches it.
kubectl rollout status -n "$namespace" deployment/model-server deployment/research-library --timeout=300s
kubectl wait --for=condition=Ready -n "$namespace" modelprovider/local --timeout=180s
kubectl wait --for=condition=Ready -n "$namespace" agents --all --timeout=180s
kubectl wait --for=condition=Ready -n "$namespace" workflow/research --timeout=180s
kubectl wait --for=condition=Ready -n "$namespace" budget/research-daily --timeout=60s
kubectl get modelproviders,agents,workflows,budgets -n "$namespace"

step "A run: research the topic 'jetstream'"
run="demo-$(date +%s)"
failed=""
result=$(troupe run research -n "$namespace" --id "$run" --input '{"topic": "jetstream"}' --wait -o json) ||
  failed=1
"$venv/python" -c '
import json, sys
result = json.loads(sys.argv[1])
print("run", result["run"] + ":", result["status"])
if result["error"]:
    print("error:", result["error"])
output = result["output"] or {}
print(output.get("report", json.dumps(output, indent=2)))
' "$result"

step "Its step timeline, with each step's tokens and cost"
troupe runs show research "$run" -n "$namespace"
if [ -n "$failed" ]; then
  echo "the run did not succeed: kubectl logs -n $namespace deployment/analyst (or writer) says why" >&2
  exit 1
fi

step "Ask the analyst directly, its tokens streamed as the model writes them"
troupe send analyst -n "$namespace" --stream --data '{"topic": "kubernetes", "facts": [
  "Controllers reconcile desired and observed state (k8s-docs)",
  "Custom resources extend the API (k8s-docs)",
  "Pod Security admission enforces profiles per namespace (k8s-docs)"]}'

# The gateway comes with the chart (gateway.enabled, on by default; skipped when disabled).
gateway="http://<a gateway pod IP>:8080"
if kubectl get deployment -n troupe-system troupe-gateway >/dev/null 2>&1; then
step "Call the analyst through the gateway: plain HTTP with a ServiceAccount token RBAC allows"
# troupe-invoker (from the chart) grants the virtual verb invoke on agents and workflows.
kubectl create serviceaccount demo-caller -n "$namespace" --dry-run=client -o yaml | kubectl apply -f -
kubectl create rolebinding demo-caller-invokes --clusterrole=troupe-invoker \
  --serviceaccount="$namespace:demo-caller" -n "$namespace" --dry-run=client -o yaml | kubectl apply -f -
# The process node has no Service networking: call a gateway pod on its own IP.
gateway="http://$(kubectl get pods -n troupe-system -l app.kubernetes.io/name=troupe-gateway \
  --field-selector=status.phase=Running -o jsonpath='{.items[0].status.podIP}'):8080"
question='{"topic": "nats", "facts": ["JetStream persists streams (nats-docs)",
  "KV buckets are streams with one subject per key (nats-docs)"]}'
echo "without a token:"
troupe call agent analyst -n "$namespace" --gateway "$gateway" --token "" --data "$question" ||
  echo "(refused, exit $?)"
echo "with demo-caller's token:"
troupe call agent analyst -n "$namespace" --gateway "$gateway" --timeout 180 \
  --token "$(kubectl create token demo-caller -n "$namespace")" --data "$question"
fi

step "What the namespace spent today, against its Budget"
kubectl get budgets -n "$namespace" -o wide

step "Key metrics, from each agent's /metrics"
kubectl get pods -n "$namespace" -l troupe.dev/agent \
  -o jsonpath='{range .items[*]}{.metadata.labels.troupe\.dev/agent} {.status.podIP}{"\n"}{end}' |
  "$venv/python" tools/agent_metrics.py
troupe top -n "$namespace" --once --interval 1

cat <<EXPLORE

Explore:
  eval "\$(make -s cluster-env)"; export PATH="$venv:\$PATH"
  kubectl get agents,workflows,pods -n $namespace
  troupe run research -n $namespace --input '{"topic": "kubernetes"}' --wait
  troupe runs list research -n $namespace
  troupe state get notes popularity.jetstream -n $namespace
  troupe send writer -n $namespace --stream --data '{"topic": "nats", "key_points": ["…"]}'
  kubectl get agents -n $namespace -o wide        # tokens and cost over the last hour
  kubectl get budgets -n $namespace -o wide       # the day's spending against its caps
  kubectl get modelprovider local -n $namespace -o yaml
  troupe dlq list retriever -n $namespace
  troupe call agent analyst -n $namespace --gateway $gateway \\
    --token "\$(kubectl create token demo-caller -n $namespace)" --data '{"topic": "kv", "facts": []}'
Tear down:
  make demo-down
EXPLORE
