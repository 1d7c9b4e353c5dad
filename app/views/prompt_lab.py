"""Prompt lab: type a prompt (or pick an image), see activations, SAE latents, probe predictions, codebook codes and
attention on it, stack interventions, and compare clean vs intervened what the model has: next-token distributions
and continuations (causal LMs), the masked-LM head's tokens at a [MASK], the pooled sentence embedding and a probe's
predictions (encoders), class probabilities and neuron paths on the patches (image classifiers). What the page
shows follows the model's declared capabilities (``workbench.analyses.prompt_lab.analysis.capabilities``), never
its family name.

Everything it computes comes from library functions notebooks use too: ``workbench.analyses.prompt_lab`` (analysis
and figures), ``workbench.interventions``, ``workbench.circuits.sae.readout``, ``workbench.probes.readout``,
``workbench.circuits.codebook.readout``, ``workbench.circuits.neuron_path.analysis``.
"""

from __future__ import annotations

import json
import time
from typing import Any, NoReturn

import streamlit as st
import torch

from workbench.analyses.attention.figures import layer_head_heatmap
from workbench.analyses.prompt_lab import analysis as lab
from workbench.analyses.prompt_lab.figures import (
    next_token_figure,
    patch_figure,
    pattern_heatmap,
    profile_heatmap,
)
from workbench.app.data import plain, result_models, table, token_chips, workspace_path
from workbench.app.trace_control import trace_form
from workbench.circuits.codebook.readout import code_steering, codebooks_for_model, load_codebooks_for
from workbench.circuits.sae.analysis import ANALYSIS as SAE_TABLES
from workbench.circuits.sae.readout import latent_steering, load_sae_for, saes_for_model
from workbench.datasets import load_dataset
from workbench.interventions import Intervention, apply_interventions
from workbench.probes.readout import load_probe_for, probe_steering, probes_for_model
from workbench.workspace import Workspace

STARTED = time.perf_counter()
torch.set_num_threads(lab.SERVER_THREADS)  # see lab.SERVER_THREADS (WORKBENCH_DASHBOARD_THREADS)
st.title("Prompt lab")
workspace = Workspace(workspace_path())
DEFAULT_PROMPT = "def add(a, b):\n    return a +"
DEFAULT_IMAGES = "zoo:digits"
DEFAULT_SECOND = "a completely different sentence"
OVERLAYS = ("max |activation|", "residual norm", "SAE latents", "probe predictions", "codebook codes")
IMAGE_OVERLAYS = OVERLAYS[:4]  # codebook codes read token prompts; the rest read any position
KINDS = (
    "steer: SAE latent",
    "steer: probe direction",
    "steer: codebook code",
    "zero-ablate heads",
    "mean-ablate heads",
    "zero-ablate MLP neurons",
    "mean-ablate MLP neurons",
    "patch from a second prompt",
)
IMAGE_KINDS = KINDS[3:7]  # ablations; the SAE / probe / codebook readouts and patching read token prompts
ERRORS = (ValueError, KeyError, IndexError, OSError, RuntimeError)


@st.cache_resource(show_spinner=False)
def model_cache() -> lab.ModelCache:
    """One model cache per server process (LRU under lab.MODEL_BUDGET_BYTES)."""
    return lab.ModelCache()


@st.cache_data(show_spinner=False)
def steps_of(reference: str, root: str) -> list[int]:
    return lab.series_steps(reference, root)


@st.cache_resource(show_spinner=False, max_entries=16)
def sae_for(key: str, sae_id: str, root: str, _model: Any) -> tuple[Any, str]:
    return load_sae_for(_model, sae_id, root)


@st.cache_resource(show_spinner=False, max_entries=16)
def probe_for(key: str, name: str, root: str, _model: Any) -> tuple[Any, Any, str]:
    return load_probe_for(_model, name, root)


@st.cache_resource(show_spinner=False, max_entries=16)
def codebooks_for(key: str, run: str, root: str, _model: Any) -> Any:
    return load_codebooks_for(_model, run, root)


def fail(message: object) -> NoReturn:
    st.error(str(message))
    st.stop()


