#!/usr/bin/env bash
# The peer CLT trainer for benchmarks/clt.py: OpenMOSS's lm-saes, published as `llamascopium`, in its own venv
# (benchmarks/.venv-llamascopium; never installed by the README's or the Makefile's commands: it pins its own torch,
# transformer-lens, wandb, pymongo and openai). Then: python benchmarks/clt.py --peer benchmarks/.venv-llamascopium
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=benchmarks/.venv-llamascopium
python3.11 -m venv "$VENV"
"$VENV/bin/pip" install --quiet "llamascopium==2.0.0b34"
"$VENV/bin/python" -c "import llamascopium, torch; print('llamascopium', llamascopium.__version__ if hasattr(llamascopium, '__version__') else '?', 'torch', torch.__version__)"
