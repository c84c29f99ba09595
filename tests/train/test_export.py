"""`vlmtune export`: trainer checkpoints (ZeRO-2 / ZeRO-3, full / LoRA) -> HF folders that reload to the trained logits.

Each run trains the tiny model 2 steps in this process. When the trainer writes its checkpoint, a wrapper around
``trainer._save_checkpoint`` snapshots the engine's live weights (gathered with ``GatheredParameters`` under ZeRO-3):
the reference the exports are compared with, read without any of the export code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from tests.train.conftest import launcher_env_restored
from vlmtune.train.export import ExportError, export_checkpoint, published_name
from vlmtune.train.export import main as export_main

PACKING_LENGTH = 512
QUESTION = "What colour is the shape?"


def _recipe(model: Path, train_file: Path, pack_dir: Path, out: Path, stage: int, lora: bool) -> Any:
    from vlmtune.config import recipe_from_dict

    model_section: dict[str, Any] = {"path": str(model), "dtype": "float32", "attention": "sdpa_varlen",
                                     "gradient_checkpointing": {"decoder": False, "vision": False}}
    if lora:
        model_section["lora"] = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0}
        model_section["freeze"] = {"decoder": True}  # vision tower + projector train fully next to the adapters
    data = {
        "model": model_section,
        "data": {"train": [{"path": str(train_file)}]},
        "packing": {"packing_length": PACKING_LENGTH, "pack_dir": str(pack_dir)},
        "train": {"output_dir": str(out), "max_steps": 2, "global_batch_size": 2, "micro_batch_size": 1,
                  "learning_rate": 1e-2 if lora else 1e-3, "schedule": "constant", "grad_clip": None,
                  "save_every": 1000, "seed": 0},
        "deepspeed": {"zero_stage": stage},
        "logging": {"tensorboard": False},
    }
    return recipe_from_dict(data, world_size=1)


def _find_vlm(module: torch.nn.Module) -> torch.nn.Module:
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration

    return next(m for m in module.modules() if isinstance(m, KimiVLForConditionalGeneration))


def _train(recipe: Any, stage: int, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """Train in this process; returns the engine's weights at checkpoint time (the VLM's own state_dict keys)."""
    import deepspeed

    from vlmtune.train import trainer

    snapshot: dict[str, torch.Tensor] = {}
    original = trainer._save_checkpoint

    def save_and_snapshot(engine: Any, *args: Any, **kwargs: Any) -> None:
        original(engine, *args, **kwargs)
        vlm = _find_vlm(engine.module)
        params = list(vlm.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=stage == 3):
            snapshot.update({k: v.detach().clone() for k, v in vlm.state_dict().items()})

    monkeypatch.setattr(trainer, "_save_checkpoint", save_and_snapshot)
    with launcher_env_restored():
        trainer.train(recipe)
    assert snapshot, "the trainer wrote no checkpoint"
    return snapshot


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tiny model folder from init_model, demo train.jsonl with 16 samples); read-only."""
    from data_tools.demo_data import generate_demo_data
    from vlmtune.models.kimi_vl.init_model import init_model

    root = tmp_path_factory.mktemp("export_assets")
    model = init_model(root / "model", preset="tiny", seed=0)
    generate_demo_data(root / "demo", samples=16, eval_samples=6, seed=0)
    return model, root / "demo" / "train.jsonl"


@pytest.fixture(scope="module")
def tiny_model(assets: tuple[Path, Path]) -> Path:
    return assets[0]


@pytest.fixture(scope="module")
def runs(assets: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory):
    """run(stage, lora) -> (checkpoint dir, engine weights snapshot, recipe), each trained once per module."""
    model, train_file = assets
    pack_dir = tmp_path_factory.mktemp("packs") / "packs"  # packed by the first run, reused by the others
    cache: dict[tuple[int, bool], tuple[Path, dict[str, torch.Tensor], Any]] = {}
    mp = pytest.MonkeyPatch()

    def run(stage: int, lora: bool):
        if (stage, lora) not in cache:
            out = tmp_path_factory.mktemp(f"z{stage}{'lora' if lora else 'full'}")
            recipe = _recipe(model, train_file, pack_dir, out, stage, lora)
            with mp.context() as m:
                snap = _train(recipe, stage, m)
            ckpt = out / "checkpoints" / "step-00000002"
            assert (ckpt / "trainer_state.json").is_file()
            cache[(stage, lora)] = (ckpt, snap, recipe)
        return cache[(stage, lora)]

    return run


