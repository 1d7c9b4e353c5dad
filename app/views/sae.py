"""SAE features: evaluation table, searchable latent list and feature pages (top contexts, quantile samples,
histogram, logit effects)."""

from __future__ import annotations

import json
import math

import plotly.graph_objects as go
import streamlit as st

from workbench.app.data import empty_state, model_select, open_workspace_or_stop, pick, plain, table
from workbench.circuits.sae.analysis import ANALYSIS
from workbench.circuits.sae.clt_analysis import REPLACEMENT, replacement_layers
from workbench.circuits.sae.formats.transfer import imported_saes

EVALS, FEATURES = (t.name for t in ANALYSIS.tables)
(REPLACED,) = REPLACEMENT.table_names
COMMAND = (
    f"{ANALYSIS.command}    # e.g. workbench sae train code-tiny --data zoo:python-stdlib "
    "--hook blocks.0.hook_resid_post"
)

st.title("SAE features")
db = open_workspace_or_stop()
evals = table(db, EVALS)
all_evals = evals  # every dataset's rows: the replacement section picks its own
features = table(db, FEATURES)
imported = imported_saes(db.parent)
if not imported.empty:
    with st.expander(f"Imported SAEs ({len(imported)})", expanded=evals is None or evals.empty):
        st.dataframe(imported, width="stretch", hide_index=True)
        st.caption(
            "Imported with `workbench sae import PATH`. Score one with `workbench sae eval ID MODEL --data "
            "DATA`, its feature pages with `workbench sae features ID MODEL --data DATA`."
        )
if (evals is None or evals.empty) and (features is None or features.empty):
    empty_state("SAE evaluations and feature pages", COMMAND)
    st.stop()

if evals is not None and not evals.empty:
    st.subheader("Evaluations")
    if "dataset" in evals and evals["dataset"].nunique() > 1:  # the same SAEs scored on several datasets
        evals = evals[evals["dataset"] == st.selectbox("dataset", sorted(evals["dataset"].dropna().unique()))]
    columns = [
        c
        for c in [
            "sae_id",
            "model",
            "checkpoint",
            "dataset",
            "hook",
            "hook_out",
            "architecture",
            "transcoder",
            "d_sae",
            "k",
            "L0",
            "FVU",
            "explained_variance",
            "cosine",
            "ce_recovered",
            "kl",
            "ce_clean",
            "ce_spliced",
            "ce_zero",
            "dead_fraction",
            "dense_fraction",
            "ce_note",
        ]
        if c in evals.columns
    ]
    st.dataframe(evals[columns], width="stretch", hide_index=True)
    tradeoff = go.Figure(
        go.Scatter(
            x=evals["L0"],
            y=evals["FVU"],
            mode="markers+text",
            text=evals["sae_id"],
            textposition="top center",
        )
    )
    tradeoff.update_layout(
        title="Sparsity vs reconstruction", xaxis_title="L0", yaxis_title="FVU", height=360
    )
    st.plotly_chart(tradeoff, width="stretch")

replaced = table(db, REPLACED)
if replaced is not None and not replaced.empty:  # CLTs and transcoder sets scored as a replacement model
    st.subheader("Replacement model (transcoders)")
    st.caption(
        "Every MLP output replaced by the transcoders at once (errors off), on held-out text: next-token loss, "
        "KL against the model's own predictions, and the share of the model's loss gain over a unigram "
        "baseline that the replacement keeps. From `workbench sae eval CLT_OR_TRANSCODERS MODEL --data DATA` "
        "(or `sae train --architecture clt`)."
    )
    shown = replaced[replaced["model"] == model_select(replaced, key="replacement-model")]
    shown = pick(shown, "checkpoint", key="replacement-checkpoint")
    shown = pick(shown, "dataset", key="replacement-dataset")
    columns = [
        c
        for c in [
            "transcoders",
            "kind",
            "n_layers",
            "mean_L0",
            "kl",
            "ce_replacement",
            "ce_clean",
            "ce_unigram",
            "gain_kept",
            "n_tokens",
            "unigram_tokens",
            "dataset",
            "checkpoint",
        ]
        if c in shown.columns
    ]
    st.dataframe(shown[columns], width="stretch", hide_index=True)
    if len(shown) > 1:  # CLTs against per-layer sets: KL at each mean L0
        curve = go.Figure()
        for kind, group in shown.sort_values("mean_L0").groupby("kind"):
            curve.add_trace(
                go.Scatter(
                    x=group["mean_L0"],
                    y=group["kl"],
                    mode="markers+lines+text",
                    name=str(kind),
                    text=group["transcoders"],
                    textposition="top center",
                )
            )
        curve.update_layout(
            title="Replacement-model KL vs mean L0",
            xaxis_title="mean L0 per layer and token",
            yaxis_title="KL (model ‖ replacement)",
            height=360,
        )
        st.plotly_chart(curve, width="stretch")
    chosen = st.selectbox("transcoders", shown["transcoders"].tolist(), key="replacement-transcoders")
    row = shown[shown["transcoders"] == chosen].iloc[0].to_dict()
    layer_rows = replacement_layers(all_evals, row) if all_evals is not None else None
    if layer_rows is None or layer_rows.empty:
        st.info(
            "No per-layer sae_evals rows of these transcoders on this model, checkpoint and dataset: rerun "
            "`workbench sae eval` on them."
        )
    else:
        st.markdown(f"**Per layer** ({plain(chosen)})")
        columns = [
            c
            for c in [
                "sae_id",
                "hook",
                "hook_out",
                "L0",
                "FVU",
                "explained_variance",
                "cosine",
                "dead_fraction",
                "dense_fraction",
                "n_tokens",
            ]
            if c in layer_rows.columns
        ]
        st.dataframe(layer_rows[columns], width="stretch", hide_index=True)

    empty_state("feature pages", COMMAND)
    st.stop()

