"""Smoke test of the benchmark code paths on the tiny shape (1-2 steps each).

Checks that every suite produces its figures and that they are sane (finite,
positive, the two sides computing the same loss and greedy tokens), each repeated
figure with its min / median / max and the ratios of medians with their spread.
No timing is asserted: timings belong in the benchmark output, not in tests.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

from neva_jax.bench import flops, shapes, timing
from neva_jax.bench.__main__ import parse
from neva_jax.bench.report import Report
from neva_jax.model import clip, llama
from neva_jax.model.neva import NevaConfig


def _report() -> Report:
    return Report(io.StringIO())


def _lines(report: Report) -> list[dict]:
    """The printed JSON lines (each must parse)."""
    return [json.loads(line) for line in report.out.getvalue().splitlines()]


def _positive(rec: dict, *keys: str) -> None:
    for k in keys:
        assert math.isfinite(rec[k]) and rec[k] > 0, (rec["name"], k, rec[k])


def _repeated(rec: dict, key: str) -> None:
    """A repeated figure: min <= median <= max, spread = (max - min) / median.

    (A ratio of medians lies between its two per-pair ratios when there are 2 repeats.)
    """
    lo, mid, hi = rec[f"{key}_min"], rec[key], rec[f"{key}_max"]
    assert 0 < lo <= mid <= hi, (rec["name"], key, lo, mid, hi)
    assert rec[f"{key}_spread"] == pytest.approx((hi - lo) / mid)


def test_summary_and_ratio_of_medians():
    s = timing.summary("step_s", [4.0, 5.0, 6.0, 4.5])
    assert s == {"step_s": 4.75, "step_s_min": 4.0, "step_s_max": 6.0, "step_s_spread": 2 / 4.75}
    # Pairs measured back to back: 6/3 = 2, 6/4 = 1.5, 9/4.5 = 2; medians 6 / 4 = 1.5.
    r = timing.ratio_summary("speedup", [6.0, 6.0, 9.0], [3.0, 4.0, 4.5])
    assert r["speedup"] == 1.5 and (r["speedup_min"], r["speedup_max"]) == (1.5, 2.0)
    assert r["speedup_spread"] == pytest.approx(0.5 / 1.5)


def test_repeats_flag_and_table():
    assert parse(["train", "--repeats", "4"]).repeats == 4
    assert parse(["train", "--steps", "3"]).repeats == 3  # the old name still works
    assert parse([]).repeats == 5
    assert parse(["decode", "--decode-batches", "1,8"]).decode_batches == (1, 8)
    for bad in (["decode", "--decode-batches", "1,x"], ["compile", "--depths", "4"],
                ["decode", "--lora"], ["train", "--repeats", "0"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            parse(bad)  # a usage error before anything runs, not a traceback after
        assert e.value.code == 2
    report = _report()
    report.emit("train", "stage2_ratio", **timing.ratio_summary("speedup", [6.0, 8.0], [4.0, 5.0]))
    report.target("t", 1.5, ">= 1.3x", True, spread=0.1)
    table = report.table()
    assert "speedup=1.556 [1.500..1.600 6%]" in table and "1.556 (spread" not in table
    assert "1.500 (spread 10.0%)" in table


def test_flops_hand_worked():
    llm = llama.LlamaConfig(
        vocab_size=10,
        hidden_size=4,
        ffn_hidden_size=6,
        num_layers=2,
        num_attention_heads=2,
        num_query_groups=1,
        encoder_seq_length=16,
    )
    vision = clip.ClipConfig(
        image_size=8,
        patch_dim=4,
        hidden_size=4,
        ffn_hidden_size=8,
        num_layers=2,
        num_attention_heads=2,
    )
    cfg = NevaConfig(llm=llm, vision=vision, projector="mlp2x_gelu", image_token_id=9)
    # Per layer: q, o 4*2*2 = 16 each; k, v 4*1*2 = 8 each; swiglu 3*4*6 = 72 -> 120.
    # Two layers + LM head 4*10 = 280.
    assert flops.llm_matmul_params(llm) == 280
    # Vision, 1 block used (select -2 of 2): 4 patches + CLS = 5 tokens.
    # patch 2*4*(4*4*3)*4 = 1536; block 2*5*(4*16 + 2*4*8) = 1280; attention 4*5*5*4 = 400.
    assert flops.vision_forward_flops(vision) == 1536 + 1280 + 400
    assert flops.projector_params(cfg) == 4 * 4 + 4 * 4
    # B=2, T=8: 16 tokens. Attention 6*T*(N*H)*L = 6*8*4*2 = 384 per token.
    # Projector 6*32 per image token, 4 tokens per image, 2 images.
    f2 = flops.step_flops(cfg, 2, 8, stage=2)
    assert (f2.llm, f2.attention, f2.vision, f2.projector) == (6 * 280 * 16, 384 * 16, 6432, 1536)
    assert f2.total == 40992
    f1 = flops.step_flops(cfg, 2, 8, stage=1)
    assert f1.llm == 4 * 280 * 16 and f1.total == 32032
    assert flops.utilisation(f2.total, 2.0, f2.total) == pytest.approx(0.5)


def test_batch_layouts_agree():
    shape = shapes.tiny()
    batch = shapes.make_batch(shape)
    B, T = shape.batch_size, shape.seq_len
    assert batch["input_ids"].shape == (B, T)
    assert (batch["input_ids"] == shape.model.image_token_id).sum(1).tolist() == [16] * B
    assert batch["loss_mask"].sum(1).tolist() == [shape.trained_tokens] * B
    hf = shapes.hf_inputs(batch)
    # HF's label at t+1 is our target at t wherever our loss mask is set.
    trained = batch["loss_mask"] > 0
    np.testing.assert_array_equal(hf["labels"][:, 1:][trained[:, :-1]], batch["targets"][trained])
    assert (hf["labels"] != -100).sum() == trained.sum()
    assert hf["pixel_values"].shape == (B, 3, 32, 32)


def test_train_and_util():
    from neva_jax.bench import train_bench

    report = _report()
    result = train_bench.run_train(report, shapes.tiny(), repeats=2, warmup=1, logits_fraction=0.5)
    train_bench.run_util(report, shapes.tiny(), result)
    lines = _lines(report)
    assert len(lines) == len(report.records)
    for stage in (1, 2):
        for side in ("hf", "ours"):
            rec = report.find("train", f"stage{stage}_{side}")
            _positive(rec, "step_s", "tokens_per_s", "tflops", "model_flops_per_step")
            _repeated(rec, "step_s")
            _repeated(rec, "cpu_s")
            assert len(rec["steps_s"]) == 2
        _repeated(report.find("train", f"stage{stage}_ratio"), "speedup")
        _repeated(report.find("train", f"stage{stage}_ratio"), "speedup_cpu")
        # Same weights, same batch: the first losses agree.
        assert report.find("train", f"stage{stage}_ratio")["first_loss_abs_diff"] < 1e-4
        assert (
            report.find("train", f"stage{stage}_ours")["trainable_params"]
            == report.find("train", f"stage{stage}_hf")["trainable_params"]
        )
    _positive(report.find("util", "matmul_peak"), "jax_gflops", "torch_gflops", "peak_gflops")
    _positive(report.find("util", "stage2_ours"), "util")
    names = {r["name"] for r in report.records if r["bench"] == "target"}
    assert "train stage 2 tokens/s vs transformers (median)" in names
    assert "targets:" in report.table()


def test_train_lora(capsys):
    """`bench train --lora` from the command line: ours with adapters, our full stage 2,
    transformers + peft, each a median of its repeats, and the ratios with their spread."""
    from neva_jax.bench.__main__ import main

    argv = ["train", "--lora", "--shape", "tiny", "--repeats", "2", "--lora-rank", "4"]
    assert main([*argv, "--logits-fraction", "0.5"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    found = {r["name"]: r for r in rows if r.get("bench") == "train_lora"}
    for name in ("ours_lora", "ours_full", "peft"):
        assert found[name]["step_s"] > 0 and found[name]["tokens_per_s"] > 0
        assert found[name]["step_s_min"] <= found[name]["step_s"] <= found[name]["step_s_max"]
    ratios = found["ratios"]
    assert ratios["full_over_lora"] > 0 and ratios["peft_over_ours"] > 0
    assert ratios["peft_over_ours_min"] <= ratios["peft_over_ours_max"]
    assert ratios["first_loss_abs_diff"] < 1e-4  # same weights, B = 0: the same loss
    ours, peft = found["ours_lora"], found["peft"]
    assert ours["trainable_params"] == peft["trainable_params"]
    assert ours["trainable_params"] < found["ours_full"]["trainable_params"]


def test_decode():
    from neva_jax.bench import decode_bench

    report = _report()
    shape = shapes.tiny()
    decode_bench.run_decode(report, shape, batches=(1, 2), new_tokens=8, repeats=2)
    for side in ("hf", "ours"):
        rec = report.find("decode", f"b2_{side}")
        _positive(rec, "e2e_s", "ttft_s", "tokens_per_s")
        for key in ("e2e_s", "ttft_s", "decode_tokens_per_s", "e2e_cpu_s"):
            _repeated(rec, key)
    ratio = report.find("decode", "b2_ratio")
    assert ratio["greedy_token_agreement"] == 1.0
    for key in ("decode_rate_ratio", "latency_ratio", "ttft_ratio"):
        _repeated(ratio, key)
    rec = report.find("decode", "b2_recompiles")
    assert isinstance(rec["recompiles"], int) and rec["recompiles"] >= 0
    # The batch-1 floor: the bytes of every LLM weight a step reads (the head, not an
    # untied embedding table).
    floor = report.find("decode", "b1_floor")
    llm = shape.model.llm
    D, F, L, V = llm.hidden_size, llm.ffn_hidden_size, llm.num_layers, llm.vocab_size
    kv = llm.num_query_groups or llm.num_attention_heads
    H = D // llm.num_attention_heads
    per_layer = 2 * D * D + 2 * D * kv * H + 3 * D * F + 2 * D  # q, o, k, v, MLP, 2 norms
    expected = (L * per_layer + D + D * V) * 4
    assert floor["weight_mb"] == pytest.approx(expected / 1e6)
    assert floor["weight_read_ms"] == min(floor["xla_matvec_ms"], floor["numpy_sum_ms"]) > 0
    assert floor["best_possible_rate_ratio"] == pytest.approx(
        floor["hf_step_ms"] / floor["weight_read_ms"]
    )


def test_compile():
    from neva_jax.bench import compile_bench

    report = _report()
    out = compile_bench.run_compile(report, shapes.tiny(), depths=(1, 2), unrolled=False)
    assert set(out) == {(1, True), (2, True)}
    _positive(report.find("compile", "layers2_scan"), "lower_s", "compile_s", "total_s")


def test_packing():
    from neva_jax.bench import packing_bench

    report = _report()
    packing_bench.run_packing(report, shapes.tiny(), repeats=2, seq_len=192)
    padded, packed = report.find("packing", "padded"), report.find("packing", "packed")
    for rec in (padded, packed):
        _positive(rec, "real_tokens_per_s", "real_tokens_per_step", "non_padding_fraction")
        assert rec["non_padding_fraction"] <= 1.0
        _repeated(rec, "step_s")
    assert packed["samples_per_step"] > padded["samples_per_step"]