@pytest.fixture(scope="module")
def probe(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """A templated prompt with one image (through the processor), and the image file."""
    from vlmtune.models.kimi_vl.generation import build_prompt
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

    path = tmp_path_factory.mktemp("probe") / "red.png"
    Image.new("RGB", (56, 42), (210, 40, 30)).save(path)
    prompt = build_prompt(KimiTokenizer.from_pretrained(tiny_model), KimiVLImageProcessor.from_pretrained(tiny_model),
                          QUESTION, [path])
    return prompt, path


def _logits(model: torch.nn.Module, prompt: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=prompt.input_ids, pixel_values=prompt.pixel_values,
                     image_grid_hws=prompt.image_grid_hws).logits


def _reference_model(base_dir: Path, snapshot: dict[str, torch.Tensor], recipe: Any) -> torch.nn.Module:
    """A fresh model (peft-wrapped like the trainer's for LoRA) holding the engine's weights."""
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration

    model = KimiVLForConditionalGeneration.from_pretrained(base_dir)
    if recipe.model.lora.enabled:
        from vlmtune.train.modes import apply_lora

        model = apply_lora(model, recipe.model.lora, seed=0)
        model.get_base_model().load_state_dict(snapshot, strict=True)
    else:
        model.load_state_dict(snapshot, strict=True)
    return model


def test_published_name() -> None:
    assert published_name("module.vision_tower.encoder.blocks.0.wqkv.weight") == "vision_tower.encoder.blocks.0.wqkv.weight"
    assert published_name("model.base_model.model.language_model.model.layers.0.self_attn.q_proj.base_layer.weight") \
        == "language_model.model.layers.0.self_attn.q_proj.weight"
    assert published_name("base_model.model.language_model.lm_head.weight") == "language_model.lm_head.weight"
    assert published_name("base_model.model.language_model.model.layers.1.mlp.experts.3.up_proj.lora_B.default.weight") \
        == "language_model.model.layers.1.mlp.experts.3.up_proj.lora_B.weight"
    with pytest.raises(ExportError, match="adapter"):
        published_name("base_model.model.x.q_proj.lora_A.other.weight")
    with pytest.raises(ExportError, match="DoRA"):
        published_name("base_model.model.x.q_proj.lora_magnitude_vector.default.weight")


@pytest.mark.parametrize("stage", [2, 3])
def test_full_export_round_trip(stage: int, runs, probe, tiny_model: Path, tmp_path: Path) -> None:
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
    from vlmtune.models.kimi_vl.checkpoint import read_state_dict

    ckpt, snapshot, recipe = runs(stage, False)
    prompt, _ = probe
    out = export_checkpoint(ckpt, tmp_path / "export")
    exported = KimiVLForConditionalGeneration.from_pretrained(out)  # strict: every published key, nothing else
    weights = read_state_dict(out)
    assert sorted(weights) == sorted(snapshot)
    for key, value in snapshot.items():
        torch.testing.assert_close(weights[key], value, rtol=0, atol=0, msg=key)  # fp32 run: bit-exact
    ref = _logits(_reference_model(tiny_model, snapshot, recipe), prompt)
    got = _logits(exported, prompt)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)
    base = _logits(KimiVLForConditionalGeneration.from_pretrained(tiny_model), prompt)
    assert (base - ref).abs().max() > 1e-3  # training moved the weights: exporting the base model would fail above
    # everything needed to use it
    for name in ("tiktoken.model", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json",
                 "config.json", "vlmtune_export.json"):
        assert (out / name).is_file(), name
    for name in ("tiktoken.model", "tokenizer_config.json", "preprocessor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model / name).read_bytes(), name
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (out / "chat_template.jinja").is_file() or tok_cfg.get("chat_template")
    meta = json.loads((out / "vlmtune_export.json").read_text())
    assert (meta["zero_stage"], meta["step"], meta["mode"], meta["tensors"]) == (stage, 2, "full", len(snapshot))


def test_generate_from_export(runs, probe, tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`vlmtune generate EXPORT_DIR` answers exactly as the engine's weights do (greedy, KV cache)."""
    from vlmtune.generate import generate
    from vlmtune.generate import main as generate_main
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

    ckpt, snapshot, recipe = runs(2, False)
    _, image = probe
    capsys.readouterr()
    assert export_main([str(ckpt), "--out", str(tmp_path / "export")]) == 0
    assert "ZeRO-2, full" in capsys.readouterr().out
    want = generate(_reference_model(tiny_model, snapshot, recipe), KimiTokenizer.from_pretrained(tiny_model),
                    KimiVLImageProcessor.from_pretrained(tiny_model), QUESTION, [image], max_new_tokens=6)
    assert generate_main([str(tmp_path / "export"), "--image", str(image), "--prompt", QUESTION,
                          "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == want + "\n"
    assert "stop:" in out.err


@pytest.mark.parametrize("stage", [2, 3])
def test_lora_merge_and_adapter_only(stage: int, runs, probe, tiny_model: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    from peft import PeftModel

    from vlmtune.generate import generate
    from vlmtune.generate import main as generate_main
    from vlmtune.models.kimi_vl import KimiVLForConditionalGeneration
    from vlmtune.models.kimi_vl.generation import SamplingParams, generate_ids
    from vlmtune.models.kimi_vl.image_processing import KimiVLImageProcessor
    from vlmtune.models.kimi_vl.tokenization import KimiTokenizer

    ckpt, snapshot, recipe = runs(stage, True)
    prompt, image = probe
    ref_model = _reference_model(tiny_model, snapshot, recipe)
    ref = _logits(ref_model, prompt)
    lora_b = [v for k, v in snapshot.items() if ".lora_B." in k]
    assert lora_b and all(float(b.abs().max()) > 0 for b in lora_b)  # every adapter trained (B starts at zero)

    merged_dir = export_checkpoint(ckpt, tmp_path / "merged", "merge_lora")
    adapter_dir = export_checkpoint(ckpt, tmp_path / "adapter", "adapter_only")
    merged = KimiVLForConditionalGeneration.from_pretrained(merged_dir)
    adapted = PeftModel.from_pretrained(KimiVLForConditionalGeneration.from_pretrained(tiny_model), str(adapter_dir))
    got_merged, got_adapter = _logits(merged, prompt), _logits(adapted, prompt)
    torch.testing.assert_close(got_merged, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_adapter, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_merged, got_adapter, rtol=0, atol=1e-5)
    base = _logits(KimiVLForConditionalGeneration.from_pretrained(tiny_model), prompt)
    assert (base - ref).abs().max() > 1e-3

    n_adapters = len(lora_b)
    meta = json.loads((adapter_dir / "vlmtune_export.json").read_text())
    assert meta["adapters"] == n_adapters
    assert meta["modules_to_save"] == ["multi_modal_projector", "vision_tower"]  # trained fully next to the adapters
    assert json.loads((merged_dir / "vlmtune_export.json").read_text())["merged_adapters"] == n_adapters
    adapter_cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]) == tiny_model.resolve()
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"]) == (4, 8.0)
    assert (adapter_dir / "adapter_model.safetensors").is_file()

    # greedy decoding (no stop token) from both exports follows the engine's weights token for token
    params = SamplingParams(max_new_tokens=6)
    want = generate_ids(ref_model, prompt.input_ids, prompt.pixel_values, prompt.image_grid_hws, params).token_ids
    for model in (merged, adapted):
        assert generate_ids(model, prompt.input_ids, prompt.pixel_values, prompt.image_grid_hws,
                            params).token_ids == want
    # the CLI on the adapter folder finds its base model by itself
    tok, proc = KimiTokenizer.from_pretrained(tiny_model), KimiVLImageProcessor.from_pretrained(tiny_model)
    reply = generate(ref_model, tok, proc, QUESTION, [image], max_new_tokens=6)
    capsys.readouterr()
    assert generate_main([str(adapter_dir), "--image", str(image), "--prompt", QUESTION, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.out == reply + "\n" and "stop:" in out.err


def test_mode_errors(runs, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    full_ckpt, _, _ = runs(2, False)
    lora_ckpt, _, _ = runs(2, True)
    with pytest.raises(ExportError, match="--merge-lora"):
        export_checkpoint(lora_ckpt, tmp_path / "a")  # a LoRA checkpoint must choose merge or adapter-only
    with pytest.raises(ExportError, match="no LoRA adapters"):
        export_checkpoint(full_ckpt, tmp_path / "b", "merge_lora")
    capsys.readouterr()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert export_main([str(full_ckpt), "--out", str(tmp_path / "busy")]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    # a run folder resolves to its latest checkpoint; a previous export is replaced without --overwrite
    run_dir = full_ckpt.parent.parent
    first = export_checkpoint(run_dir, tmp_path / "again")
    export_checkpoint(run_dir, tmp_path / "again")
    assert json.loads((first / "vlmtune_export.json").read_text())["checkpoint"] == str(full_ckpt.resolve())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-export")]
    with pytest.raises(ExportError, match="not a vlmtune checkpoint"):
        export_checkpoint(tmp_path / "busy", tmp_path / "c")