def parse_indices(text: str, what: str) -> tuple[int, ...] | None:
    """'all' / '' -> None; '0, 3' -> (0, 3); anything else stops the page with a message."""
    text = text.strip()
    if text in ("", "all"):
        return None
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        fail(f"{what}: {text!r} is not a comma-separated list of integers (e.g. 0, 3) or 'all'")
    return None


# ---------------------------------------------------------------------------------------------- model
root = str(workspace.root)
suggested = lab.saved_models(workspace)
labels = {name: name for name in suggested}
if workspace.results_path.exists():
    for row in result_models(workspace.results_path).to_dict("records"):
        if row["identity"] not in labels:  # the user's own models that analyses have results for
            labels[row["identity"]] = f"{row['model']} (has results)"
suggested = list(labels)
left, mid, right = st.columns([2, 1, 2])
choice = left.selectbox(
    "model",
    [*suggested, "other reference…"],
    key="lab_model",
    format_func=lambda name: labels.get(name, name),
    help="a model trained into this workspace, a model with results in it, or any model reference",
)
reference = choice
if choice == "other reference…" or not suggested:
    reference = left.text_input(
        "model reference",
        key="lab_reference",
        help="DIR, DIR@STEP, NAME@STEP, ORG/NAME@REVISION, minilm or tl:NAME",
    ).strip()
    if not reference:
        st.info("Type a model reference to load it (e.g. a save_pretrained directory or code-tiny@300).")
        st.stop()
try:
    steps = steps_of(reference, root)
except ERRORS as err:
    fail(err)
step = None
if steps and "@" not in reference:
    step = mid.selectbox("checkpoint", steps, index=len(steps) - 1, key=f"lab_step_{reference}")
cache = model_cache()
key = lab.model_key(reference, step)
try:
    if key in cache.loaded:
        model = cache.get(key, lambda: lab.load_lab_model(reference, step, root))
    else:
        with st.status(f"Loading {key} …", expanded=False) as status:
            model = cache.get(key, lambda: lab.load_lab_model(reference, step, root))
            status.update(label=f"Loaded {key}", state="complete")
except ERRORS as err:
    fail(err)
caps = lab.capabilities(model)
image = caps.modality == "image"
right.caption(
    f"{plain(model.cfg.name)} ({model.cfg.family}, {model.cfg.n_layers} layers, d_model {model.cfg.d_model}; "
    f"{caps.modality} in, {caps.output.replace('_', '-')} out) · "
    f"loaded: {plain(', '.join(cache.loaded))} · {cache.used_bytes / 2**20:.1f} of "
    f"{cache.budget_bytes / 2**20:.0f} MiB budget"
)

# ---------------------------------------------------------------------------------------------- input
picture: lab.LabImage | None = None
if image:
    p1, p2 = st.columns([3, 1])
    data_ref = p1.text_input(
        "image dataset",
        DEFAULT_IMAGES,
        key="lab_image_data",
        help="a dataset reference holding images: zoo:digits, a folder of images",
    )
    index = int(p2.number_input("image", min_value=0, value=0, step=1, key="lab_image_index"))
    try:
        picture = lab.load_image(model, data_ref, index)
    except ERRORS as err:
        fail(err)
    tokens, prompt = picture.pixels, picture.name
    st.caption(
        f"{plain(picture.name)}: pixels {tuple(tokens.shape)}"
        + (f", label {picture.label}" if picture.label is not None else "")
        + (f" ({plain(picture.note)})" if picture.note else "")
    )
else:
    with st.expander("use a row of a dataset"):
        data_ref = st.text_input(
            "dataset reference", key="lab_dataset", help="a text file, FILE.jsonl:FIELD, zoo:…"
        )
        row = st.number_input("row", min_value=0, value=0, step=1, key="lab_row")

        def use_row() -> None:
            try:
                documents = load_dataset(data_ref, limit=int(row) + 1).documents(limit=int(row) + 1)
                st.session_state["lab_prompt"] = documents[int(row)]
            except ERRORS as err:
                st.session_state["lab_row_error"] = str(err)

        st.button("use this row as the prompt", on_click=use_row, key="lab_use_row", disabled=not data_ref)
        if "lab_row_error" in st.session_state:
            st.error(st.session_state.pop("lab_row_error"))
    st.session_state.setdefault("lab_prompt", DEFAULT_PROMPT)
    prompt = st.text_area("prompt", key="lab_prompt", height=90)
    if caps.output == "masked_token":
        st.caption(f"put {plain(model.tokenizer.mask_token)} where the masked-LM head should predict a token")
    try:
        tokens = lab.encode_prompt(model, prompt)
    except ERRORS as err:
        fail(err)