st.subheader("Features")
sae_id = st.selectbox("SAE", sorted(features["sae_id"].unique()))
rows = features[features["sae_id"] == sae_id].copy()
if "dataset" in rows and rows["dataset"].nunique() > 1:  # pages of this SAE from several datasets
    rows = rows[
        rows["dataset"] == st.selectbox("pages from dataset", sorted(rows["dataset"].dropna().unique()))
    ]
density_fig = go.Figure(go.Histogram(x=rows["density"].clip(lower=1e-6).map(math.log10)))
density_fig.update_layout(
    title="Latent density (log10 fraction of tokens)", xaxis_title="log10 density", height=300
)
st.plotly_chart(density_fig, width="stretch")
search = st.text_input("search top-context tokens", "")
rows["top_tokens"] = rows["top_contexts"].map(
    lambda text: " | ".join(c["tokens"][c["focus"]] for c in json.loads(text or "[]"))
)
if search:
    rows = rows[rows["top_tokens"].str.contains(search, case=False, regex=False)]
listing = rows[["latent", "density", "max_activation", "top_tokens"]].sort_values(
    "max_activation", ascending=False
)
st.dataframe(listing, width="stretch", hide_index=True)
if rows.empty:
    st.info("No latent matches this search.")
    st.stop()
latent = st.selectbox("latent", listing["latent"].tolist())
page = rows[rows["latent"] == latent].iloc[0]
st.markdown(
    f"**Latent {latent}** — density {page['density']:.4f}, max activation {page['max_activation']:.3f}"
)


def show_context(context: dict) -> None:
    """One token window, each token shaded by the latent's activation, the focus token underlined. Tokens come
    from user data: ``plain`` makes them inert (no HTML, markdown links or images), and the numbers are floats."""
    acts = [float(a) for a in context["acts"]]
    peak = max(max(acts, default=0.0), 1e-9)
    focus = int(context["focus"])
    spans = []
    for i, (token, act) in enumerate(zip(context["tokens"], acts, strict=True)):
        alpha = max(0.0, act) / peak
        border = "border-bottom:2px solid black;" if i == focus else ""
        spans.append(
            f'<span title="{act:.3f}" style="background:rgba(255,120,0,{alpha:.2f});{border}white-space:pre">'
            f"{plain(token)}</span>"
        )
    st.markdown(f"`{float(context['activation']):.3f}` " + "".join(spans), unsafe_allow_html=True)


st.markdown("**Top activating contexts**")
for context in json.loads(page["top_contexts"] or "[]"):
    show_context(context)

bands = (
    json.loads(page.get("quantile_samples") or "[]") if isinstance(page.get("quantile_samples"), str) else []
)
if bands:
    st.markdown("**Quantile samples** (random contexts from each quantile band of the non-zero activations)")
    for band in reversed(bands):
        high = "∞" if band["high"] is None else f"{band['high']:.3f}"
        with st.expander(f"({band['low']:.3f}, {high}] — {band['count']} tokens", expanded=band is bands[-1]):
            for context in band["contexts"]:
                show_context(context)
            if not band["contexts"]:
                st.caption("no activations in this band")

hist = json.loads(page["histogram"] or "{}")
if hist.get("counts"):
    edges = hist["edges"]
    centers = [(a * b) ** 0.5 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig = go.Figure(go.Bar(x=centers, y=hist["counts"]))
    fig.update_layout(
        title="Activation histogram (non-zero)",
        xaxis_type="log",
        xaxis_title="activation",
        yaxis_title="tokens",
        height=300,
    )
    st.plotly_chart(fig, width="stretch")
shares = page.get("head_shares")
if isinstance(shares, str):  # an attn.hook_z SAE: where the latent's decoder direction lives, head by head
    fig = go.Figure(go.Bar(x=[f"head {h}" for h in range(len(json.loads(shares)))], y=json.loads(shares)))
    fig.update_layout(title="Decoder norm share per head", yaxis_title="share of ‖W_dec‖²", height=300)
    st.plotly_chart(fig, width="stretch")
quantiles = json.loads(page.get("quantile_activations") or "[]")
if quantiles:
    st.caption("quantile-band edges of the non-zero activations: " + ", ".join(f"{q:.3f}" for q in quantiles))

if "promoted_tokens" in page and isinstance(page["promoted_tokens"], str):
    left, right = st.columns(2)
    for column, key, label in (
        (left, "promoted_tokens", "Promoted"),
        (right, "suppressed_tokens", "Suppressed"),
    ):
        entries = json.loads(page[key] or "[]")
        fig = go.Figure(go.Bar(x=[v for _, v in entries], y=[repr(t) for t, _ in entries], orientation="h"))
        fig.update_layout(title=f"{label} tokens (W_dec · W_U)", height=320, yaxis_autorange="reversed")
        column.plotly_chart(fig, width="stretch")
