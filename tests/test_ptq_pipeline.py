"""Post-training quantization through export: ``--ptq`` methods, ``--calib zeroq``, and what they leave
behind (an exact int8 model, the user's float model as diff's reference, a reloadable checkpoint)."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import deployq
from deployq.cli import main
from deployq.examples import zoo
from deployq.deploy.export import export
from deployq.ptq.calibration_search import search_calibration
from deployq.ptq.pipeline import PTQOptions, parse_methods
from deployq.qat.calibrate import first_samples, qparams_of
from deployq.qat.loading import resolve_model

SHAPE = (1, 3, 16, 16)


def _photos(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(SHAPE, generator=gen) for _ in range(n)]


@pytest.fixture(scope="module")
def float_model() -> torch.nn.Module:
    model = zoo.resnet()
    model.train()
    with torch.no_grad():  # BatchNorm statistics of the data (zoo models start at the defaults)
        for x in _photos(8, 1):
            model(x * 2)
    return model.eval()


@pytest.fixture(scope="module")
def every_method(float_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ptq")
    torch.save(float_model.state_dict(), out / "float.pt")
    source = resolve_model(ckpt=str(out / "float.pt"), factory="deployq.examples.zoo:resnet", input_shape=SHAPE)
    options = PTQOptions(("cle", "search", "adaround", "bias"), adaround_iterations=20, refine_samples=4)
    result = export(source, out / "int8", calib=_photos(12, 2), ptq=options, progress=False, ort_format=False)
    return float_model, result


def test_methods_parse_in_pipeline_order_and_unknown_ones_are_named():
    assert parse_methods("bias, CLE,search") == ("cle", "search", "bias")
    assert parse_methods("") == ()
    with pytest.raises(ValueError, match="--ptq: unknown method.*adaroud"):
        parse_methods("cle,adaroud")


def test_method_budgets_count_samples_whatever_the_batch_size():
    ones = [torch.zeros(1, 3, 4, 4) for _ in range(40)]
    tens = [{"x": torch.zeros(10, 3, 4, 4)} for _ in range(4)]
    pairs = [(torch.zeros(4, 3), torch.zeros(4, 1)) for _ in range(5)]
    assert len(first_samples(ones, 32)) == 32 and len(first_samples(tens, 32)) == 4
    assert len(first_samples(pairs, 8)) == 2 and len(first_samples(ones[:3], 32)) == 3
    with pytest.raises(ValueError, match="refine_samples and search_samples"):
        PTQOptions(("bias",), refine_samples=0)
    with pytest.raises(ValueError, match="bias_shrink must be 0 or more"):
        PTQOptions(("bias",), bias_shrink=-0.5)


def test_bias_shrink_reaches_the_correction_and_its_note(float_model, monkeypatch):
    from deployq.ptq import pipeline

    seen = []
    real = pipeline.correct_bias
    monkeypatch.setattr(pipeline, "correct_bias", lambda *args, **kwargs: seen.append(kwargs["shrink"])
                        or real(*args, **kwargs))
    for shrink in (0.0, 0.5):
        model = deployq.prepare(float_model, torch.rand(*SHAPE))
        result = pipeline.quantize_post_training(model, _photos(4, 2), PTQOptions(("bias",), bias_shrink=shrink),
                                                 progress=False)
        note = next(n for n in result.notes if n.startswith("bias: ") and "corrected on" in n)
        assert ("less 0.5 of that spread" in note) == (shrink == 0.5), note
    assert seen == [0.0, 0.5]


def test_every_method_together_stays_exact_and_diff_compares_with_the_users_float_model(every_method):
    float_model, result = every_method
    held_out = _photos(2, 3)
    assert deployq.check(result.qmodel, result.files["int8"], inputs=held_out).ok(max_lsb=1)
    assert any(n.startswith("adaround:") for n in result.notes) and any(n.startswith("bias:") for n in result.notes)
    sess = ort.InferenceSession(str(result.files["float"]), providers=["CPUExecutionProvider"])
    for x in held_out:  # the float ONNX model is the user's (CLE keeps its function), not AdaRound's
        (onnx_out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        np.testing.assert_allclose(onnx_out, float_model(x).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_the_exported_checkpoint_keeps_adarounds_weight_qparams(every_method, tmp_path):
    _, result = every_method
    from deployq.qat import checkpoint as ck

    saved = ck.load(result.files["checkpoint"])
    assert saved.fixed_weight_qparams and saved.meta["ptq"] == ["cle", "search", "adaround", "bias"]
    report = deployq.check(result.files["checkpoint"], result.files["int8"], inputs=_photos(2, 4))
    assert report.ok(max_lsb=1)


def test_qparams_json_records_each_activations_calibration_method(every_method):
    _, result = every_method
    records = json.loads(result.files["qparams"].read_text())["quant_points"]
    observers = {r["kind"]: set() for r in records}
    for r in records:
        observers[r["kind"]].add(r["observer"])
    assert observers["weight"] == {None}
    assert observers["activation"] and all(o in ("minmax", "percentile", "mse", "kl")
                                           or o.startswith("percentile(lower=") for o in observers["activation"])


def test_search_never_scores_below_the_configs_own_method(float_model):
    qmodel = deployq.prepare(float_model, torch.rand(SHAPE))
    report = search_calibration(qmodel, _photos(8, 5), methods=("minmax", "mse", "percentile_99.999"), eval_samples=2)
    assert report.sqnr_end_db >= report.sqnr_start_db and report.held_out and report.scored_samples == 2
    chosen = {name: r.observer for name, r in qparams_of(qmodel).items() if r.kind != "weight"}
    assert chosen == report.chosen
    assert set(chosen.values()) <= {"minmax", "mse", "percentile(lower=0.001, upper=99.999)"}
    with pytest.raises(ValueError, match="unknown methods.*median"):
        search_calibration(qmodel, _photos(1, 5), methods=("median",))


def test_search_scores_each_output_alike_and_holds_its_scored_samples_out(float_model, monkeypatch):
    from deployq.ptq import calibration_search as cs

    big, small = torch.tensor([100.0, -100.0], dtype=torch.float64), torch.tensor([0.01, -0.01], dtype=torch.float64)
    noisy = [[big + 1.0, small + 0.001]]  # 40 dB and 20 dB: their mean, not the pooled 40 dB
    assert cs.mean_output_sqnr_db([[big, small]], noisy) == pytest.approx((40 + 20) / 2, abs=1e-9)
    assert cs.output_sqnr_db([big, small], noisy[0]) == pytest.approx(40, abs=0.01)
    assert cs.mean_output_sqnr_db([[big, small]], [[big, small]]) == cs.CEILING_DB

    observed = []
    real = cs._observe_with
    monkeypatch.setattr(cs, "_observe_with", lambda m, q, method, inputs: observed.append(len(inputs)) or real(m, q, method, inputs))
    qmodel = deployq.prepare(float_model, torch.rand(SHAPE))
    report = search_calibration(qmodel, _photos(6, 5), methods=("minmax", "mse"), eval_samples=2)
    assert report.held_out and observed == [4, 4]  # the 2 scored samples are not observed while choosing
    observed.clear()
    report = search_calibration(qmodel, _photos(3, 5), methods=("minmax", "mse"), eval_samples=2)
    assert not report.held_out and observed == [3, 3]  # too few to hold out: said in the report


def test_cli_zeroq_calibrates_without_data_and_ptq_needs_calibration(float_model, tmp_path):
    weights = tmp_path / "float.pt"
    torch.save(float_model.state_dict(), weights)
    base = ["export", "--ckpt", str(weights), "--model", "deployq.examples.zoo:resnet", "--input-shape", "1,3,16,16"]
    result = CliRunner().invoke(main, [*base, "--calib", "zeroq", "--calib-batches", "8", "--ptq", "bias",
                                       "--refine-samples", "3", "--out", str(tmp_path / "zq"), "--no-ort", "-q",
                                       "--json", str(tmp_path / "zq.json")])
    assert result.exit_code == 0, result.output
    notes = json.loads((tmp_path / "zq.json").read_text())["notes"]
    assert any(n.startswith("bias:") and "on 3 calibration samples;" in n for n in notes), notes
    assert (tmp_path / "zq" / "model.int8.onnx").is_file()
    refused = CliRunner().invoke(main, [*base, "--calib", "zeroq", "--ptq", "cle,rounding", "--out", str(tmp_path / "x")])
    assert refused.exit_code != 0 and "rounding" in refused.output and not (tmp_path / "x").exists()
    missing = CliRunner().invoke(main, [*base, "--calib", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")])
    assert missing.exit_code != 0 and "does not exist" in missing.output


def test_zeroq_needs_batchnorm(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())
    with pytest.raises(ValueError, match="BatchNorm"):
        deployq.export(model, torch.rand(SHAPE), tmp_path / "out", calib="zeroq")
    assert not (tmp_path / "out").exists()


class _Report:  # what the pipeline's note reads from a bias-correction report
    layers, within_noise, channels, skipped, outputs = [], 0, 0, [], None


def _harmful_bias_correction(model, batches, **kwargs):
    """A 'method' that makes the model worse everywhere: every weight's sign flipped."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.neg_()
    return _Report()


