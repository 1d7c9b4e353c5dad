#!/usr/bin/env bash
# The peer CLT trainer for benchmarks/clt.py: OpenMOSS's lm-saes, published as `llamascopium`, in its own venv
# (benchmarks/.venv-llamascopium; never installed by the README's or the Makefile's commands: it pins its own torch,
# transformer-lens, wandb, pymongo and openai). The CPU build of torch goes in first, from the same wheel folder as
# the Makefile's (PIP_FIND_LINKS or pip's global.find-links, else PyTorch's CPU page): left to itself pip picks the
# CUDA build from PyPI (4.8 GB of wheels).
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=benchmarks/.venv-llamascopium
python3.11 -m venv "$VENV"
LINKS="${PIP_FIND_LINKS:-$(python3 -m pip config get global.find-links 2>/dev/null || true)}"
LINKS="${LINKS:-https://download.pytorch.org/whl/cpu/torch/}"
"$VENV/bin/pip" install --quiet --find-links "$LINKS" "torch==2.13.0+cpu"
# transformer-lens below 4: llamascopium 2.0.0b34 imports HookedTransformer, which TransformerLens 4.0 removed
# (left to itself pip resolves 4.x and `import llamascopium` fails with that ImportError).
"$VENV/bin/pip" install --quiet --find-links "$LINKS" "torch==2.13.0+cpu" "llamascopium==2.0.0b34" "transformer-lens>=2.16.2,<4"
"$VENV/bin/python" -c "import llamascopium, importlib.metadata as m; print(*(f'{p} {m.version(p)}' for p in ('llamascopium', 'transformer-lens', 'transformers', 'torch')), sep=', ')" 2>&1 | grep -v -e UserWarning -e autocast
