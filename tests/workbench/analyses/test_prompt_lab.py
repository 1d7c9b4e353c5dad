"""Prompt lab: the library functions against independent computations (raw hooks, sae.encode, the codebooks' own
recorded codes, float64 attention), the model cache, saving, and the page under AppTest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from workbench.analyses.prompt_lab import analysis as lab
from workbench.analyses.prompt_lab.figures import patch_figure
from workbench.circuits.codebook.module import CodebookSet, site_config
from workbench.circuits.codebook.readout import codebooks_for_model
from workbench.interventions import Intervention
from workbench.probes.linear import fit_probes
from workbench.probes.readout import probes_dir, probes_for_model, save_probe

PAGE = Path(__file__).resolve().parents[3] / "app" / "views" / "prompt_lab.py"
PROMPT = "def f(x):\n    return x"
RESID = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def code_model(zoo_workspace):
    return lab.load_lab_model("code-tiny", workspace=zoo_workspace)


@pytest.fixture(scope="module")
def tokens(code_model):
    return lab.encode_prompt(code_model, PROMPT)


@pytest.fixture(scope="module")
def resid_sae(dashboard_workspace, code_model):
    from workbench.circuits.sae.readout import load_sae_for

    sae, note = load_sae_for(code_model, "code-tiny.L0-resid-topk", dashboard_workspace)
    assert note == ""
    return sae


def _raw_logits(model, tokens, hooks) -> torch.Tensor:
    with torch.no_grad():
        return model.run_with_hooks(tokens, fwd_hooks=hooks)[0, -1].float()


def test_an_intervention_stack_equals_a_manual_forward(code_model, tokens, resid_sae) -> None:
    """Steering by an SAE decoder row, a head ablation and a mean-ablation of MLP units at some positions, as one
    stack, give the next-token logits of a forward with hand-written hooks doing the same."""
    from workbench.circuits.sae.readout import latent_steering

    steer = latent_steering(resid_sae, "sae", 5, 6.0)
    head = Intervention("zero", "blocks.1.attn.hook_z", heads=(0, 2))
    units = Intervention("mean", "blocks.0.mlp.hook_post", positions=(1, 4), neurons=(3, 7, 11))
    stack = [steer, head, units]
    got = lab.next_token_logits(code_model, tokens, stack)

    direction = resid_sae.W_dec[5].detach()
    _, cache = code_model.run_with_cache(tokens, ["blocks.0.mlp.hook_post"])
    mean = cache["blocks.0.mlp.hook_post"][0].mean(0)

    def add(act, hook):
        return act + 6.0 * direction

    def zero_heads(act, hook):
        act = act.clone()
        act[:, :, [0, 2]] = 0
        return act

    def mean_units(act, hook):
        act = act.clone()
        for p in (1, 4):
            for u in (3, 7, 11):
                act[:, p, u] = mean[u]
        return act

    hooks = [(RESID, add), ("blocks.1.attn.hook_z", zero_heads), ("blocks.0.mlp.hook_post", mean_units)]
    want = _raw_logits(code_model, tokens, hooks)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, lab.next_token_logits(code_model, tokens), atol=1e-3)
    comparison = lab.compare_next_token(code_model, tokens, stack, top_k=5, focus_token="x")
    p, q = want.log_softmax(-1), _raw_logits(code_model, tokens, []).log_softmax(-1)
    assert comparison.kl == pytest.approx(float((q.exp() * (q - p)).sum()), rel=1e-4)
    xid = lab.token_id(code_model, "x")
    assert comparison.focus is not None
    assert comparison.focus["logit_diff"] == pytest.approx(float(want[xid] - comparison.clean[xid]), abs=1e-5)
    assert set(comparison.table["token_id"]) >= set(want.topk(5).indices.tolist())


def test_patching_copies_the_source_prompt_and_refuses_other_lengths(code_model, tokens) -> None:
    source = "def f(y):\n    return x"
    source_ids = code_model.to_tokens(source)
    assert source_ids.shape == tokens.shape
    _, donor = code_model.run_with_cache(source_ids, [RESID])

    def patch(act, hook):
        act = act.clone()
        act[:, 3] = donor[RESID][:, 3]
        return act

    got = lab.next_token_logits(
        code_model, tokens, [Intervention("patch", RESID, positions=(3,), source=source)]
    )
    torch.testing.assert_close(got, _raw_logits(code_model, tokens, [(RESID, patch)]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="same length"):
        lab.next_token_logits(code_model, tokens, [Intervention("patch", RESID, source="def")])
    with pytest.raises(IndexError, match="out of range"):
        lab.next_token_logits(code_model, tokens, [Intervention("zero", RESID, positions=(99,))])
    with pytest.raises(ValueError, match="not one hook"):
        lab.next_token_logits(code_model, tokens, [Intervention("zero", "blocks.*.hook_resid_post")])
    roundtrip = Intervention.from_dict(Intervention("zero", RESID, positions=[1, 2]).to_dict())
    assert roundtrip == Intervention("zero", RESID, positions=(1, 2))


def test_continuations_are_greedy_argmax_or_seeded_samples(code_model, tokens, resid_sae) -> None:
    from workbench.circuits.sae.readout import latent_steering

    ids = tokens.clone()
    for _ in range(8):  # greedy by hand
        with torch.no_grad():
            ids = torch.cat([ids, code_model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    greedy = ids[0, tokens.shape[1] :].tolist()
    assert lab.generate(code_model, tokens, max_new_tokens=6).tolist() == greedy[:6]
    sampled = [
        lab.generate(code_model, tokens, max_new_tokens=6, temperature=1.0, seed=s).tolist() for s in (1, 1)
    ]
    assert sampled[0] == sampled[1]
    steer = latent_steering(resid_sae, "sae", int(resid_sae.W_dec.norm(dim=1).argmax()), 40.0)
    out = lab.continuations(code_model, tokens, [steer], max_new_tokens=8)
    assert out["clean"] == code_model.to_string(greedy)
    assert out["intervened"] != out["clean"]


def test_a_continuation_that_stops_at_end_of_text_says_so(code_model, tokens) -> None:
    eos = code_model.tokenizer.eos_token_id
    unembed = code_model.model.get_output_embeddings().weight.detach()  # [d_vocab, d_model]
    direction = torch.zeros(unembed.shape[1], requires_grad=True)  # a final-LN direction whose argmax is eos
    optimizer = torch.optim.Adam([direction], lr=0.1)
    for _ in range(300):
        optimizer.zero_grad()
        (-(unembed @ direction).log_softmax(-1)[eos]).backward()
        optimizer.step()
    direction = direction.detach()
    assert int((unembed @ direction).argmax()) == eos
    to_eos = Intervention.steer("ln_final.hook_normalized", direction / direction.norm(), scale=1000.0)
    assert lab.generate(code_model, tokens, [to_eos], max_new_tokens=4).tolist() == [eos]
    out = lab.continuations(code_model, tokens, [to_eos], max_new_tokens=4)
    assert out["intervened"] == ""
    assert out["note"] == (
        "intervened stopped at end-of-text at step 0 (the model's first choice was end-of-text, so it is empty)"
    )
    clean = lab.generate(code_model, tokens, max_new_tokens=4).tolist()
    assert len(clean) == 4 and eos not in clean and out["clean"] == code_model.to_string(clean)


def test_sae_readout_equals_encode_and_refuses_another_model(code_model, tokens, resid_sae, dashboard_workspace,
                                                             zoo_workspace) -> None:  # fmt: skip
    from workbench.circuits.sae.base import SAEInputError
    from workbench.circuits.sae.readout import latent_activations, load_sae_for, saved_saes, top_latents

    _, cache = code_model.run_with_cache(tokens, [RESID])
    acts = resid_sae.encode(cache[RESID][0])
    torch.testing.assert_close(latent_activations(code_model, tokens, resid_sae), acts)
    top = top_latents(code_model, tokens, resid_sae, k=3)
    for position in range(tokens.shape[1]):
        rows = top[top["position"] == position].sort_values("rank")
        want = acts[position].topk(3)
        assert rows["latent"].tolist() == [
            i for i, v in zip(want.indices.tolist(), want.values.tolist(), strict=True) if v > 0
        ]
        assert rows["activation"].tolist() == pytest.approx(
            [v for v in want.values.tolist() if v > 0], rel=1e-5
        )
    assert {"code-tiny.L0-resid-topk", "code-tiny.L0-mlp-transcoder"} <= {
        s.sae_id for s in saved_saes(zoo_workspace)
    }
    fsm = lab.load_lab_model("fsm-tiny", workspace=zoo_workspace)
    with pytest.raises(SAEInputError, match="another model or hook"):
        load_sae_for(fsm, "code-tiny.L0-resid-topk", dashboard_workspace)
    early = lab.load_lab_model("code-tiny", step=0, workspace=zoo_workspace)
    assert "checkpoint 300" in load_sae_for(early, "code-tiny.L0-resid-topk", dashboard_workspace)[1]


def test_the_lab_lists_only_the_saes_that_fit_the_loaded_model(code_model, tmp_path) -> None:
    """Of four saved SAEs — the model's own, one of another model with the same hook and width, one of another
    width, one of a hook the model lacks — the lab lists the first two, the second with a note naming both models;
    the page offers them through the same function."""
    from workbench.circuits.sae import SAEConfig, create_sae
    from workbench.circuits.sae.readout import saes_for_model

    d = code_model.cfg.d_model
    specs = {"own": (d, RESID, "code-tiny"), "llama": (d, RESID, "/runs/my-llama"),
             "narrow": (d // 2, RESID, "/runs/small"), "deep": (d, "blocks.9.hook_resid_post", "code-tiny")}  # fmt: skip
    for sae_id, (width, hook, owner) in specs.items():
        sae = create_sae(SAEConfig("topk", d_in=width, d_sae=8, k=2, hook_in=hook, model=owner))
        sae.save(tmp_path / "saes" / sae_id)
    listed = {entry.sae_id: note for entry, note in saes_for_model(code_model, tmp_path)}
    assert listed == {
        "own": "",
        "llama": "trained on /runs/my-llama, this model is code-tiny (same hooks and widths)",
    }


def test_probe_readout_predicts_like_the_probe_and_steers_along_its_direction(
    code_model, tokens, tmp_path
) -> None:
    from workbench.probes.linear import ProbeError, fit_probes
    from workbench.probes.readout import (
        load_probe_for,
        probe_predictions,
        probe_steering,
        save_probe,
        saved_probes,
    )

    texts = ["def f(x):\n    return x + 1\n", "import os\nprint(os.path)\n", "class A:\n    pass\n"]
    batch = code_model.tokenize(texts)
    _, cache = code_model.run_with_cache(batch, [RESID])
    real = batch["attention_mask"].bool()
    x = cache[RESID][real]
    y = (batch["input_ids"][real] % 2).long()  # token-id parity: a label the residual stream carries
    probes = fit_probes({RESID: x}, y)
    save_probe(tmp_path, "parity", probes, model=code_model, label_set="parity", label_names=["even", "odd"])
    assert [p.name for p in saved_probes(tmp_path)] == ["parity"]
    loaded, saved, note = load_probe_for(code_model, "parity", tmp_path)
    assert note == "" and saved.label_names == ["even", "odd"]
    frame = probe_predictions(code_model, tokens, loaded, RESID, saved.label_names)
    _, mine = code_model.run_with_cache(tokens, [RESID])
    want = probes.predict(mine[RESID][0][None])[0]
    assert frame["prediction"].tolist() == want.tolist()
    assert frame["label"].tolist() == [["even", "odd"][int(v)] for v in want]
    steer = probe_steering(loaded, "parity", RESID, 1, 5.0)
    direction = probes.direction(RESID, 1)
    torch.testing.assert_close(
        lab.next_token_logits(code_model, tokens, [steer]),
        _raw_logits(code_model, tokens, [(RESID, lambda a, h: a + 5.0 * direction)]),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ProbeError, match="no saved probe 'nope'"):
        load_probe_for(code_model, "nope", tmp_path)


def test_codebook_readout_equals_the_codes_the_codebook_chooses(zoo_workspace, dashboard_workspace) -> None:
    from workbench.circuits.codebook.module import CodebookError
    from workbench.circuits.codebook.readout import (
        code_steering,
        load_codebooks_for,
        saved_codebooks,
        token_codes,
    )

    fsm = lab.load_lab_model("fsm-tiny", workspace=zoo_workspace)
    runs = saved_codebooks(dashboard_workspace)
    run, sites = next(iter(runs.items()))
    codebooks = load_codebooks_for(fsm, run, dashboard_workspace)
    ids = lab.encode_prompt(fsm, "t0 t3 t5 t1 t2 t7")
    site = sites[0]
    codes = token_codes(fsm, ids, codebooks, site)
    with torch.no_grad(), fsm.hooks(codebooks.hooks()):
        fsm(ids)
    recorded = codebooks.codes(site)[0]  # [pos, n_groups, k], chosen inside the model
    assert codes.sort_values(["position", "group", "rank"])["code"].tolist() == recorded.flatten().tolist()
    steer = code_steering(codebooks, run, site, int(recorded[2, 0, 0]), 3.0, positions=(2,))
    vector = codebooks[site].codes[0, int(recorded[2, 0, 0])].detach()

    def add_at_2(act, hook):
        act = act.clone()
        act[:, 2] += 3.0 * vector
        return act

    torch.testing.assert_close(
        lab.next_token_logits(fsm, ids, [steer]), _raw_logits(fsm, ids, [(site, add_at_2)])
    )
    code_model = lab.load_lab_model("code-tiny", workspace=zoo_workspace)
    with pytest.raises(CodebookError, match="another model"):
        load_codebooks_for(code_model, run, dashboard_workspace)


def test_residual_and_attention_profiles_match_float64_references(code_model, tokens) -> None:
    profile = lab.residual_profile(code_model, tokens)
    _, cache = code_model.run_with_cache(tokens, ["blocks.*.hook_resid_post", "blocks.*.attn.hook_pattern"])
    for layer in range(code_model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_post"][0].double()
        rows = profile[profile["layer"] == layer].sort_values("position")
        assert rows["resid_norm"].tolist() == pytest.approx(resid.norm(dim=-1).tolist(), rel=1e-5)
        assert rows["max_abs"].tolist() == pytest.approx(resid.abs().amax(-1).tolist(), rel=1e-5)
    attention = lab.attention_profile(code_model, tokens)
    assert attention["path"].iloc[0] != "kernel"  # no CUDA here: the reference path
    for layer in range(code_model.cfg.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"][0].double()  # [head, q, k]
        entropy = -(pattern * pattern.clamp_min(1e-300).log()).sum(-1)
        sink = pattern[..., 0]
        rows = attention[attention["layer"] == layer].sort_values("head")
        # attention_statistics leaves query 0 out of its averages
        assert rows["entropy"].tolist() == pytest.approx(entropy[:, 1:].mean(-1).tolist(), abs=1e-4)
        assert rows["sink"].tolist() == pytest.approx(sink[:, 1:].mean(-1).tolist(), abs=1e-4)
        one = lab.head_pattern(code_model, tokens, layer, 1)
        torch.testing.assert_close(one.double(), pattern[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(lab.PromptLabError, match="4 heads"):
        lab.head_pattern(code_model, tokens, 0, 9)


def test_prompt_limits_and_the_model_cache_budget(code_model, zoo_workspace) -> None:
    with pytest.raises(lab.PromptLabError, match="over the limit of 8"):
        lab.encode_prompt(code_model, PROMPT + " x" * 10, max_tokens=8)
    with pytest.raises(lab.PromptLabError, match="empty"):
        lab.encode_prompt(code_model, "  ")
    size = lab.parameter_bytes(code_model)
    assert size == sum(p.numel() * 4 for p in code_model.model.parameters()) + sum(
        b.numel() * b.element_size() for b in code_model.model.buffers()
    )
    cache = lab.ModelCache(budget_bytes=int(size * 1.5))
    loads = []

    def loader(step):
        def load():
            loads.append(step)
            return lab.load_lab_model("code-tiny", step, zoo_workspace)

        return load

    first = cache.get("code-tiny@0", loader(0))
    assert cache.get("code-tiny@0", loader(0)) is first and loads == [0]
    cache.get("code-tiny@300", loader(300))
    assert cache.loaded == ["code-tiny@300"] and cache.used_bytes == size  # @0 released to stay in budget
    with pytest.raises(lab.PromptLabError, match="memory budget"):
        lab.ModelCache(budget_bytes=size // 2).get("code-tiny", loader(300))
    assert lab.series_steps("code-tiny", zoo_workspace)[-1] == 300


def test_a_session_is_written_in_one_transaction(code_model, tokens, tmp_path, monkeypatch) -> None:
    from workbench import results
    from workbench.workspace import Workspace

    stack = [Intervention("zero", "blocks.1.attn.hook_z", heads=(1,))]
    comparison = lab.compare_next_token(code_model, tokens, stack, focus_token="x")
    continuation = lab.continuations(code_model, tokens, stack, max_new_tokens=4)
    frame = lab.session_frame(code_model, PROMPT, stack, comparison, continuation, {"mode": "greedy"})

    def crash(name):
        if name == "results.write.before_commit":
            raise RuntimeError("killed before commit")

    Workspace(tmp_path).results().write("other", pd.DataFrame({"a": [1]}))
    monkeypatch.setattr(results, "crash_point", crash)
    with pytest.raises(RuntimeError, match="killed"):
        lab.save_session(tmp_path, frame)
    assert "prompt_lab_sessions" not in Workspace(tmp_path).results().tables()
    monkeypatch.undo()
    session = lab.save_session(tmp_path, frame)
    lab.save_session(tmp_path, frame)  # the same session again replaces its row
    rows = Workspace(tmp_path).results().read("prompt_lab_sessions")
    assert len(rows) == 1 and rows["session"].iloc[0] == session
    import json

    assert [Intervention.from_dict(d) for d in json.loads(rows["interventions"].iloc[0])] == stack
    assert comparison.focus is not None
    assert rows["logit_diff"].iloc[0] == pytest.approx(comparison.focus["logit_diff"])
    assert rows["continuation_intervened"].iloc[0] == continuation["intervened"]
    assert rows["continuation_note"].iloc[0] == continuation["note"]
    assert not math.isnan(rows["logit_diff"].iloc[0])


# ---------------------------------------------------------------------------------------------- the page
def _page(workspace, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_WORKSPACE", str(workspace.root))
    return AppTest.from_file(str(PAGE), default_timeout=90).run()


def test_page_steers_and_shows_what_the_api_gives(
    dashboard_workspace, code_model, resid_sae, monkeypatch
) -> None:
    from workbench.circuits.sae.readout import latent_steering, top_latents

    app = _page(dashboard_workspace, monkeypatch)
    assert not app.exception, app.exception
    assert app.selectbox(key="lab_model").value == "code-tiny"
    app.text_area(key="lab_prompt").set_value(PROMPT)
    app.radio(key="lab_overlay").set_value("SAE latents")
    app.run()
    app.selectbox(key="lab_sae").set_value("code-tiny.L0-resid-topk").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    chips = next(m.value for m in app.markdown if "token-chip" in m.value)
    tokens = lab.encode_prompt(code_model, PROMPT)
    top = top_latents(code_model, tokens, resid_sae, k=3)
    assert chips.count('class="token-chip"') == tokens.shape[1]
    assert f"L{int(top.iloc[0]['latent'])}&#58;" in chips  # the first token's top latent, shown on its chip
    clean = [c.value for c in app.code]
    assert (
        app.selectbox(key="lab_iv_sae_code-tiny.L0-resid-topk").value == "code-tiny.L0-resid-topk"
    )  # the shown SAE
    app.number_input(key="lab_iv_latent").set_value(7)
    app.number_input(key="lab_iv_scale").set_value(30.0)
    app.button(key="lab_iv_add").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    assert any("latent 7" in m.value for m in app.markdown)
    api = lab.continuations(
        code_model, tokens, [latent_steering(resid_sae, "code-tiny.L0-resid-topk", 7, 30.0)]
    )
    shown = [c.value for c in app.code]
    assert shown == [PROMPT + api["clean"], PROMPT + api["intervened"]] and shown[0] == clean[0] != shown[1]
    app.button(key="lab_save").click().run()
    assert app.success and "saved session" in app.success[0].value
    from workbench.workspace import Workspace

    db = Workspace(dashboard_workspace.root).results()
    saved = db.read("prompt_lab_sessions")
    assert saved["continuation_intervened"].tolist() == [api["intervened"]]
    # the page's Save stores the row prompt_lab.run gives for the same prompt and stack (its overlays aside)
    steer = latent_steering(resid_sae, "code-tiny.L0-resid-topk", 7, 30.0)
    _assert_same_session(
        saved.iloc[0], lab.run(code_model, PROMPT, interventions=[steer])["prompt_lab_sessions"]
    )
    db.delete("prompt_lab_sessions")
    app.button(key="lab_iv_remove_0").click().run()
    assert [c.value for c in app.code] == clean


def _assert_same_session(saved: pd.Series, frame: pd.DataFrame) -> None:
    """A stored prompt_lab_sessions row equals ``frame``'s one row in every declared column but ``readouts`` (the
    page's overlays); JSON columns are compared parsed, numbers to float32 precision (the page and the test run on other threads)."""
    assert len(frame) == 1
    row = frame.iloc[0]
    for column in ("model", "session", "prompt", "tokens", "interventions", "focus_token", "output"):
        assert saved[column] == row[column], column
    for column in ("continuation_clean", "continuation_intervened", "continuation_note"):
        assert (saved[column] or "") == (row[column] or ""), column
    for column in ("next_token", "generation", "outputs"):
        assert _close(json.loads(saved[column]), json.loads(row[column])), column


