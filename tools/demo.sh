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

step "Troupe operator, installed with its Helm chart"
"$helm" upgrade --install troupe charts/troupe --namespace troupe-system --create-namespace \
  --set nats.url="$NATS_URL" --wait --timeout 3m
kubectl -n troupe-system get pods -o wide

step "The research team (examples/research-team)"
kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -
kubectl apply -k examples/research-team -n "$namespace"
kubectl wait --for=condition=Ready -n "$namespace" agents --all --timeout=180s
kubectl wait --for=condition=Ready -n "$namespace" workflow/research --timeout=180s
kubectl get agents,workflows -n "$namespace"

step "A run: research the topic 'jetstream'"
run="demo-$(date +%s)"
troupe run research -n "$namespace" --id "$run" --input '{"topic": "jetstream"}' --wait

step "Its step timeline"
troupe runs show research "$run" -n "$namespace"

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
  troupe dlq list retriever -n $namespace
Tear down:
  make demo-down
EXPLORE
