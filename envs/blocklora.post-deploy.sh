#!/usr/bin/env bash
# Runs inside the new conda environment (snakemake --sdm conda): installs blocklora itself from the
# checkout the workflow runs from (BLOCKLORA_REPO, set by workflow/rules/common.smk), so that run
# records carry its version. Its dependencies are already there, pinned by envs/blocklora.yaml.
set -euo pipefail
python -m pip install --no-deps -e "${BLOCKLORA_REPO:?run through snakemake, which sets BLOCKLORA_REPO}"