def _close(a: object, b: object) -> bool:
    """Equal JSON values, numbers to float32 precision (1e-5 relative, 1e-6 absolute; nested lists and objects compared element by element)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return (
            isinstance(a, int | float)
            and isinstance(b, int | float)
            and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
        )
    return a == b


def test_cli_runs_a_session_from_an_interventions_file(zoo_workspace, code_model, tmp_path) -> None:
    """`workbench prompt-lab run MODEL --prompt TEXT --interventions FILE` stores the row prompt_lab.run gives and
    prints its comparison; the stack read back from the stored row re-runs to the same session; a bad file is one
    error line and writes nothing."""
    from typer.testing import CliRunner

    from workbench.cli import app
    from workbench.workspace import Workspace

    workspace = tmp_path / "ws"
    stack = [Intervention("zero", "blocks.0.attn.hook_z", heads=(0, 1))]
    stack_file = tmp_path / "stack.json"
    stack_file.write_text(json.dumps([iv.to_dict() for iv in stack]))
    command = ["prompt-lab", "run", str(zoo_workspace.model_dir("code-tiny")), "--prompt", PROMPT,
               "--interventions", str(stack_file), "--focus-token", "x", "--workspace", str(workspace)]  # fmt: skip
    runner = CliRunner()
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    stored = Workspace(workspace).results().read("prompt_lab_sessions")
    assert len(stored) == 1
    model = lab.load_lab_model(str(zoo_workspace.model_dir("code-tiny")))
    expected = lab.run(model, PROMPT, interventions=stack, focus_token="x")["prompt_lab_sessions"]
    _assert_same_session(stored.iloc[0], expected)
    outputs = json.loads(stored.iloc[0]["outputs"])
    assert f"KL(clean‖intervened) = {outputs['kl']:.4f} nats" in result.output
    assert f"continuation (intervened): {stored.iloc[0]['continuation_intervened']!r}" in result.output
    assert f"saved session {stored.iloc[0]['session']}" in result.output
    reread = [Intervention.from_dict(d) for d in json.loads(stored.iloc[0]["interventions"])]
    assert reread == stack
    for bad, message in (
        ('{"kind": "zero"}', "give a JSON list of objects"),
        ('[{"kind": "zap", "hook": "blocks.0.hook_resid_post"}]', "entry 0 is not an intervention"),
        ("[{", "cannot be read as JSON"),
    ):
        stack_file.write_text(bad)
        failed = runner.invoke(app, [*command[:-2], "--workspace", str(tmp_path / "nothing")])
        assert failed.exit_code == 2 and message in failed.output and "Traceback" not in failed.output
        assert not (tmp_path / "nothing").exists()


def test_run_on_an_encoder_compares_pooled_embeddings_and_refuses_images(zoo_workspace) -> None:
    """MiniLM (no next-token head): the session holds the pooled embedding's cosines (equal to
    compare_embeddings') and no continuation; an image model is refused naming the dashboard page."""
    from workbench.analysis import AnalysisNotApplicable

    minilm = lab.load_lab_model("minilm")
    stack = [Intervention("zero", "blocks.0.attn.hook_z", heads=(1, 2))]
    row = lab.run(minilm, "the cat sat on the mat", interventions=stack, second_prompt="a dog ran")[
        "prompt_lab_sessions"
    ].iloc[0]
    tokens = lab.encode_prompt(minilm, "the cat sat on the mat")
    want = lab.compare_embeddings(minilm, tokens, stack, "a dog ran").table
    assert _close(json.loads(row["outputs"])["embedding"], json.loads(want.to_json(orient="records")))
    assert row["continuation_clean"] is None and json.loads(row["generation"]) == {}
    with pytest.raises(AnalysisNotApplicable, match="Prompt lab page"):
        lab.run(lab.load_lab_model("vit-digits", workspace=zoo_workspace), "an image")


