"""Our attribution graph against circuit-tracer 0.5.0's on the same weights, transcoders and prompt (issue 31).

circuit-tracer pins an older transformers than the project, so it lives in its own venv
(``benchmarks/peer_envs/circuit_tracer.sh`` builds ``benchmarks/.venv-circuit-tracer``). This script runs in the
project's venv and calls itself in the peer's (``--peer DIR``, which imports circuit-tracer and never the workbench):

1. Ours: a random-init GPT-NeoX (Hugging Face, sequential blocks, full rotary, ``--layers`` × ``--d-model``), per-layer
   ReLU transcoders on ``hook_resid_mid`` → ``hook_mlp_out`` (b_enc set so ~``--l0`` latents per token fire), a
   ``--tokens`` prompt; the weights, transcoders and prompt go to DIR; ``attribute(..., heads=False)``, every active
   feature kept.
2. Peer: the same GPTNeoXForCausalLM state dict in the peer's transformers, converted to TransformerLens by TL's own
   ``convert_neox_weights``, inside circuit-tracer's ``TransformerLensReplacementModel`` (built from a
   ``HookedTransformerConfig``: no hub), the same transcoders as a ``TranscoderSet`` of ``SingleLayerTranscoder``;
   ``circuit_tracer.attribute`` and ``prune_graph``.
3. Compared: the logit targets, the active features, every edge between matched nodes, and the pruned node sets.
   circuit-tracer zeroes the first position's features and error (its BOS convention, ``zero_positions``), so the
   edges compared leave out sources at position 0 other than its token, and pruning is compared on our graph with
   the same convention applied (position-0 feature and error columns zeroed) through our own ``prune``.

    bash benchmarks/peer_envs/circuit_tracer.sh           # once
    python benchmarks/attribution_peer.py                 # 2 layers × d_model 64, 256 latents, 12 tokens
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PEER_PYTHON = Path(__file__).resolve().parent / ".venv-circuit-tracer" / "bin" / "python"


def neox_config(args: argparse.Namespace) -> dict:
    """GPTNeoXConfig keyword arguments both transformers versions read the same way."""
    return {"num_hidden_layers": args.layers, "hidden_size": args.d_model, "num_attention_heads": args.heads,
            "intermediate_size": 4 * args.d_model, "vocab_size": args.vocab, "max_position_embeddings": 256,
            "use_parallel_residual": False, "rotary_pct": 1.0, "partial_rotary_factor": 1.0, "rotary_emb_base": 10000,
            "hidden_act": "gelu", "layer_norm_eps": 1e-5, "tie_word_embeddings": False}  # fmt: skip


# ------------------------------------------------------------------------------------------------ peer side
class _IdTokenizer:
    """What circuit-tracer asks of a tokenizer when given token ids: the prompt's first token counts as its special
    (BOS) token, so ``ensure_tokenized`` prepends nothing and both graphs see the same positions."""

    def __init__(self, first: int, vocab_size: int):
        self.all_special_ids, self.bos_token_id, self.pad_token_id = [first], first, first
        self.vocab_size, self.padding_side = vocab_size, "right"

    def decode(self, ids) -> str:  # noqa: ANN001 (an id, a list or a tensor)
        return " ".join(str(int(i)) for i in torch.as_tensor(ids).reshape(-1))


def run_peer(folder: Path) -> None:
    """In the circuit-tracer venv: rebuild the model and transcoders from ``folder``, attribute, prune, save."""
    import transformers
    from circuit_tracer import attribute as ct_attribute
    from circuit_tracer.graph import prune_graph
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder, TranscoderSet
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.neox import convert_neox_weights

    meta = json.loads((folder / "meta.json").read_text())
    saved = torch.load(folder / "weights.pt", weights_only=True)
    config = transformers.GPTNeoXConfig(**meta["config"])
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    state = saved["model"]
    if "lm_head.weight" in state and hasattr(
        hf, "embed_out"
    ):  # transformers < 5 names the output head embed_out
        state["embed_out.weight"] = state.pop("lm_head.weight")
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not [k for k in missing if "rotary" not in k and "masked_bias" not in k], missing
    d_model, layers = meta["config"]["hidden_size"], meta["config"]["num_hidden_layers"]
    heads = meta["config"]["num_attention_heads"]
    cfg = HookedTransformerConfig(
        n_layers=layers, d_model=d_model, n_heads=heads, d_head=d_model // heads, d_mlp=4 * d_model,
        d_vocab=meta["config"]["vocab_size"], n_ctx=256, act_fn="gelu", normalization_type="LN",
        positional_embedding_type="rotary", rotary_dim=d_model // heads, rotary_base=10000,
        rotary_adjacent_pairs=False, parallel_attn_mlp=False, eps=1e-5, original_architecture="GPTNeoXForCausalLM",
        dtype=torch.float32, device="cpu",
    )  # fmt: skip
    transcoders = {}
    for layer in range(layers):
        tc = SingleLayerTranscoder(d_model, saved["W_enc"][layer].shape[1], torch.nn.ReLU(), layer, device=torch.device("cpu"),
                                   dtype=torch.float32)  # fmt: skip
        with torch.no_grad():
            tc.W_enc.copy_(saved["W_enc"][layer].T)  # theirs [d_transcoder, d_model]
            tc.W_dec.copy_(saved["W_dec"][layer])
            tc.b_enc.copy_(saved["b_enc"][layer])
            tc.b_dec.copy_(saved["b_dec"][layer])
        transcoders[layer] = tc
    model = TransformerLensReplacementModel(cfg)
    model.load_and_process_state_dict(convert_neox_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)  # fmt: skip
    model._configure_replacement_model(TranscoderSet(transcoders, "hook_resid_mid", "hook_mlp_out"))
    tokens = torch.tensor(meta["tokens"])
    model.tokenizer = _IdTokenizer(int(tokens[0]), cfg.d_vocab)  # offline: token ids only
    with torch.no_grad():
        logits = model(tokens[None])[0, -1]
    start = time.perf_counter()
    graph = ct_attribute(tokens, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=meta["batch_size"],
                         max_feature_nodes=None)  # fmt: skip
    seconds = time.perf_counter() - start
    pruned = prune_graph(graph, 0.8, 0.98)
    torch.save({"adjacency": graph.adjacency_matrix, "active": graph.active_features,
                "selected": graph.selected_features,
                "logit_tokens": torch.tensor([int(t.vocab_idx) for t in graph.logit_targets]),
                "node_mask": pruned.node_mask, "logits": logits, "seconds": seconds}, folder / "peer.pt")  # fmt: skip


# ------------------------------------------------------------------------------------------------ our side
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--peer", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--latents", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--l0", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    if args.peer is not None:
        run_peer(args.peer)
        return
    if not PEER_PYTHON.exists():
        sys.exit(
            f"error: {PEER_PYTHON} is missing; build it with bash benchmarks/peer_envs/circuit_tracer.sh"
        )
    compare(args)


def compare(args: argparse.Namespace) -> None:
    import transformers

    from workbench.circuits.attribution.graph import attribute
    from workbench.circuits.attribution.pruning import prune
    from workbench.circuits.sae.base import SAEConfig, create_sae
    from workbench.model import HookedModel

    torch.manual_seed(0)
    config = transformers.GPTNeoXConfig(**neox_config(args))
    hf = transformers.GPTNeoXForCausalLM(config).eval()
    model = HookedModel.from_hf(hf, None, name="peer-neox")
    tokens = torch.randint(args.vocab, (args.tokens,), generator=torch.Generator().manual_seed(1))
    names = [f"blocks.{layer}.hook_resid_mid" for layer in range(args.layers)]
    with torch.no_grad(), model.capture(names, device=None) as cache:
        logits = model(tokens[None])[0, -1]
    saes = {}
    for layer in range(args.layers):
        sae = create_sae(SAEConfig("relu", d_in=args.d_model, d_sae=args.latents, hook_in=names[layer],
                                   hook_out=f"blocks.{layer}.hook_mlp_out"))  # fmt: skip
        with torch.no_grad():
            sae.b_dec.normal_(0, 0.1)
            pre = cache[names[layer]][0] @ sae.W_enc
            sae.b_enc.fill_(-float(torch.quantile(pre.flatten(), 1 - args.l0 / args.latents)))
        saes[layer] = sae.eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "meta.json").write_text(json.dumps({"config": neox_config(args), "tokens": tokens.tolist(),
                                                      "batch_size": args.batch_size}))  # fmt: skip
        torch.save({"model": hf.state_dict(), "W_enc": [s.W_enc.detach() for s in saes.values()],
                    "W_dec": [s.W_dec.detach() for s in saes.values()], "b_enc": [s.b_enc.detach() for s in saes.values()],
                    "b_dec": [s.b_dec.detach() for s in saes.values()]}, folder / "weights.pt")  # fmt: skip
        start = time.perf_counter()
        graph = attribute(
            model, saes, tokens, max_feature_nodes=10**9, batch_size=args.batch_size, heads=False
        )
        ours_seconds = time.perf_counter() - start
        run = subprocess.run(
            [str(PEER_PYTHON), __file__, "--peer", str(folder)], capture_output=True, text=True
        )
        if run.returncode != 0:
            tail = run.stderr.strip().splitlines()[-12:]
            sys.exit("error: circuit-tracer's run failed:\n" + "\n".join(tail))
        peer = torch.load(folder / "peer.pt", weights_only=True)
    print(f"GPT-NeoX {args.layers} layers × d_model {args.d_model} (random init), {args.latents} latents per layer, "
          f"{args.tokens} tokens; circuit-tracer 0.5.0 in {PEER_PYTHON.parent.parent.name}")  # fmt: skip
    print(f"model logits, ours vs TransformerLens in the peer venv: max |difference| "
          f"{float((logits - peer['logits']).abs().max()):.2e}")  # fmt: skip
    ours_targets = [t.token for t in graph.targets]
    theirs_targets = peer["logit_tokens"].tolist()
    print(f"logit targets: ours {ours_targets}, circuit-tracer {theirs_targets}")
    # node maps: features by (layer, position, feature); errors, tokens and logits by position in their blocks
    ours_features = {tuple(f): i for i, f in enumerate(graph.features.tolist())}
    theirs_active = peer["active"][peer["selected"]].tolist()
    n_pos, n_layers = len(tokens), args.layers
    later = [tuple(f) for f in theirs_active]
    ours_later = [f for f in ours_features if f[1] > 0]
    print(f"active features at positions ≥ 1: ours {len(ours_later)}, circuit-tracer {len(later)}, "
          f"same set: {set(ours_later) == set(later)} (circuit-tracer zeroes position 0's features: BOS)")  # fmt: skip
    n_theirs = len(later)
    mine_index, theirs_index = [], []
    for j, f in enumerate(later):
        if f in ours_features:
            mine_index.append(ours_features[f])
            theirs_index.append(j)
    offset_ours, offset_theirs = graph.n_features, n_theirs
    for k in range(n_layers * n_pos + n_pos):  # errors then tokens, same order in both
        mine_index.append(offset_ours + k)
        theirs_index.append(offset_theirs + k)
    shared_targets = [t for t in ours_targets if t in theirs_targets]
    for token in shared_targets:
        mine_index.append(graph.n_nodes - graph.n_targets + ours_targets.index(token))
        theirs_index.append(peer["adjacency"].shape[0] - len(theirs_targets) + theirs_targets.index(token))
    mine = torch.tensor(mine_index)
    theirs = torch.tensor(theirs_index)
    a_ours = graph.adjacency[mine][:, mine].double()
    a_theirs = peer["adjacency"][theirs][:, theirs].double()
    kinds = graph.node_kinds()
    positions = graph.nodes()["position"].to_numpy()
    keep = torch.tensor([not (kinds[i] in ("feature", "error") and positions[i] == 0) for i in mine_index])
    difference = float((a_ours - a_theirs)[:, keep].abs().max())
    scale = float(a_ours[:, keep].abs().max())
    print(f"adjacency over {len(mine)} matched nodes (sources at position 0 other than its token left out): max "
          f"|ours − circuit-tracer| = {difference:.2e} (largest |edge| {scale:.3g}, relative {difference / scale:.2e})")  # fmt: skip
    # pruning: our graph with circuit-tracer's BOS convention, pruned by our prune, against its prune_graph
    bos = torch.tensor([kinds[i] in ("feature", "error") and positions[i] == 0 for i in range(graph.n_nodes)])
    graph.adjacency[:, bos] = 0
    pruned = prune(graph)
    ours_kept = {("n", int(i)) for i in mine[pruned.nodes[mine]].tolist()}
    theirs_mask = peer["node_mask"][theirs]
    theirs_kept = {("n", int(mine[k])) for k in torch.nonzero(theirs_mask).flatten().tolist()}
    print(f"pruned nodes (0.8 / 0.98): ours {len(ours_kept)}, circuit-tracer {len(theirs_kept)}, in both "
          f"{len(ours_kept & theirs_kept)}, same set: {ours_kept == theirs_kept}")  # fmt: skip
    print(f"time: ours {ours_seconds:.2f} s, circuit-tracer {peer['seconds']:.2f} s (wall clock, batch "
          f"{args.batch_size}, same machine, one after the other)")  # fmt: skip


if __name__ == "__main__":
    main()