def test_a_method_that_lowers_the_held_out_score_is_undone(float_model, monkeypatch):
    """A refinement is scored on the calibration samples it did not learn from and undone if it
    lowers the output SQNR there: the model is then exactly what calibration left, and the note
    says so. Without held-out samples it is scored on the samples it learned from instead."""
    from deployq.ptq import pipeline

    monkeypatch.setattr(pipeline, "correct_bias", _harmful_bias_correction)
    model = deployq.prepare(float_model, torch.rand(*SHAPE))
    result = pipeline.quantize_post_training(model, _photos(12, 2), PTQOptions(("bias",), refine_samples=4),
                                             progress=False)
    assert any(n.startswith("held-out check: output SQNR on the 8 calibration samples") for n in result.notes)
    assert any(n.startswith("bias: undone, it lowered the output SQNR on the 8 held-out") for n in result.notes)
    with torch.no_grad():  # the model as calibration left it (reference: the model before any refinement)
        assert all(torch.equal(result.model(x), result.reference(x)) for x in _photos(3, 5))

    model = deployq.prepare(float_model, torch.rand(*SHAPE))
    result = pipeline.quantize_post_training(model, _photos(4, 2), PTQOptions(("bias",), refine_samples=4),
                                             progress=False)
    assert any(n.startswith("held-out check: none, all 4 calibration samples") for n in result.notes)
    assert any(n.startswith("bias: undone, it lowered the output SQNR on the 4 calibration samples it learned from")
               for n in result.notes)
    with torch.no_grad():
        assert all(torch.equal(result.model(x), result.reference(x)) for x in _photos(3, 5))