texts = model.position_labels(tokens)
stacks = st.session_state.setdefault("lab_stacks", {})
stack: list[dict] = stacks.setdefault(key, [])
interventions = [Intervention.from_dict(d) for d in stack]

# ---------------------------------------------------------------------------------------------- tokens
st.subheader("Patches" if image else "Tokens")
c1, c2 = st.columns([1, 3])
layer = c1.selectbox("layer", list(range(model.cfg.n_layers)), key="lab_layer")
overlay = c2.radio(
    "overlay",
    IMAGE_OVERLAYS if image else OVERLAYS,
    horizontal=True,
    key="lab_image_overlay" if image else "lab_overlay",
)
readout: dict[str, Any] = {"overlay": overlay, "layer": layer}
profile = lab.residual_profile(model, tokens)
values: list[float] | None = None
notes: list[str] | None = None
shown = None
if overlay in ("max |activation|", "residual norm"):
    column = "max_abs" if overlay == "max |activation|" else "resid_norm"
    rows = profile[profile["layer"] == layer]
    values = rows[column].tolist()
    notes = [
        f"{v:.2f}" + (f" @{d}" if column == "max_abs" else "")
        for v, d in zip(values, rows["max_dim"], strict=True)
    ]
    shown = rows
elif overlay == "SAE latents":
    from workbench.circuits.sae.readout import saes_for_model, saved_saes, top_latents

    saes = saes_for_model(model, workspace)
    if not saes:
        others = len(saved_saes(workspace))
        st.info(
            (
                f"None of the {others} SAEs in this workspace fits {model.cfg.name} (other hooks or widths). "
                if others
                else "No SAEs in this workspace. "
            )
            + "Train one with:\n\n```\nworkbench sae train MODEL --data DATA --hook HOOK\n```"
        )
    else:
        labels = {
            s.sae_id: f"{s.sae_id} ({s.hook_in}{' → ' + s.hook_out if s.hook_out != s.hook_in else ''})"
            + (f" — {note}" if note else "")
            for s, note in saes
        }
        sae_id = str(st.selectbox("SAE", list(labels), format_func=lambda s: labels[s], key="lab_sae"))
        try:
            sae, note = sae_for(key, sae_id, root, model)
            latents = top_latents(model, tokens, sae, k=3)
        except ERRORS as err:
            fail(err)
        if note:
            st.warning(note)
        first = latents[latents["rank"] == 0].set_index("position")["activation"]
        values = [float(first.get(p, 0.0)) for p in range(len(texts))]
        notes = [
            " ".join(
                f"L{r.latent}:{r.activation:.2f}" for r in latents[latents["position"] == p].itertuples()
            )
            for p in range(len(texts))
        ]
        shown = latents
        readout["sae"] = sae_id
elif overlay == "probe predictions":
    from workbench.probes.readout import probe_predictions, probes_for_model, saved_probes

    probes_found = dict((p.name, note) for p, note in probes_for_model(model, workspace))
    if not probes_found:
        st.info(
            f"None of this workspace's {len(saved_probes(workspace))} saved probes fits {model.cfg.name} (its "
            "hooks at their widths); save probes fitted on it with "
            "`workbench.probes.readout.save_probe(workspace, name, probes, model=model)`."
        )
    else:
        name = st.selectbox(
            "probe",
            list(probes_found),
            key="lab_probe",
            format_func=lambda n: f"{n} ({probes_found[n]})" if probes_found[n] else n,
        )
        try:
            probes, saved, note = probe_for(key, name, root, model)
            site = st.selectbox("probe site", probes.sites, key="lab_probe_site")
            predictions = probe_predictions(model, tokens, probes, site, saved.label_names)
        except ERRORS as err:
            fail(err)
        if note:
            st.warning(note)
        values = (
            predictions["confidence"].tolist()
            if "confidence" in predictions
            else predictions["prediction"].tolist()
        )
        notes = predictions["label"].tolist()
        shown = predictions
        readout["probe"] = name
