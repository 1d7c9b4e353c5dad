#!/usr/bin/env bash
# The peer attribution-graph library for benchmarks/attribution_peer.py: circuit-tracer 0.5.0 in its own venv
# (benchmarks/.venv-circuit-tracer, gitignored; never installed by the README's or the Makefile's commands: it pins
# an older transformers than the project's, with transformer-lens). torch is the CPU build, from the same wheel
# folder the Makefile uses (TORCH_LINKS: PIP_FIND_LINKS, pip's configured find-links, else PyTorch's CPU page).
# Then: benchmarks/.venv-circuit-tracer/bin/python benchmarks/attribution_peer.py
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=benchmarks/.venv-circuit-tracer
PYTHON=${PYTHON:-python3.11}
LINKS=${PIP_FIND_LINKS:-$($PYTHON -m pip config get global.find-links 2>/dev/null || true)}
LINKS=${LINKS:-https://download.pytorch.org/whl/cpu/torch/}
$PYTHON -m venv "$VENV"
"$VENV/bin/pip" install --quiet --find-links "$LINKS" "torch>=2.4"
"$VENV/bin/pip" install --quiet --find-links "$LINKS" "circuit-tracer==0.5.0"
"$VENV/bin/python" -c "import importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('circuit-tracer', 'transformer-lens', 'transformers', 'torch')), sep=', ')"