def test_without_held_out_samples_a_method_that_helps_its_own_samples_is_kept(float_model):
    """All calibration samples learned from: real bias correction raises the output SQNR on them,
    so it stays and the model differs from what calibration left."""
    from deployq.ptq import pipeline

    model = deployq.prepare(float_model, torch.rand(*SHAPE))
    result = pipeline.quantize_post_training(model, _photos(12, 2), PTQOptions(("bias",), refine_samples=12),
                                             progress=False)
    assert any(n.startswith("held-out check: none, all 12 calibration samples") for n in result.notes)
    assert not any("undone" in n for n in result.notes), result.notes
    with torch.no_grad():
        assert not any(torch.equal(result.model(x), result.reference(x)) for x in _photos(3, 5))


def test_the_check_on_learned_samples_scores_the_outputs_bias_correction_computed(float_model, monkeypatch):
    """On the samples bias correction learns from, one float pass gives the check its reference
    and bias correction its targets, and the check scores the outputs bias correction computed:
    the model runs once more, for the score after calibration."""
    from deployq.ptq import pipeline

    runs = []
    counted = pipeline.model_outputs
    monkeypatch.setattr(pipeline, "model_outputs", lambda model, inputs: runs.append(1) or counted(model, inputs))
    model = deployq.prepare(float_model, torch.rand(*SHAPE))
    result = pipeline.quantize_post_training(model, _photos(12, 2), PTQOptions(("bias",), refine_samples=12),
                                             progress=False)
    assert len(runs) == 1  # the check's score after calibration; its float reference came with bias correction's
    # targets, and its score after the method with bias correction's outputs
    assert not any("undone" in n for n in result.notes), result.notes
    check = pipeline.HeldOut(result.reference, _photos(12, 2))  # running the models: it did gain there
    assert check.measure(result.model) > check.score


