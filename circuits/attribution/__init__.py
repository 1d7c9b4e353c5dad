"""Attribution graphs: the complete local-replacement graph of a prompt (features, errors, inputs, targets and every
direct effect between them), pruned and scored as circuit-tracer does. One job per module: ``transcoders`` (one
interface over per-layer and cross-layer transcoders), ``replacement`` (the frozen local replacement model),
``graph`` (targets, batched rows, ``attribute`` → :class:`~workbench.circuits.attribution.graph.Graph`),
``pruning`` (influence, pruning, replacement and completeness scores), ``heads`` (head loadings), ``qk`` (why a
head attended: QK attribution), ``store`` (the workspace tables), ``batch`` (many prompts as a resumable job),
``cli`` (the ``workbench circuits`` commands). The package imports nothing at start-up (its modules load torch
models and transformers), so mounting its commands stays cheap."""