elif overlay == "codebook codes":
    from workbench.circuits.codebook.readout import codebooks_for_model, token_codes

    fitting = {run: note for run, _, note in codebooks_for_model(model, workspace)}
    if not fitting:
        st.info(
            f"No codebook run of this workspace fits {model.cfg.name}. Train them with:\n\n```\n"
            "workbench codebook train MODEL --data DATA\n```"
        )
    else:
        run = st.selectbox(
            "codebook run",
            list(fitting),
            key="lab_codebook",
            format_func=lambda r: f"{r} ({fitting[r]})" if fitting[r] else r,
        )
        try:
            codebooks = codebooks_for(key, run, root, model)
            site = st.selectbox("codebook site", codebooks.sites, key="lab_codebook_site")
            codes = token_codes(model, tokens, codebooks, site)
        except ERRORS as err:
            fail(err)
        top = codes[(codes["rank"] == 0) & (codes["group"] == 0)].set_index("position")
        values = [float(top["score"].get(p, 0.0)) for p in range(len(texts))]
        notes = [
            " ".join(
                f"c{r.code}" for r in codes[(codes["position"] == p) & (codes["rank"] == 0)].itertuples()
            )
            for p in range(len(texts))
        ]
        shown = codes
        readout["codebook"] = run
if picture is not None and values is not None:
    patches = lab.patch_grid(model, values)
    st.plotly_chart(
        patch_figure(tokens, patches, f"{overlay}, layer {layer}", overlay),
        width="stretch",
        key="lab_patch_overlay",
    )
    st.caption(f"CLS: {values[0]:.4g}; patch (row, column) = position 1 + row × {patches.shape[1]} + column")
else:  # the prompt's own row (class token-row), apart from the chips of an open latent's contexts below
    st.markdown(f'<div class="token-row">{token_chips(texts, values, notes)}</div>', unsafe_allow_html=True)
if shown is not None:
    readout["rows"] = json.loads(shown.to_json(orient="records"))
    with st.expander("values", expanded=False):
        st.dataframe(shown, width="stretch", hide_index=True)
if overlay == "SAE latents" and shown is not None and not shown.empty:
    last = shown[shown["position"] == shown["position"].max()]["latent"].tolist()  # the last token's first
    latents_seen = list(dict.fromkeys([*last, *sorted(set(shown["latent"]))]))
    latent = st.selectbox(
        "open latent",
        latents_seen,
        key="lab_open_latent",
        help="the latents on the chips, the last token's first: its feature page",
    )
    pages = (
        table(workspace.results_path, SAE_TABLES.table("sae_features").name)
        if workspace.results_path.exists()
        else None
    )
    page = None if pages is None else pages[(pages["sae_id"] == readout["sae"]) & (pages["latent"] == latent)]
    if page is None or page.empty:
        st.caption(
            f"latent {latent}: no feature page in the results database (`workbench sae train` writes them)"
        )
    else:
        entry = page.iloc[0]
        st.markdown(
            f"**Latent {latent}** of {plain(readout['sae'])} — density {entry['density']:.4f}, max "
            f"activation {entry['max_activation']:.3f} (full page: SAE features)"
        )
        for context in json.loads(entry["top_contexts"] or "[]")[:5]:
            st.markdown(
                token_chips(context["tokens"], [float(a) for a in context["acts"]]), unsafe_allow_html=True
            )
metric = "max_abs" if overlay != "residual norm" else "resid_norm"
st.plotly_chart(profile_heatmap(profile, metric), width="stretch")

# ---------------------------------------------------------------------------------------------- attention
st.subheader("Attention")
a1, a2 = st.columns(2)
try:
    attention = lab.attention_profile(model, tokens)