def test_a_method_that_helps_on_held_out_samples_is_kept(float_model):
    """Real bias correction on this model raises the held-out score: it stays, nothing is undone."""
    from deployq.ptq import pipeline

    model = deployq.prepare(float_model, torch.rand(*SHAPE))
    result = pipeline.quantize_post_training(model, _photos(24, 2), PTQOptions(("bias",), refine_samples=12),
                                             progress=False)
    assert not any("undone" in n for n in result.notes), result.notes
    assert any(n.startswith("bias: ") and "on 12 calibration samples" in n for n in result.notes)
    check = pipeline.HeldOut(result.reference, _photos(24, 2)[12:])  # float outputs before bias correction
    assert check.measure(result.model) > check.score


class _Counting(torch.nn.Module):
    """Counts its forward calls; with `one_at_a_time` it refuses a batch of more than one."""

    def __init__(self, one_at_a_time: bool = False):
        super().__init__()
        self.conv, self.calls, self.one = torch.nn.Conv2d(3, 2, 3), 0, one_at_a_time

    def forward(self, x):
        self.calls += 1
        if self.one and x.shape[0] != 1:
            raise RuntimeError("written for one sample")
        return self.conv(x), x.mean((1, 2, 3))


def test_output_scores_run_inputs_stacked_and_sum_as_one_by_one():
    """model_outputs runs equal-shaped inputs as one batch (8 samples at most) and its sums are the
    one-by-one sums; a model that refuses the stacked batch gets its inputs one by one; inputs of
    another shape start a new batch."""
    from deployq.ptq.batched import model_outputs
    from deployq.ptq.calibration_search import output_sqnr_db

    g = torch.Generator().manual_seed(0)
    inputs = [(torch.rand(1, 3, 8, 8, generator=g),) for _ in range(10)] + [(torch.rand(1, 3, 6, 6, generator=g),)]
    model = _Counting()
    stacked = model_outputs(model, inputs)
    assert model.calls == 3  # 8 stacked, 2 stacked, the 6x6 one alone
    with torch.no_grad():
        singles = [[t.double() for t in model(*args)] for args in inputs]
    flat = lambda runs, k: [run[k] for run in runs]
    for k in range(2):
        signal = sum(float(t.square().sum()) for t in flat(singles, k))
        assert sum(float(t.square().sum()) for t in flat(stacked, k)) == pytest.approx(signal, rel=1e-6)
    noisy = [[t + 0.01 for t in run] for run in stacked]
    assert output_sqnr_db(flat(stacked, 0), flat(noisy, 0)) == pytest.approx(
        output_sqnr_db(flat(singles, 0), [t + 0.01 for t in flat(singles, 0)]), rel=1e-6)
    refusing = _Counting(one_at_a_time=True)
    assert len(model_outputs(refusing, inputs)) == 11 and refusing.calls == 2 + 11  # two refused batches, then each


def test_the_adaround_note_says_which_layers_kept_nearest_rounding_and_why():
    from deployq.ptq.adaround import NOT_GENERAL, UNDERDETERMINED, AdaRoundLayer, AdaRoundReport
    from deployq.ptq.pipeline import kept_nearest_text

    layers = [AdaRoundLayer("a", 10, 1.0, 0.5, 0.1), AdaRoundLayer("b", 10, 1.0, 1.0, 0.0, UNDERDETERMINED),
              AdaRoundLayer("c", 10, 1.0, 1.0, 0.0, NOT_GENERAL),
              AdaRoundLayer("d", 10, 1.0, 1.0, 0.0, NOT_GENERAL)]
    text = kept_nearest_text(AdaRoundReport(tuple(layers)))
    assert "1 (fewer samples × positions than weights per channel)" in text
    assert "2 (their rounding learned on half the samples lost on the other half)" in text
    assert kept_nearest_text(AdaRoundReport(tuple(layers[:1]))) == ""