def test_page_bad_input_gets_a_message(dashboard_workspace, monkeypatch) -> None:
    app = _page(dashboard_workspace, monkeypatch)
    app.text_area(key="lab_prompt").set_value("x " * 2000).run()
    assert not app.exception and "over the limit" in app.error[0].value
    app.text_area(key="lab_prompt").set_value("t0 t1 t2")
    app.selectbox(key="lab_model").set_value("fsm-tiny").run()
    app.radio(key="lab_overlay").set_value("SAE latents").run()
    assert not app.exception and not app.error  # code-tiny's SAEs are not offered for fsm-tiny
    assert any("SAEs in this workspace fits fsm-tiny (other hooks or widths)" in i.value for i in app.info)
    app.selectbox(key="lab_model").set_value("other reference…").run()
    app.text_input(key="lab_reference").set_value("no/such-model@main").run()
    assert not app.exception and app.error and "no/such-model" in app.error[0].value


def test_page_overlays_probe_predictions_codebook_codes_and_a_dataset_row(
    dashboard_workspace, zoo_workspace, code_model, tmp_path, monkeypatch
) -> None:
    import shutil

    from workbench.circuits.codebook.readout import load_codebooks_for, saved_codebooks, token_codes
    from workbench.probes.linear import fit_probes
    from workbench.probes.readout import probe_predictions, probes_dir, save_probe

    batch = code_model.tokenize(["def f(x):\n    return x + 1\n", "import os\n"])
    _, cache = code_model.run_with_cache(batch, [RESID])
    real = batch["attention_mask"].bool()
    probes = fit_probes({RESID: cache[RESID][real]}, (batch["input_ids"][real] % 2).long())
    save_probe(dashboard_workspace, "lab-parity", probes, model=code_model, label_names=["even", "odd"])
    try:
        app = _page(dashboard_workspace, monkeypatch)
        app.text_area(key="lab_prompt").set_value(PROMPT)
        app.radio(key="lab_overlay").set_value("probe predictions").run()
        assert not app.exception and not app.error, [e.value for e in app.error]
        chips = next(m.value for m in app.markdown if "token-chip" in m.value)
        want = probe_predictions(
            code_model, lab.encode_prompt(code_model, PROMPT), probes, RESID, ["even", "odd"]
        )
        assert chips.count("<small") == len(want) and all(label in chips for label in set(want["label"]))
    finally:
        shutil.rmtree(probes_dir(dashboard_workspace) / "lab-parity")

    app.text_area(key="lab_prompt").set_value("t0 t3 t5 t1")
    app.selectbox(key="lab_model").set_value("fsm-tiny")
    app.radio(key="lab_overlay").set_value("codebook codes").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    fsm = lab.load_lab_model("fsm-tiny", workspace=zoo_workspace)
    run, sites = next(iter(saved_codebooks(dashboard_workspace).items()))
    codes = token_codes(fsm, lab.encode_prompt(fsm, "t0 t3 t5 t1"), load_codebooks_for(fsm, run, dashboard_workspace),
                        sites[0])  # fmt: skip
    chips = next(m.value for m in app.markdown if "token-chip" in m.value)
    assert all(f"c{code}" in chips for code in codes["code"])

    rows = tmp_path / "prompts.txt"
    rows.write_text("t1 t2\nt4 t6 t0\n")
    app.text_input(key="lab_dataset").set_value(str(rows))
    app.number_input(key="lab_row").set_value(1).run()
    app.button(key="lab_use_row").click().run()
    assert app.text_area(key="lab_prompt").value == "t4 t6 t0"
    app.text_input(key="lab_dataset").set_value(str(tmp_path / "missing.txt")).run()
    app.button(key="lab_use_row").click().run()
    assert not app.exception and "missing.txt" in app.error[0].value


