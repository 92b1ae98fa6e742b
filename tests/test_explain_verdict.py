"""The verdict logic (framework-free): each verdict from the evidence a replay reports."""

from __future__ import annotations

import math

from nanguard.explain.verdict import VERDICTS, Diagnosis, ImageFacts, OpSite, ReplayFacts, judge


def record(kinds, **extra):
    return {"step": 7, "kind": kinds[0], "kinds": kinds, "lr": 0.04, "values": {"total_loss": 2e4, "grad_norm": 3e5},
            "image_ids": [1, 2], "annotation_ids": [[10], [20, 21]], **extra}


def facts(**extra) -> ReplayFacts:
    base = dict(replays=2, reproduced=True, same_every_time=True, losses={"loss_box_reg": math.nan},
                nonfinite_components=["loss_box_reg"])
    return ReplayFacts(**{**base, **extra})


def test_an_invalid_target_names_the_annotation_without_a_replay():
    d = judge(record(["invalid_target"], invalid_targets=[
        {"image_id": 2, "annotation_id": 21, "why": "non-finite coordinate"}]), None)
    assert (d.verdict, d.image_ids, d.annotation_ids, d.phase) == ("bad_annotation", [2], [21], "data")
    assert "drop annotation 21 of image 2" in d.advice and "nanguard audit" in d.advice


def test_a_step_that_does_not_reproduce_is_transient():
    d = judge(record(["nonfinite_grad"]), facts(reproduced=False, losses={"total_loss": 1.2}, grad_norm=3.0))
    assert d.verdict == "transient" and d.reproduced is False and "GPU" in d.advice


def test_a_wild_weight_whose_step_replays_healthy_is_still_corrupted_weights():
    # a flipped exponent bit in a bias the loss barely feels: the parameter check caught it, the replay
    # of the step is healthy, and the state it ran with holds the culprit
    d = judge(record(["wild_param"]), facts(reproduced=False, losses={"total_loss": 0.5}, grad_norm=1.8,
                                           nonfinite_components=[], state_wild=1, weight_change=1e-4,
                                           state_tensors=["backbone.body.2.block.1.1.bias"]))
    assert (d.verdict, d.module) == ("corrupted_weights", "backbone.body.2.block.1.1.bias")


def test_non_finite_pixels_in_the_image_that_fails_alone_make_a_bad_image():
    images = [ImageFacts(1, (10,), fails_alone=False), ImageFacts(2, (20, 21), fails_alone=True, nonfinite_pixels=99)]
    d = judge(record(["nonfinite_loss"]), facts(images=images, forward=OpSite("sub", "transform", "forward", False)))
    assert (d.verdict, d.image_ids, d.phase, d.module) == ("bad_image", [2], "data", "transform")
    assert any("99 non-finite pixel" in e for e in d.evidence)


def test_an_absurd_box_in_the_failing_image_makes_a_bad_annotation():
    images = [ImageFacts(1, (10,), fails_alone=True, bad_boxes=[(10, "box far outside the image")]),
              ImageFacts(2, (20,), fails_alone=False)]
    d = judge(record(["nonfinite_loss"]), facts(images=images))
    assert (d.verdict, d.image_ids, d.annotation_ids) == ("bad_annotation", [1], [10])


def test_a_few_bad_weight_elements_are_corrupted_weights_and_many_are_divergence():
    few = judge(record(["nonfinite_param"]), facts(state_nonfinite=1, state_tensors=["backbone.0.weight"],
                                                   weight_change=0.01, reference_step=49))
    assert (few.verdict, few.module) == ("corrupted_weights", "backbone.0.weight")
    many = judge(record(["nonfinite_param"]), facts(state_nonfinite=5000, state_tensors=["a", "b"], weight_change=3.0))
    assert many.verdict == "lr_divergence" and "lower train.lr from 0.04" in many.advice


def test_a_batch_healthy_on_the_older_state_is_lr_divergence():
    d = judge(record(["loss_spike"]), facts(nonfinite_components=[], spike=True, reference_ok=True, reference_step=49,
                                            weight_change=0.4))
    assert d.verdict == "lr_divergence" and any("after step 49" in e for e in d.evidence)
    assert "2e+04" in d.advice  # the loss it reached


def test_finite_in_float32_is_an_fp16_overflow():
    d = judge(record(["nonfinite_loss"]), facts(amp="fp16", full_precision_ok=True, reference_ok=False))
    assert d.verdict == "fp16_overflow" and "bf16" in d.advice
    assert judge(record(["nonfinite_loss"]), facts(amp="bf16", full_precision_ok=True)).verdict != "fp16_overflow"


def test_an_op_that_makes_nan_from_finite_inputs_is_numerical_op():
    d = judge(record(["nonfinite_loss"]), facts(forward=OpSite("log", "roi_heads.box_coder", "forward", True),
                                                reference_ok=False))
    assert (d.verdict, d.first_op, d.module, d.loss_component) == ("numerical_op", "log", "roi_heads.box_coder",
                                                                  "loss_box_reg")


def test_nothing_kept_is_unknown_and_says_how_to_get_it():
    d = judge(record(["nonfinite_loss"]), None)
    assert d.verdict == "unknown" and "explain" in d.advice


def test_an_unreadable_image_is_a_bad_image():
    d = judge(record(["model_error"], model_error="OSError: cannot identify image file 'x.png'"), None)
    assert (d.verdict, d.image_ids) == ("bad_image", [1, 2])


def test_every_verdict_is_in_the_vocabulary_and_facts_round_trip():
    f = facts(images=[ImageFacts(1, (10,), True, 1.0, 3, 0.0, [(10, "x")])], forward=OpSite("mul", "", "forward"))
    assert ReplayFacts.from_dict(f.to_dict()) == f
    assert Diagnosis("transient").verdict in VERDICTS


def test_a_loss_scale_below_the_floor_that_no_longer_overflows_is_still_fp16s():
    d = judge(record(["loss_scale_floor"], values={"loss_scale": 0.5}), facts(reproduced=False, amp="fp16"))
    assert d.verdict == "fp16_overflow" and "bf16" in d.advice