except ERRORS as err:
    fail(err)
statistic = a1.radio("statistic", ("entropy", "sink"), horizontal=True, key="lab_statistic")
a1.plotly_chart(layer_head_heatmap(attention, statistic), width="stretch")
a1.caption(f"per layer × head, mean over this prompt's queries ({attention['path'].iloc[0]} path)")
if len(texts) <= lab.PATTERN_MAX_TOKENS:
    h1, h2 = a2.columns(2)
    pattern_layer = h1.selectbox("pattern layer", list(range(model.cfg.n_layers)), key="lab_pattern_layer")
    pattern_head = h2.selectbox("pattern head", list(range(model.cfg.n_heads)), key="lab_pattern_head")
    pattern = lab.head_pattern(model, tokens, pattern_layer, pattern_head)
    a2.plotly_chart(pattern_heatmap(pattern, texts, pattern_layer, pattern_head), width="stretch")
else:
    a2.info(f"The full pattern of a head is drawn for inputs up to {lab.PATTERN_MAX_TOKENS} positions.")


# ---------------------------------------------------------------------------------------------- interventions
def new_intervention(kind: str) -> Intervention | None:
    """The add-intervention form for ``kind``; returns the intervention when the button is pressed."""
    f1, f2, f3, f4 = st.columns(4)
    positions = parse_indices(
        f4.text_input(
            "positions",
            "all",
            key="lab_iv_positions",
            help="token positions, e.g. 0, 3 (all: every position)",
        ),
        "positions",
    )
    built: Any = None
    if kind == "steer: SAE latent":
        ids = [s.sae_id for s, _ in saes_for_model(model, workspace)]
        if not ids:
            st.info(f"No SAE in this workspace fits {model.cfg.name}.")
            return None
        shown_sae = st.session_state.get("lab_sae")  # default: the SAE the token chips show
        sae_id = f1.selectbox(
            "steering SAE",
            ids,
            index=ids.index(shown_sae) if shown_sae in ids else 0,
            key=f"lab_iv_sae_{shown_sae}",
        )
        latent = int(f2.number_input("latent", min_value=0, value=0, step=1, key="lab_iv_latent"))
        scale = float(f3.number_input("scale", value=4.0, step=1.0, key="lab_iv_scale"))

        def built() -> Intervention:
            sae, _ = sae_for(key, sae_id, root, model)
            return latent_steering(sae, sae_id, latent, scale, positions=positions)
    elif kind == "steer: probe direction":
        found = {p.name: p for p, _ in probes_for_model(model, workspace)}
        if not found:
            st.info(f"No saved probe of this workspace fits {model.cfg.name}.")
            return None
        name = f1.selectbox("steering probe", list(found), key="lab_iv_probe")
        site = f1.selectbox("probe hook", found[name].sites, key="lab_iv_probe_site")
        label_value = f2.number_input(
            "class (label value; regression: target)", value=1, step=1, key="lab_iv_label"
        )
        scale = float(f3.number_input("scale", value=4.0, step=1.0, key="lab_iv_scale"))

        def built() -> Intervention:
            probes, _, _ = probe_for(key, name, root, model)
            return probe_steering(probes, name, site, int(label_value), scale, positions=positions)
    elif kind == "steer: codebook code":
        runs = {run: sites for run, sites, _ in codebooks_for_model(model, workspace)}
        if not runs:
            st.info(f"No codebook run of this workspace fits {model.cfg.name}.")
            return None
        run = f1.selectbox("steering codebook", list(runs), key="lab_iv_codebook")
        site = f1.selectbox("codebook hook", runs[run], key="lab_iv_codebook_site")
        code = int(f2.number_input("code", min_value=0, value=0, step=1, key="lab_iv_code"))
        group = int(
            f2.number_input("head (per-head codebooks)", min_value=0, value=0, step=1, key="lab_iv_group")
        )
        scale = float(f3.number_input("scale", value=4.0, step=1.0, key="lab_iv_scale"))

        def built() -> Intervention:
            return code_steering(
                codebooks_for(key, run, root, model), run, site, code, scale, group=group, positions=positions
            )
    elif kind in ("zero-ablate heads", "mean-ablate heads"):
        at = int(f1.selectbox("ablation layer", list(range(model.cfg.n_layers)), key="lab_iv_layer"))
        heads = parse_indices(f2.text_input("heads", "0", key="lab_iv_heads"), "heads")
        built = Intervention(kind.split("-")[0], f"blocks.{at}.attn.hook_z", positions=positions, heads=heads)
    elif kind in ("zero-ablate MLP neurons", "mean-ablate MLP neurons"):
        at = int(f1.selectbox("ablation layer", list(range(model.cfg.n_layers)), key="lab_iv_layer"))
        neurons = parse_indices(f2.text_input("neurons", "0", key="lab_iv_neurons"), "neurons")
        built = Intervention(
            kind.split("-")[0], f"blocks.{at}.mlp.hook_post", positions=positions, neurons=neurons
        )
    else:
        per_query = ("hook_pattern", "hook_entropy", "hook_sink", "hook_lse", "hook_max_logit")
        per_token = [n for n in model.hook_names() if not n.endswith(per_query)]
        hook = f1.selectbox("patched hook", per_token, key="lab_iv_hook")
        source = f2.text_area("source prompt (same number of tokens)", key="lab_iv_source", height=70)
        built = Intervention("patch", hook, positions=positions, source=source) if source else None
    if st.button("add intervention", key="lab_iv_add", type="primary"):
        if built is None:
            fail("give a source prompt to patch from")
        return built() if callable(built) else built
    return None