def test_attention_profile_in_the_fused_kernel_equals_the_reference_path(code_model, tokens) -> None:
    from workbench.attention.kernel import kernel_available

    if not kernel_available(torch.device("cpu"))[0]:
        pytest.skip("needs TRITON_INTERPRET=1 before import (set by make test) or a GPU")
    before = code_model.attention_path
    kernel = lab.attention_profile(code_model, tokens, kernel=True)
    assert code_model.attention_path == before and set(kernel["path"]) == {"kernel"}
    reference = lab.attention_profile(code_model, tokens, kernel=False)
    for statistic in ("entropy", "sink", "lse", "max_logit"):
        assert kernel[statistic].tolist() == pytest.approx(reference[statistic].tolist(), abs=1e-5)


def test_the_lab_lists_only_the_probes_and_codebooks_that_fit_the_loaded_model(code_model, tmp_path) -> None:
    """Probes: the model's own, one fitted on another model at the same hook and width, one of another width, one
    of a hook the model lacks → the first two, the second with a note naming both models. Codebooks likewise (own,
    another model's at the same site and width, another width)."""
    d = code_model.cfg.d_model
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(64) % 2
    for name, width, hook, owner in (("own", d, RESID, None), ("other", d, RESID, "/runs/my-llama"),
                                     ("narrow", d // 2, RESID, None), ("deep", d, "blocks.9.hook_resid_post", None)):  # fmt: skip
        probes = fit_probes({hook: torch.randn(64, width, generator=generator)}, labels)
        save_probe(tmp_path, name, probes, model=code_model)
        if owner:  # as `save_probe` writes it for that model
            meta = json.loads((probes_dir(tmp_path) / name / "probe.json").read_text())
            (probes_dir(tmp_path) / name / "probe.json").write_text(json.dumps(meta | {"model": owner}))
    listed = {entry.name: note for entry, note in probes_for_model(code_model, tmp_path)}
    assert listed == {
        "own": "",
        "other": "fitted on /runs/my-llama, this model is code-tiny (same hooks and widths)",
    }
    config = site_config(code_model, RESID, 16, 2, "cosine")
    for run, books, extra in (("own", [config], {}), ("other", [config], {"model": "/runs/my-llama"}),
                              ("narrow", [type(config)(**{**config.__dict__, "d": d // 2})], {})):  # fmt: skip
        CodebookSet(books).save(tmp_path / "codebooks" / run, extra)
    found = {run: (sites, note) for run, sites, note in codebooks_for_model(code_model, tmp_path)}
    assert found == {"own": ([RESID], ""),
                     "other": ([RESID], "trained on /runs/my-llama, this model is code-tiny (same hooks and widths)")}  # fmt: skip


# ---------------------------------------------------------------------------------------------- encoders and images
SENTENCE = "the cat sat on the [MASK] by the door"


@pytest.fixture(scope="module")
def user_dirs(tmp_path_factory):
    """A user's random-init BertForMaskedLM, BertModel and ViTForImageClassification (3 channels, 16×16 pixels, 4×4
    patches) saved with save_pretrained; the BERTs with MiniLM's tokenizer."""
    import transformers

    from workbench.model import load_tokenizer

    root = tmp_path_factory.mktemp("user-models")
    tokenizer = load_tokenizer("minilm")
    torch.manual_seed(0)
    bert = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                   num_attention_heads=4, intermediate_size=48, max_position_embeddings=64)  # fmt: skip
    for name, cls in (("my-mlm", transformers.BertForMaskedLM), ("my-bert", transformers.BertModel)):
        cls(bert).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    vit = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=48, num_labels=5)  # fmt: skip
    transformers.ViTForImageClassification(vit).save_pretrained(root / "my-vit")
    return root


@pytest.fixture(scope="module")
def minilm():
    return lab.load_lab_model("minilm")


def _hf(directory, cls_name: str):
    import transformers

    return getattr(transformers, cls_name).from_pretrained(str(directory)).eval()


def _zero_heads_pre_hook(heads: tuple[int, ...], n_heads: int):
    """A forward pre-hook on an attention output projection zeroing the input slices of ``heads``."""

    def hook(module, args):
        x = args[0].unflatten(-1, (n_heads, -1)).clone()
        x[..., list(heads), :] = 0
        return (x.flatten(-2), *args[1:])

    return hook


def test_capabilities_come_from_the_adapters(code_model, minilm, user_dirs, vit_model_dir) -> None:
    caps = {name: lab.capabilities(lab.load_lab_model(str(ref))) for name, ref in
            (("mlm", user_dirs / "my-mlm"), ("bert", user_dirs / "my-bert"), ("vit", user_dirs / "my-vit"),
             ("digits", vit_model_dir))}  # fmt: skip
    caps["code"], caps["minilm"] = lab.capabilities(code_model), lab.capabilities(minilm)
    assert {n: (c.modality, c.output, c.pooling, c.normalize) for n, c in caps.items()} == {
        "code": ("text", "next_token", "last", False),
        "minilm": (
            "text",
            "hidden",
            "mean",
            True,
        ),  # its sentence-transformers modules.json: Pooling, Normalize
        "mlm": ("text", "masked_token", "mean", False),
        "bert": ("text", "hidden", "mean", False),
        "vit": ("image", "class", "cls", False),
        "digits": ("image", "class", "cls", False),
    }
    assert (caps["vit"].image_shape, caps["vit"].patch_grid) == ((3, 16, 16), (4, 4))
    assert (caps["digits"].image_shape, caps["digits"].patch_grid) == ((1, 8, 8), (4, 4))
    assert caps["vit"].class_names == tuple(f"LABEL_{i}" for i in range(5))


def test_minilm_pooled_embedding_is_sentence_transformers_mean_pooling(minilm) -> None:
    """Mean pooling over the attention mask of HF BertModel's last hidden state, L2-normalised (the model's
    modules.json), computed by hand; an ablation through the lab equals the same ablation as a torch pre-hook on HF's
    attention output projection."""
    from workbench.model import packaged_model_dir

    hf = _hf(packaged_model_dir("minilm"), "BertModel")
    tokenizer = minilm.tokenizer
    second = "a dog lay on the rug"

    def by_hand(text: str) -> torch.Tensor:
        batch = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = hf(**batch).last_hidden_state.double()  # [1, pos, d]
        mask = batch["attention_mask"][..., None].double()
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=-1)[0]

    tokens = lab.encode_prompt(minilm, SENTENCE)
    torch.testing.assert_close(
        lab.pooled_embedding(minilm, tokens).double(), by_hand(SENTENCE), rtol=0, atol=2e-6
    )
    heads = (0, 3, 7)
    stack = [Intervention("zero", "blocks.2.attn.hook_z", heads=heads)]
    handle = hf.encoder.layer[2].attention.output.dense.register_forward_pre_hook(
        _zero_heads_pre_hook(heads, 12)
    )
    try:
        ablated = by_hand(SENTENCE)
    finally:
        handle.remove()
    result = lab.compare_embeddings(minilm, tokens, stack, second)
    torch.testing.assert_close(result.intervened.double(), ablated, rtol=0, atol=2e-6)
    clean, other = by_hand(SENTENCE), by_hand(second)
    assert result.cosine("clean · intervened") == pytest.approx(float(clean @ ablated), abs=1e-5)
    assert result.cosine("clean · second") == pytest.approx(float(clean @ other), abs=1e-5)
    assert result.cosine("intervened · second") == pytest.approx(float(ablated @ other), abs=1e-5)
    assert result.cosine("clean · intervened") < 0.9999  # the ablation moved the embedding
    assert [r["layer"] for r in lab.residual_profile(minilm, tokens).to_dict("records")][-1] == 5
    with pytest.raises(lab.PromptLabError, match="no output head"):
        lab.compare_outputs(minilm, tokens, stack)


def test_masked_lm_head_top_tokens_equal_the_hf_head_under_a_manual_hook(user_dirs) -> None:
    model = lab.load_lab_model(str(user_dirs / "my-mlm"))
    hf = _hf(user_dirs / "my-mlm", "BertForMaskedLM")
    tokens = lab.encode_prompt(model, SENTENCE)
    (at,) = lab.mask_positions(model, tokens)
    assert model.position_labels(tokens)[at] == "[MASK]"
    neurons = (1, 5, 17)
    stack = [Intervention("zero", "blocks.1.mlp.hook_post", neurons=neurons)]

    def zero_units(module, args, output):
        output = output.clone()
        output[..., list(neurons)] = 0
        return output

    with torch.no_grad():
        clean = hf(input_ids=tokens).logits[0, at]
        handle = hf.bert.encoder.layer[1].intermediate.register_forward_hook(zero_units)
        try:
            ablated = hf(input_ids=tokens).logits[0, at]
        finally:
            handle.remove()
    result = lab.compare_outputs(model, tokens, stack, top_k=5, position=at)
    torch.testing.assert_close(result.clean, clean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.intervened, ablated, rtol=1e-5, atol=1e-5)
    top = clean.softmax(-1).topk(5).indices.tolist()
    assert result.table["token_id"].tolist()[:5] == top
    assert result.table["token"].tolist()[:5] == [model.tokenizer.decode([i]) for i in top]
    assert result.table["p_intervened"].tolist()[:5] == pytest.approx(
        ablated.softmax(-1)[top].tolist(), abs=1e-6
    )
    assert result.kl > 0
    assert lab.capabilities(model).pooling == "mean"  # and the embedding is the plain mean of the last block
    _, cache = model.run_with_cache(tokens, ["blocks.1.hook_resid_post"])
    torch.testing.assert_close(
        lab.pooled_embedding(model, tokens), cache["blocks.1.hook_resid_post"][0].mean(0)
    )


def test_vit_class_probabilities_are_the_hf_softmax_and_images_come_from_a_dataset(
    user_dirs, vit_model_dir
) -> None:
    from workbench.zoo.corpora import digits_dataset

    digits = lab.load_lab_model(str(vit_model_dir))
    picture = lab.load_image(digits, "zoo:digits", 3)
    _, _, x_test, y_test = digits_dataset()
    assert (
        torch.equal(picture.pixels, x_test[3][None])
        and picture.label == int(y_test[3])
        and picture.note == ""
    )
    assert digits.position_labels(picture.pixels)[:3] == ["CLS", "0,0", "0,1"]

    model = lab.load_lab_model(str(user_dirs / "my-vit"))  # 3 channels, 16×16: the grey 8×8 digit adapted
    image = lab.load_image(model, "zoo:digits", 3)
    assert image.pixels.shape == (1, 3, 16, 16) and image.note == "grey → RGB; resized 8×8 → 16×16"
    hf = _hf(user_dirs / "my-vit", "ViTForImageClassification")
    heads = (1, 2)
    stack = [Intervention("zero", "blocks.0.attn.hook_z", heads=heads)]
    with torch.no_grad():
        clean = hf(pixel_values=image.pixels).logits[0]
        handle = hf.vit.layers[0].attention.o_proj.register_forward_pre_hook(_zero_heads_pre_hook(heads, 4))
        try:
            ablated = hf(pixel_values=image.pixels).logits[0]
        finally:
            handle.remove()
        hidden = hf(
            pixel_values=image.pixels, output_hidden_states=True
        ).hidden_states  # embed + one per layer
    result = lab.compare_outputs(model, image.pixels, stack, top_k=5)
    table = result.table.set_index("token_id").sort_index()
    assert table["p_clean"].tolist() == pytest.approx(clean.softmax(-1).tolist(), abs=1e-6)
    assert table["p_intervened"].tolist() == pytest.approx(ablated.softmax(-1).tolist(), abs=1e-6)
    assert table["token"].tolist() == [f"LABEL_{i}" for i in range(5)]
    profile = lab.residual_profile(model, image.pixels)
    for layer in range(2):
        rows = profile[profile["layer"] == layer].sort_values("position")
        assert rows["resid_norm"].tolist() == pytest.approx(
            hidden[layer + 1][0].norm(dim=-1).tolist(), rel=1e-5
        )
    grid = lab.patch_grid(model, rows["resid_norm"].tolist())
    assert grid.shape == (4, 4) and float(grid[1, 2]) == pytest.approx(rows["resid_norm"].iloc[1 + 1 * 4 + 2])
    figure = patch_figure(image.pixels, grid, "norms")
    assert len(figure.data) == 2 and figure.data[1].z.shape == (4, 4)
    attention = lab.attention_profile(model, image.pixels)
    pattern = lab.head_pattern(model, image.pixels, 1, 3).double()  # [query, key], 17 positions
    entropy = -(pattern * pattern.clamp_min(1e-300).log()).sum(-1)
    row = attention[(attention["layer"] == 1) & (attention["head"] == 3)].iloc[0]
    assert row["entropy"] == pytest.approx(float(entropy[1:].mean()), abs=1e-4)
    assert row["sink"] == pytest.approx(float(pattern[1:, 0].mean()), abs=1e-4)
    with pytest.raises(lab.PromptLabError, match=r"has 450 images; pick an index in 0\.\.449"):
        lab.load_image(model, "zoo:digits", 10_000)
    from workbench.datasets import DatasetError

    with pytest.raises(DatasetError, match="not images"):
        lab.load_image(model, "zoo:python-stdlib", 0)
    frame = lab.session_frame(model, image.name, stack, result, {}, {}, outputs={"note": image.note})
    assert frame["output"].iloc[0] == "class" and frame["prompt"].iloc[0] == "zoo:digits#3"
    assert json.loads(frame["next_token"].iloc[0])[0]["token"] == result.table["token"].iloc[0]


def test_page_shows_an_encoders_embedding_and_probe_clean_vs_intervened(
    minilm, tmp_path, monkeypatch
) -> None:
    """MiniLM on the page: the pooled-embedding cosines and a saved probe's per-token predictions, clean and under
    a head ablation added in the form, equal the library's (and the probe's under the same ablation)."""
    from workbench.probes.readout import probe_predictions
    from workbench.workspace import Workspace

    workspace = Workspace(tmp_path).ensure()
    site = "blocks.3.hook_resid_post"
    batch = minilm.tokenize(["the cat sat on the mat", "a dog ran in the park", "birds fly over the sea"])
    _, cache = minilm.run_with_cache(batch, [site])
    real = batch["attention_mask"].bool()
    probes = fit_probes({site: cache[site][real]}, (batch["input_ids"][real] % 2).long())
    save_probe(workspace, "minilm-parity", probes, model=minilm, label_names=["even", "odd"])
    app = _page(workspace, monkeypatch)
    app.text_input(key="lab_reference").set_value("minilm").run()
    app.text_area(key="lab_prompt").set_value(SENTENCE)
    app.text_input(key="lab_second").set_value("a dog lay on the rug").run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    tokens = lab.encode_prompt(minilm, SENTENCE)
    metrics = {m.label: float(m.value) for m in app.metric}
    clean = lab.compare_embeddings(minilm, tokens, [], "a dog lay on the rug")
    assert metrics["cosine clean · second"] == pytest.approx(clean.cosine("clean · second"), abs=1e-4)
    assert metrics["cosine clean · intervened"] == pytest.approx(1.0, abs=1e-4)
    app.selectbox(key="lab_iv_kind").set_value("zero-ablate heads").run()
    app.selectbox(key="lab_iv_layer").set_value(2)
    app.text_input(key="lab_iv_heads").set_value("0, 3, 7")
    app.button(key="lab_iv_add").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    stack = [Intervention("zero", "blocks.2.attn.hook_z", heads=(0, 3, 7))]
    want = lab.compare_embeddings(minilm, tokens, stack, "a dog lay on the rug")
    metrics = {m.label: float(m.value) for m in app.metric}
    for pair in ("clean · intervened", "clean · second", "intervened · second"):
        assert metrics[f"cosine {pair}"] == pytest.approx(want.cosine(pair), abs=1e-4)
    assert metrics["cosine clean · intervened"] < 0.9999
    shown = app.dataframe[-1].value
    with minilm.hooks([("blocks.2.attn.hook_z", lambda a, h: a.index_fill(2, torch.tensor([0, 3, 7]), 0.0))]):
        ablated = probe_predictions(minilm, tokens, probes, site, ["even", "odd"])
    assert (
        shown["label_clean"].tolist()
        == probe_predictions(minilm, tokens, probes, site, ["even", "odd"])["label"].tolist()
    )
    assert shown["label_intervened"].tolist() == ablated["label"].tolist()
    assert shown["confidence_intervened"].tolist() == pytest.approx(ablated["confidence"].tolist(), abs=1e-5)


def test_page_shows_a_vits_patches_classes_and_neuron_path(dashboard_workspace, monkeypatch) -> None:
    """vit-digits on the page (a workspace holding text models' SAEs, which are not offered for it): an image of
    zoo:digits, patch overlays, class probabilities clean vs a head ablation (KL as the library gives it), the neuron
    path the library locates, and a bad image reference as a message."""
    from workbench.circuits.neuron_path.analysis import joint_score, locate_path, make_task

    app = _page(dashboard_workspace, monkeypatch)
    app.selectbox(key="lab_model").set_value("vit-digits").run()
    app.number_input(key="lab_image_index").set_value(3).run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    model = lab.load_lab_model("vit-digits", workspace=dashboard_workspace)
    picture = lab.load_image(model, "zoo:digits", 3)
    assert any(f"label {picture.label}" in c.value for c in app.caption)
    assert [s.value for s in app.subheader][:2] == ["Patches", "Attention"]
    clean = lab.compare_outputs(model, picture.pixels, [], top_k=5)
    best = clean.table["token"].iloc[0]
    assert any(
        m.value.startswith(f"top class clean &#39;{best.replace('_', '&#95;')}&#39;") for m in app.markdown
    )
    app.selectbox(key="lab_image_iv_kind").set_value("zero-ablate heads").run()
    app.selectbox(key="lab_iv_layer").set_value(1)
    app.text_input(key="lab_iv_heads").set_value("0, 1, 2")
    app.button(key="lab_iv_add").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    stack = [Intervention("zero", "blocks.1.attn.hook_z", heads=(0, 1, 2))]
    kl = lab.compare_outputs(model, picture.pixels, stack, top_k=5).kl
    assert kl > 0 and app.metric[0].value == f"{kl:.4f}"
    app.number_input(key="lab_np_steps").set_value(2)
    app.button(key="lab_np_run").click().run()
    assert not app.exception and not app.error, [e.value for e in app.error]
    target = torch.tensor([int(clean.clean.argmax())])
    path, _ = locate_path(model, make_task(model, picture.pixels, target, position=0), 2, 1, progress=False)
    described = "; ".join(f"layer {ly}: {', '.join(map(str, ns))}" for ly, ns in path.items())
    assert any(m.value == f"path at CLS: {described}" for m in app.markdown)
    at_cls = joint_score(model, make_task(model, picture.pixels, target, position=0), path, 2)
    assert any(c.value.startswith(f"at CLS: {at_cls:.4g}") for c in app.caption)
    app.text_input(key="lab_image_data").set_value("zoo:python-stdlib").run()
    assert not app.exception and "not images" in app.error[0].value


def test_an_image_folder_feeds_the_lab(vit_model_dir, tmp_path) -> None:
    """A folder of PNGs in class subfolders (workbench.datasets' image-folder form): pixels are the PNG's bytes / 255,
    the label the subfolder's index; images of two sizes are refused naming both files."""
    import numpy as np
    from PIL import Image

    from workbench.datasets import DatasetError, load_dataset

    generator = np.random.default_rng(0)
    grey = {
        f"{digit}/{i}.png": generator.integers(0, 256, (8, 8), dtype=np.uint8)
        for digit in (3, 7)
        for i in (0, 1)
    }
    for name, array in grey.items():
        (tmp_path / "digits" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(tmp_path / "digits" / name)
    model = lab.load_lab_model(str(vit_model_dir))
    picture = lab.load_image(model, str(tmp_path / "digits"), 2)  # sorted: 3/0, 3/1, 7/0, 7/1
    assert torch.equal(picture.pixels[0, 0], torch.from_numpy(grey["7/0.png"].astype(np.float32) / 255.0))
    assert picture.label == 1 and picture.note == ""
    assert lab.compare_outputs(model, picture.pixels, []).clean.shape == (10,)
    data = load_dataset(str(tmp_path / "digits" / "7" / "*.png"))
    assert data.inputs is not None and data.inputs.shape == (2, 1, 8, 8) and data.labels == {}
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "digits" / "7" / "big.png")
    with pytest.raises(DatasetError, match=r"differ in size \(0\.png 8×8, big\.png 16×16\); resize them"):
        load_dataset(str(tmp_path / "digits"))


def test_sae_latents_and_probe_predictions_read_an_images_patches(user_dirs) -> None:
    """The SAE and probe overlays on a ViT: one row per position (CLS, then each patch by row and column), the SAE's
    latents equal ``sae.encode`` of the model's own hidden state, the probe's confidences its softmax."""
    import transformers as T

    from workbench.circuits.sae import SAEConfig, create_sae
    from workbench.circuits.sae.readout import top_latents
    from workbench.probes.linear import LinearProbes
    from workbench.probes.readout import probe_predictions

    model = lab.load_lab_model(str(user_dirs / "my-vit"))
    image = lab.load_image(model, "zoo:digits", 3)
    d_model = model.cfg.d_model
    with torch.no_grad():
        hidden = T.ViTForImageClassification.from_pretrained(user_dirs / "my-vit")(
            pixel_values=image.pixels, output_hidden_states=True
        ).hidden_states[1][0]  # after block 0: [1 + patches, d_model]
    torch.manual_seed(0)
    sae = create_sae(SAEConfig("relu", d_in=d_model, d_sae=12, hook_in=RESID, hook_out=RESID))
    latents = top_latents(model, image.pixels, sae, k=2)
    codes = sae.encode(hidden).detach()
    assert set(latents["position"]) <= set(range(hidden.shape[0])) and not latents.empty
    for row in latents.itertuples():
        assert float(codes[row.position, row.latent]) == pytest.approx(row.activation, rel=1e-4, abs=1e-5)
        assert codes[row.position].topk(2).values[row.rank] == pytest.approx(
            row.activation, rel=1e-4, abs=1e-5
        )
    labels = model.position_labels(image.pixels)
    assert latents.set_index("position")["token"].to_dict() == {
        p: labels[p] for p in set(latents["position"])
    }

    generator = torch.Generator().manual_seed(1)
    probes = LinearProbes("classification", torch.randn(1, d_model, 3, generator=generator), torch.zeros(1, 3),
                          torch.zeros(1, d_model), torch.ones(1, d_model), torch.tensor([0, 1, 2]), [RESID], 1.0)  # fmt: skip
    predictions = probe_predictions(model, image.pixels, probes, RESID, ["a", "b", "c"])
    assert predictions["token"].tolist() == labels and len(labels) == hidden.shape[0] == 1 + 16
    proba = (hidden @ probes.weight[0]).softmax(-1)
    assert predictions["confidence"].tolist() == pytest.approx(proba.max(-1).values.tolist(), abs=1e-5)
    assert predictions["label"].tolist() == [["a", "b", "c"][i] for i in proba.argmax(-1).tolist()]
