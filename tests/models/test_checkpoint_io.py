"""Checkpoint IO: exact sharded round trips, stored dtypes with fp32 routers, strict key checks, a published-like
config.json written back field for field, and transformers' AutoConfig / AutoModel loading our classes by model_type
``kimi_vl`` without trust_remote_code (no remote code fetched even when config.json carries an ``auto_map``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from vlmtune.models.kimi_vl import KimiVLConfig, KimiVLForConditionalGeneration, kimi_vl_a3b, kimi_vl_tiny
from vlmtune.models.kimi_vl.checkpoint import WEIGHTS_INDEX_NAME, WEIGHTS_NAME, CheckpointError

CONFIG = kimi_vl_tiny(num_base_tokens=256)
ROUTER_KEYS = ("language_model.model.layers.1.mlp.gate.weight",
               "language_model.model.layers.1.mlp.gate.e_score_correction_bias",
               "language_model.model.layers.2.mlp.gate.weight",
               "language_model.model.layers.2.mlp.gate.e_score_correction_bias")


def _model(seed: int = 0) -> KimiVLForConditionalGeneration:
    model = KimiVLForConditionalGeneration(CONFIG)
    model.init_weights(seed)
    with torch.no_grad():  # nonzero router bias and norms != 1, so a dropped or reset tensor shows
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.1)
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _digests(path: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def _all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ------------------------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------------------------
def test_sharded_round_trip_is_exact(tmp_path: Path) -> None:
    model = _model()
    state = model.state_dict()
    model.save_pretrained(tmp_path / "a", max_shard_size=300_000)
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and WEIGHTS_INDEX_NAME in files and WEIGHTS_NAME not in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert {"config.json", "generation_config.json"} <= set(files)

    index = json.loads((tmp_path / "a" / WEIGHTS_INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(state)  # every tensor once, no inv_freq
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    for shard in shards:
        size = sum(t.numel() * t.element_size() for t in load_file(str(tmp_path / "a" / shard)).values())
        assert size <= 300_000 or len(load_file(str(tmp_path / "a" / shard))) == 1

    loaded = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "a")
    got = loaded.state_dict()
    assert list(got) == list(state)
    bad = [k for k in state if got[k].dtype != state[k].dtype or not torch.equal(got[k], state[k])]
    assert bad == []
    assert loaded.config.to_save_dict() == model.config.to_save_dict()
    # Saving what was loaded writes the same bytes, file for file.
    loaded.save_pretrained(tmp_path / "b", max_shard_size=300_000)
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    # One file without an index under the default shard size; same tensors.
    loaded.save_pretrained(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").glob("model*")) == [WEIGHTS_NAME]
    single = load_file(str(tmp_path / "c" / WEIGHTS_NAME))
    assert all(torch.equal(single[k], state[k]) for k in state) and len(single) == len(state)


def test_bf16_keeps_routers_fp32_and_stored_dtypes(tmp_path: Path) -> None:
    model = _model().to(torch.bfloat16)
    state = model.state_dict()
    assert {k for k, t in state.items() if t.dtype == torch.float32} == set(ROUTER_KEYS)  # after model.to(bf16)
    assert all(t.dtype == torch.bfloat16 for k, t in state.items() if k not in ROUTER_KEYS)
    model.save_pretrained(tmp_path / "mixed")
    stored = _all_tensors(tmp_path / "mixed")
    assert {k for k, t in stored.items() if t.dtype == torch.float32} == set(ROUTER_KEYS)

    # A checkpoint stored ALL in bf16 (routers included): routers come back fp32, everything else stays bf16.
    all_bf16 = {k: t.to(torch.bfloat16) for k, t in stored.items()}
    (tmp_path / "bf16").mkdir()
    save_file(all_bf16, str(tmp_path / "bf16" / WEIGHTS_NAME), metadata={"format": "pt"})
    CONFIG.save_pretrained(tmp_path / "bf16")
    loaded = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "bf16")
    got = loaded.state_dict()
    for k, t in got.items():
        assert t.dtype == (torch.float32 if k in ROUTER_KEYS else torch.bfloat16), k
        assert torch.equal(t, all_bf16[k].to(t.dtype)), k
    assert loaded.dtype == torch.bfloat16
    # Casting keeps them: to(bf16) again, and an explicit dtype at load time.
    loaded.to(torch.bfloat16)
    assert all(loaded.state_dict()[k].dtype == torch.float32 for k in ROUTER_KEYS)
    as_fp32 = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "bf16", dtype=torch.float32).state_dict()
    assert all(t.dtype == torch.float32 for t in as_fp32.values())
    as_bf16 = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "mixed", dtype="bfloat16").state_dict()
    assert {k for k, t in as_bf16.items() if t.dtype == torch.float32} == set(ROUTER_KEYS)
    # fp32 weights load as fp32: the stored dtype is kept when none is asked.
    _model().save_pretrained(tmp_path / "fp32")
    fp32 = KimiVLForConditionalGeneration.from_pretrained(tmp_path / "fp32").state_dict()
    assert all(t.dtype == torch.float32 for t in fp32.values())


# ------------------------------------------------------------------------------------------------------------------
# strict keys
# ------------------------------------------------------------------------------------------------------------------
def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    CONFIG.save_pretrained(path)
    save_file(tensors, str(path / WEIGHTS_NAME), metadata={"format": "pt"})
    return path


def test_inv_freq_ignored_other_unexpected_and_missing_tensors_named(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in _model().state_dict().items()}
    inv_freq = {f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(3)}
    loaded = KimiVLForConditionalGeneration.from_pretrained(_write(tmp_path / "ok", {**state, **inv_freq}))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())

    extra = "language_model.model.layers.0.mlp.extra_proj.weight"
    with pytest.raises(CheckpointError, match=r"unexpected 1 tensors.*extra_proj") as err:
        KimiVLForConditionalGeneration.from_pretrained(_write(tmp_path / "extra", {**state, extra: torch.ones(2)}))
    assert "missing" not in str(err.value)

    gone = "language_model.model.layers.2.mlp.experts.7.down_proj.weight"
    with pytest.raises(CheckpointError, match=r"missing 1 tensors.*experts\.7\.down_proj") as err:
        KimiVLForConditionalGeneration.from_pretrained(
            _write(tmp_path / "missing", {k: v for k, v in state.items() if k != gone}))
    assert "unexpected" not in str(err.value)

    both = {k: v for k, v in state.items() if k != gone} | {extra: torch.ones(2)}
    with pytest.raises(CheckpointError, match=r"missing 1 .*\n.*unexpected 1 "):
        KimiVLForConditionalGeneration.from_pretrained(_write(tmp_path / "both", both))

    bad = dict(state, **{"multi_modal_projector.linear_2.weight": torch.zeros(5, 5)})
    with pytest.raises(CheckpointError, match=r"multi_modal_projector\.linear_2\.weight has shape \(5, 5\).*\(96, 256\)"):
        KimiVLForConditionalGeneration.from_pretrained(_write(tmp_path / "shape", bad))


def test_shard_and_file_errors(tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in _model().state_dict().items()}
    path = _write(tmp_path / "dup", state)
    key = "language_model.lm_head.weight"
    save_file({key: state[key]}, str(path / "model-00002-of-00002.safetensors"))
    (path / WEIGHTS_NAME).rename(path / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in state}
    (path / WEIGHTS_INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": {
        **weight_map, key: "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"lm_head\.weight appears in two shards"):
        KimiVLForConditionalGeneration.from_pretrained(path)

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    CONFIG.save_pretrained(pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(CheckpointError, match="never unpickles"):
        KimiVLForConditionalGeneration.from_pretrained(pickled)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        KimiVLForConditionalGeneration.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(TypeError, match=r"unsupported arguments \['attn_implementation'\]"):
        KimiVLForConditionalGeneration.from_pretrained(path, attn_implementation="flash_attention_2")


# ------------------------------------------------------------------------------------------------------------------
# config.json
# ------------------------------------------------------------------------------------------------------------------
def published_like_config() -> dict:
    """Kimi-VL-A3B-Instruct's config.json as far as shared/reference/kimi_vl.md knows it, plus fields vlmtune does not
    model (auto_map, architectures, ep_size, num_key_value_heads, initializer_range, attention_dropout, ...)."""
    return {
        "architectures": ["KimiVLForConditionalGeneration"],
        "auto_map": {"AutoConfig": "configuration_kimi_vl.KimiVLConfig",
                     "AutoModel": "modeling_kimi_vl.KimiVLForConditionalGeneration",
                     "AutoModelForCausalLM": "modeling_kimi_vl.KimiVLForConditionalGeneration"},
        "model_type": "kimi_vl",
        "media_placeholder_token_id": 163605,
        "ignore_index": -100,
        "pad_token_id": 0,
        "vocab_size": 163840,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.50.3",
        "vision_config": {
            "model_type": "moonvit", "patch_size": 14, "hidden_size": 1152, "num_hidden_layers": 27,
            "num_attention_heads": 16, "intermediate_size": 4304, "init_pos_emb_height": 64,
            "init_pos_emb_width": 64, "merge_kernel_size": [2, 2], "torch_dtype": "bfloat16",
        },
        "text_config": {
            "vocab_size": 163840, "hidden_size": 2048, "num_hidden_layers": 27, "num_attention_heads": 16,
            "intermediate_size": 11264, "moe_intermediate_size": 1408, "n_routed_experts": 64,
            "num_experts_per_tok": 6, "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
            "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "v_head_dim": 128, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "n_group": 1, "topk_group": 1,
            "norm_topk_prob": True, "routed_scaling_factor": 2.446, "aux_loss_alpha": 0.001, "seq_aux": True,
            "rms_norm_eps": 1e-05, "rope_theta": 800000.0, "rope_scaling": None, "max_position_embeddings": 131072,
            "bos_token_id": 163584, "eos_token_id": 163585, "pad_token_id": 163839, "hidden_act": "silu",
            "attention_bias": False, "tie_word_embeddings": False, "initializer_range": 0.02,
            "ep_size": 1, "num_key_value_heads": 16, "attention_dropout": 0.0, "pretraining_tp": 1,
            "use_cache": True, "torch_dtype": "bfloat16",
        },
    }


def test_published_config_json_round_trip(tmp_path: Path) -> None:
    published = published_like_config()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "config.json").write_text(json.dumps(published, indent=2))
    config = KimiVLConfig.from_pretrained(tmp_path / "in")
    assert config.text_config.ep_size == 1 and config.text_config.num_key_value_heads == 16  # unknown, readable
    assert config.auto_map == published["auto_map"]
    config.save_pretrained(tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written == published  # every field, known or not, nested ones included
    assert "model_type" not in written["text_config"]  # the published text_config has none; none is added
    # The published config is the A3B builder's config, field for field where vlmtune models them.
    a3b = kimi_vl_a3b().to_save_dict()
    for section in ("vision_config", "text_config"):
        assert a3b[section] == {k: written[section][k] for k in a3b[section]}, section
    # (the A3B model built from this config on the meta device: test_vlm.py::test_a3b_on_meta_has_the_published_...)


# ------------------------------------------------------------------------------------------------------------------
# transformers Auto classes
# ------------------------------------------------------------------------------------------------------------------
def test_auto_classes_load_ours_without_remote_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers
    import transformers.dynamic_module_utils as dynamic
    from transformers.models.auto import auto_factory, configuration_auto

    def no_remote_code(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"transformers tried to load remote code: {args} {kwargs}")

    for module in (dynamic, auto_factory, configuration_auto):
        for name in ("get_class_from_dynamic_module", "get_cached_module_file"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, no_remote_code)

    model = _model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["auto_map"] = published_like_config()["auto_map"]  # points at remote code that must not be fetched
    (tmp_path / "config.json").write_text(json.dumps(config))

    auto_config = transformers.AutoConfig.from_pretrained(tmp_path)
    assert type(auto_config) is KimiVLConfig and auto_config.to_save_dict() == config
    state = model.state_dict()
    for auto in (transformers.AutoModel, transformers.AutoModelForCausalLM):
        loaded = auto.from_pretrained(tmp_path)
        assert type(loaded) is KimiVLForConditionalGeneration
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())
    model.save_pretrained(tmp_path / "sub")  # a model in a subfolder of a repository folder
    in_sub = transformers.AutoModel.from_pretrained(tmp_path, subfolder="sub")
    assert all(torch.equal(in_sub.state_dict()[k], v) for k, v in state.items())
    as_bf16 = transformers.AutoModel.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16
    assert as_bf16.language_model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    # Options our loader does not implement are errors, not silently dropped on the way through AutoModel.
    with pytest.raises(TypeError, match=r"unsupported arguments \['attn_implementation'\]"):
        transformers.AutoModel.from_pretrained(tmp_path, attn_implementation="flash_attention_2")
    with pytest.raises(TypeError, match=r"unknown arguments \['not_a_field'\]"):
        transformers.AutoConfig.from_pretrained(tmp_path, not_a_field=1)
    with safe_open(str(tmp_path / WEIGHTS_NAME), framework="pt") as f:
        assert not any("inv_freq" in k for k in f.keys())