st.subheader("Interventions")
kind = st.selectbox(
    "kind", IMAGE_KINDS if image else KINDS, key="lab_image_iv_kind" if image else "lab_iv_kind"
)
try:
    added = new_intervention(kind)
except ERRORS as err:
    fail(err)
if added is not None:
    stack.append(added.to_dict())
    interventions.append(added)
for index, intervention in enumerate(list(interventions)):
    i1, i2 = st.columns([6, 1])
    i1.markdown(f"{index + 1}. {plain(intervention.describe())}")
    if i2.button("remove", key=f"lab_iv_remove_{index}"):
        del stack[index]
        st.rerun()
if interventions and st.button("clear all interventions", key="lab_iv_clear"):
    stack.clear()
    st.rerun()
if not interventions:
    st.caption("No interventions yet: the intervened outputs equal the clean ones.")

# ---------------------------------------------------------------------------------------------- outputs
comparison: lab.NextTokenComparison | None = None
continuation: dict[str, str] = {}
generation: dict[str, Any] = {}
outputs: dict[str, Any] = {}


def show_comparison(result: lab.NextTokenComparison, what: str, title: str) -> None:
    """The top output clean → intervened with KL, the bars and the table of a comparison."""
    best_clean, best_int = lab.output_names(
        model, [int(result.clean.argmax()), int(result.intervened.argmax())]
    )
    line = (
        f"top {what} clean {plain(repr(best_clean))} (p={float(result.clean.softmax(-1).max()):.4f}) → "
        f"intervened {plain(repr(best_int))} (p={float(result.intervened.softmax(-1).max()):.4f}); "
        f"KL(clean‖intervened) = {result.kl:.4f} nats"
    )
    if result.focus:
        line += (
            f"; logit difference of {plain(repr(result.focus['token']))}: {result.focus['logit_diff']:+.4f}"
        )
    st.markdown(line)
    st.plotly_chart(next_token_figure(result.table, title), width="stretch")
    with st.expander(f"{what} table", expanded=False):
        st.dataframe(result.table, width="stretch", hide_index=True)


