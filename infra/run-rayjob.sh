#!/bin/sh
# Run by cronjob-rayjob.yaml's CronJob: create one RayJob from the template and wait for it to end, so that the
# CronJob's concurrencyPolicy: Forbid keeps nightly runs from overlapping. Exit 0 only if the Ray job succeeded.
set -eu
template="${RAYJOB_TEMPLATE:-/etc/dit4sr/rayjob.yaml}"
name=$(kubectl create -f "$template" -o jsonpath='{.metadata.name}')
echo "created rayjob/$name"
while :; do
  state=$(kubectl get rayjob "$name" -o jsonpath='{.status.jobDeploymentStatus}/{.status.jobStatus}')
  case "$state" in
    Complete/SUCCEEDED) echo "rayjob/$name succeeded"; exit 0 ;;
    Complete/*|Failed/*) echo "rayjob/$name ended: $state (see: kubectl describe rayjob $name)"; exit 1 ;;
  esac
  sleep "${POLL_SECONDS:-60}"
done