if caps.output == "next_token":
    st.subheader("Next token and continuation")
    o1, o2, o3 = st.columns(3)
    top_k = int(o1.number_input("top tokens", min_value=1, max_value=50, value=8, key="lab_top_k"))
    focus = o2.text_input(
        "token for the logit difference", key="lab_focus", help="one token of the vocabulary"
    ).strip("\n")
    try:
        comparison = lab.compare_next_token(
            model, tokens, interventions, top_k=top_k, focus_token=focus or None
        )
    except ERRORS as err:
        fail(err)
    o3.metric("KL clean → intervened (nats)", f"{comparison.kl:.4f}")
    show_comparison(comparison, "next token", "next-token probability")
    g1, g2, g3, g4 = st.columns(4)
    mode = g1.radio("decoding", ("greedy", "sampled"), horizontal=True, key="lab_mode")
    new_tokens = int(
        g2.number_input("new tokens", min_value=1, max_value=200, value=20, key="lab_new_tokens")
    )
    temperature = (
        0.0
        if mode == "greedy"
        else float(g3.number_input("temperature", min_value=0.05, value=1.0, step=0.1, key="lab_temperature"))
    )
    seed = int(g4.number_input("seed", min_value=0, value=0, step=1, key="lab_seed"))
    generation = {"mode": mode, "max_new_tokens": new_tokens, "temperature": temperature, "seed": seed}
    try:
        continuation = lab.continuations(model, tokens, interventions, new_tokens, temperature, seed)
    except ERRORS as err:
        fail(err)
    k1, k2 = st.columns(2)
    k1.markdown("**clean**")
    k1.code(prompt + continuation["clean"], language=None)
    k2.markdown("**intervened**")
    k2.code(prompt + continuation["intervened"], language=None)
    if continuation["note"]:
        st.info(continuation["note"])
elif caps.output == "masked_token":
    st.subheader("Masked-token prediction")
    masked = lab.mask_positions(model, tokens)
    if not masked:
        st.info(
            f"The prompt has no {plain(model.tokenizer.mask_token)}: put one where the masked-LM head should "
            "predict a token."
        )
    else:
        o1, o2, o3 = st.columns(3)
        at = int(
            o1.selectbox(
                "masked position", masked, key="lab_mask_position", format_func=lambda p: f"{p}: {texts[p]}"
            )
        )
        top_k = int(o2.number_input("top tokens", min_value=1, max_value=50, value=8, key="lab_top_k"))
        try:
            comparison = lab.compare_outputs(model, tokens, interventions, top_k=top_k, position=at)
        except ERRORS as err:
            fail(err)
        o3.metric("KL clean → intervened (nats)", f"{comparison.kl:.4f}")
        show_comparison(comparison, f"token at position {at}", f"masked-LM probability at position {at}")
        outputs["masked_position"] = at
elif caps.output == "class":
    st.subheader("Class probabilities")
    o1, o2 = st.columns(2)
    top_k = int(o1.number_input("top classes", min_value=1, max_value=50, value=5, key="lab_top_classes"))
    try:
        comparison = lab.compare_outputs(model, tokens, interventions, top_k=top_k)
    except ERRORS as err:
        fail(err)
    o2.metric("KL clean → intervened (nats)", f"{comparison.kl:.4f}")
    show_comparison(comparison, "class", "class probability")

if comparison is not None:  # stored with the session, as prompt_lab.run stores it
    outputs["kl"] = comparison.kl

if caps.modality == "text" and caps.output != "next_token":
    st.subheader("Sentence embedding")
    second = st.text_input(
        "second prompt",
        DEFAULT_SECOND,
        key="lab_second",
        help="its pooled embedding (clean) is compared with this prompt's",
    )
    try:
        embeddings = lab.compare_embeddings(model, tokens, interventions, second or None)
    except ERRORS as err:
        fail(err)
    e1, e2, e3 = st.columns(3)
    for place, pair in zip((e1, e2, e3), embeddings.table["pair"], strict=False):
        place.metric(f"cosine {pair}", f"{embeddings.cosine(pair):.4f}")
    st.caption(
        f"{caps.pooling} pooling of {lab.final_hook(model)}" + (", L2-normalised" if caps.normalize else "")
    )
    outputs["embedding"] = json.loads(embeddings.table.to_json(orient="records"))

    from workbench.probes.readout import probe_predictions, probes_for_model

    probe_names = [p.name for p, _ in probes_for_model(model, workspace)]
    if probe_names:
        st.markdown("**Probe prediction, clean vs intervened**")
        q1, q2 = st.columns(2)
        probe_name = q1.selectbox("output probe", probe_names, key="lab_out_probe")
        try:
            probes, saved, _ = probe_for(key, probe_name, root, model)
            probe_site = q2.selectbox("output probe site", probes.sites, key="lab_out_probe_site")
            clean_pred = probe_predictions(model, tokens, probes, probe_site, saved.label_names)
            with apply_interventions(model, interventions, tokens):
                int_pred = probe_predictions(model, tokens, probes, probe_site, saved.label_names)
        except ERRORS as err:
            fail(err)
        both = clean_pred.merge(int_pred, on=["position", "token"], suffixes=("_clean", "_intervened"))
        changed = int((both["label_clean"] != both["label_intervened"]).sum())
        st.caption(f"{changed} of {len(both)} positions change their predicted label")
        st.dataframe(both, width="stretch", hide_index=True)
        outputs["probe"] = {
            "name": probe_name,
            "site": probe_site,
            "rows": json.loads(both.to_json(orient="records")),
        }

if picture is not None and caps.output == "class" and comparison is not None:
    from workbench.circuits.neuron_path.analysis import joint_score, locate_path, make_task

    st.subheader("Neuron path on the patches")
    n1, n2, n3 = st.columns(3)
    best = int(comparison.clean.argmax())
    target = int(
        n1.selectbox(
            "class",
            list(range(len(caps.class_names))),
            index=best,  # the image's top class
            key=f"lab_np_class_{key}_{picture.name}",
            format_func=lambda c: caps.class_names[c],
        )
    )
    top_n = int(n2.number_input("neurons per layer", min_value=1, max_value=8, value=1, key="lab_np_top_k"))
    np_steps = int(n3.number_input("steps", min_value=1, max_value=64, value=8, key="lab_np_steps"))
    traced = st.session_state.setdefault("lab_np_paths", {})
    request = json.dumps([key, picture.name, target, top_n, np_steps])
    if st.button("locate the neuron path", key="lab_np_run"):
        with st.spinner("joint integrated gradients per layer, then at every patch …"):
            goal = torch.tensor([target])
            path, _ = locate_path(
                model, make_task(model, tokens, goal, position=0), np_steps, top_n, progress=False
            )
            # the path's neurons scaled at CLS, then at each patch in turn
            tasks = [make_task(model, tokens, goal, position=at) for at in range(len(texts))]
            scores = [joint_score(model, task, path, np_steps) for task in tasks]
            traced[request] = (path, scores)
    if request in traced:
        path, scores = traced[request]
        st.markdown(
            "path at CLS: " + "; ".join(f"layer {ly}: {', '.join(map(str, ns))}" for ly, ns in path.items())
        )
        st.plotly_chart(
            patch_figure(
                tokens,
                lab.patch_grid(model, scores),
                f"joint score of the path's neurons at each patch ({caps.class_names[target]})",
                "joint score",
            ),
            width="stretch",
            key="lab_np_figure",
        )
        st.caption(f"at CLS: {scores[0]:.4g} (the classifier reads CLS)")
        outputs["neuron_path"] = {
            "class": target,
            "path": {str(k): v for k, v in path.items()},
            "scores": scores,
        }
    else:
        st.caption(
            "Press the button to locate the class's neuron path (at CLS) and draw its joint score at every "
            "patch."
        )

st.caption(f"computed in {time.perf_counter() - STARTED:.2f} s", help="this run of the page, on the server")

if st.button("save session to the results database", key="lab_save"):
    frame = lab.session_frame(
        model, prompt, interventions, comparison, continuation, generation, readout, outputs
    )
    try:
        session = lab.save_session(workspace, frame)
    except ERRORS as err:
        fail(err)
    st.success(f"saved session {session} to prompt_lab_sessions in {plain(workspace.results_path)}")

if (
    not image
):  # the graph page's trace control (issue 33): this prompt → an attribution graph, stored and opened
    with st.expander("trace this prompt into an attribution graph"):
        trace_form(lab.model_key(reference, step), prompt, key="lab_trace", on_graph_page=False)
