"""The recipe schema: every option a recipe may set, typed, defaulted and documented in one place.

A recipe is a YAML mapping with seven sections::

    model      which checkpoint, dtype, attention backend, rmpad, checkpointing, freezing, LoRA
    data       the datasets (path + sampling weight each) and what to do with bad or overlong samples
    packing    the token budget of one pack (and its vision-patch budget), offline or on the fly
    train      steps, batch sizes, optimizer, schedule, loss accounting, checkpointing, evaluation
    deepspeed  ZeRO stage, offload, bucket sizes, pass-through extras
    logging    console / TensorBoard / W&B / plots
    launch     processes per node, nodes, rendezvous, SLURM

Only ``model.path``, ``data.train``, ``train.output_dir``, ``train.max_steps`` and ``train.global_batch_size``
have no default; a recipe holds what differs from the defaults below. Every field carries a description, shown by
``vlmtune validate RECIPE --explain``. Unknown keys are errors (``extra="forbid"`` everywhere), and so are
options that would be silently ignored (a LoRA rank without LoRA, ``offload_param`` below ZeRO-3, ...).

Batch vocabulary: a *pack* is one buffer of ``packing.packing_length`` tokens holding several samples.
``train.micro_batch_size`` packs go through one rank per forward; ``train.global_batch_size`` packs make one
optimizer step, so ``grad_accum_steps = global / (micro x world_size)`` and must be an integer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vlmtune.config.errors import RecipeError

# Keys the trainer writes into the DeepSpeed config itself; setting them in deepspeed.extra would fight the recipe.
_DS_OWNED_KEYS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / train.micro_batch_size",
    "gradient_clipping": "train.grad_clip",
    "bf16": "model.dtype / deepspeed.precision",
    "fp16": "model.dtype (fp16 is not supported; use bfloat16)",
    "optimizer": "train.learning_rate / weight_decay / adam_betas / adam_eps and deepspeed.torch_adam",
    "scheduler": "train.schedule / warmup / min_lr_ratio",
    "seed": "train.seed",
}
_DS_OWNED_ZERO_KEYS = {
    "stage": "deepspeed.zero_stage",
    "offload_optimizer": "deepspeed.offload_optimizer",
    "offload_param": "deepspeed.offload_param",
    "overlap_comm": "deepspeed.overlap_comm",
    "reduce_bucket_size": "deepspeed.reduce_bucket_size",
}

#: window used by packing.mode=on_the_fly when packing.window is not given.
DEFAULT_ON_THE_FLY_WINDOW = 2048


class _Section(BaseModel):
    """Base of every recipe section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def _explicit(section: BaseModel, names: list[str]) -> list[str]:
    """The subset of ``names`` the recipe set to something other than their default.

    Used to reject options that would be silently ignored. A value equal to the default is accepted, so that a
    dumped recipe.resolved.yaml (which states every default) loads back.
    """
    fields = type(section).model_fields
    return [
        n for n in names
        if n in section.model_fields_set and getattr(section, n) != fields[n].get_default(call_default_factory=True)
    ]


# --------------------------------------------------------------------------------------------------- model


class GradientCheckpointing(_Section):
    """Activation checkpointing, switched separately for the decoder and the vision tower."""

    model_config = ConfigDict(extra="forbid")

    decoder: bool = Field(False, description="Recompute decoder layer activations in backward (saves memory, ~30% more compute).")
    vision: bool = Field(
        False,
        description="Recompute MoonViT block activations in backward. Only for a trainable tower: a frozen tower runs "
        "under no_grad and keeps no activations, so this must be false when model.freeze.vision_tower is true.",
    )
    every_k: int = Field(
        1, ge=1, description="Checkpoint every k-th layer/block (1 = all of them); larger k trades memory for speed."
    )


class Freeze(_Section):
    """Which base weights receive no gradient. The flags mean the same with and without LoRA."""

    model_config = ConfigDict(extra="forbid")

    vision_tower: bool = Field(False, description="Freeze the MoonViT vision encoder (it then runs under no_grad).")
    projector: bool = Field(False, description="Freeze the patch merger + MLP projector.")
    decoder: bool = Field(
        False,
        description="Freeze the language model: embeddings, attention, experts, norms and lm_head. The MoE router "
        "gates follow this flag unless model.freeze.router says otherwise.",
    )
    router: bool | None = Field(
        None,
        description="Freeze the MoE router gates (gate.weight). null = same as model.freeze.decoder; false with a "
        "frozen decoder trains the routers alone. gate.e_score_correction_bias never gets a gradient either way "
        "(see train.router_bias_update_rate).",
    )

    @property
    def router_frozen(self) -> bool:
        """Whether the router gates are frozen once the ``null`` default is resolved."""
        return self.decoder if self.router is None else self.router


# The MoonViT block's linear layers (vit.py): LoRA targets among these put trainable adapters in the vision tower, so a
# frozen tower still trains and may be checkpointed.
VISION_LORA_MODULES = frozenset({"wqkv", "wo", "fc0", "fc1"})


class Lora(_Section):
    """LoRA adapters (peft). Base weights stay governed by model.freeze; adapters are always trainable."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Attach LoRA adapters to the modules named in model.lora.targets.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Adapter scale numerator: updates are scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    targets: list[str] = Field(
        default_factory=lambda: ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1,
        description="Module names (peft target_modules suffixes) that get adapters. The default covers MLA attention "
        "and every MLP, routed experts included; the trainer fails if a target matches no module.",
    )


class ModelSection(_Section):
    """The checkpoint to fine-tune and how to run it."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(
        description="HF-style model directory (config.json + safetensors, Kimi-VL key names). Relative paths resolve "
        "against the recipe file's folder."
    )
    preset: Literal["tiny"] | None = Field(
        None,
        description="Generate a model into model.path when that folder is absent. 'tiny' = the CPU-sized Kimi-VL "
        "(kimi_vl_tiny) with random weights. null = model.path must exist.",
    )
    dtype: Literal["bfloat16", "float32", "float64"] = Field(
        "bfloat16",
        description="Dtype of the weights and activations. bfloat16 trains with fp32 master weights in the optimizer "
        "(DeepSpeed bf16 mode); float32/float64 train in full precision (float64 is for parity tests).",
    )
    attention: Literal["auto", "flash_attn", "torch_varlen", "sdpa_varlen", "sdpa_masked"] = Field(
        "auto",
        description="Varlen attention backend of the rmpad path. auto = flash_attn on CUDA when installed, else "
        "torch_varlen on CUDA, else sdpa_varlen (CPU); the choice is logged. sdpa_masked is an O(N^2) test reference.",
    )
    rmpad: bool = Field(
        True,
        description="Remove padding: swap the model's padded forward for the varlen path (apply_rmpad), so packs run "
        "as (N, D) tokens with cu_seqlens. false keeps the padded reference forward (a parity/debug aid).",
    )
    gradient_checkpointing: GradientCheckpointing = Field(
        default_factory=GradientCheckpointing, description="Activation checkpointing switches."
    )
    freeze: Freeze = Field(default_factory=Freeze, description="Which base weights are frozen.")
    lora: Lora = Field(default_factory=Lora, description="LoRA adapters.")

    @model_validator(mode="after")
    def _check(self) -> ModelSection:
        problems: list[str] = []
        gc, fr, lora = self.gradient_checkpointing, self.freeze, self.lora
        vision_adapters = lora.enabled and bool(VISION_LORA_MODULES & set(lora.targets))
        if gc.vision and fr.vision_tower and not vision_adapters:
            problems.append(
                "model.gradient_checkpointing.vision is true but model.freeze.vision_tower is true: a frozen tower runs "
                "under no_grad and has nothing to checkpoint; set model.gradient_checkpointing.vision: false"
            )
        if not lora.enabled:
            stray = _explicit(lora, ["r", "alpha", "dropout", "targets"])
            if stray and "enabled" not in lora.model_fields_set:
                keys = ", ".join(f"model.lora.{k}" for k in stray)
                problems.append(f"{keys} set but model.lora.enabled is false; add model.lora.enabled: true (or remove them)")
            if fr.vision_tower and fr.projector and fr.decoder and fr.router_frozen:
                problems.append(
                    "model.freeze freezes every part and LoRA is off: nothing would train; unfreeze a part or set "
                    "model.lora.enabled: true"
                )
        elif not (fr.vision_tower or fr.projector or fr.decoder):
            problems.append(
                "model.lora.enabled is true but no part is frozen, so every base weight trains fully next to the "
                "adapters; freeze what the adapters replace (usually model.freeze.decoder: true and "
                "model.freeze.vision_tower: true)"
            )
        if not self.rmpad and self.attention != "auto":
            problems.append(
                f"model.attention: {self.attention} only applies to the rmpad varlen path, and model.rmpad is false; "
                "remove model.attention or set model.rmpad: true"
            )
        if problems:
            raise ValueError("\n".join(problems))
        return self


# ---------------------------------------------------------------------------------------------------- data


class DatasetSpec(_Section):
    """One dataset of the mixture."""

    model_config = ConfigDict(extra="forbid")

    path: Path = Field(
        description="A .json/.jsonl file, or a directory saved by `datasets` (then see split). Relative paths resolve "
        "against the recipe file's folder."
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Epoch multiplier of this dataset: each good sample appears floor(w) times per epoch, plus once "
        "more for a seeded subsample of round(frac(w) * n) of them (w = 0.5 keeps half, w = 2 repeats every sample "
        "twice). The subsample is drawn once, at pack time.",
    )
    format: Literal["auto", "messages", "llava", "sharegpt"] = Field(
        "auto",
        description="Sample layout: messages (OpenAI-style role/content lists), llava (conversations with "
        "from/value + image), sharegpt. auto = detect per sample from its keys.",
    )
    image_root: Path | None = Field(
        None,
        description="Folder that relative image paths in the samples resolve against. null = the dataset file's "
        "folder. Relative values resolve against the recipe file's folder.",
    )
    split: str | None = Field(
        None, description="Split to read when path is a `datasets` directory with several splits; null for files."
    )


class DataSection(_Section):
    """The training (and evaluation) data and the policies for bad samples."""

    model_config = ConfigDict(extra="forbid")

    train: list[DatasetSpec] = Field(min_length=1, description="Training datasets, each with a path and a weight.")
    eval: list[DatasetSpec] | None = Field(
        None, description="Evaluation datasets (null = no evaluation). Evaluated every train.eval_every steps."
    )
    on_bad_sample: Literal["error", "skip"] = Field(
        "error",
        description="A sample that cannot be read (bad JSON, missing image, unknown role): error = stop naming the "
        "file and line; skip = drop it and count it, with the reason, in the reported counts.",
    )
    overlong: Literal["truncate_text", "drop", "error"] = Field(
        "truncate_text",
        description="A sample longer than packing.packing_length (or with more patches than "
        "packing.max_vision_patches): error = stop naming it; drop = skip and count it; truncate_text = cut trailing "
        "text tokens (never image tokens) to fit, and count it.",
    )
    num_workers: int = Field(
        0, ge=0, description="Processes for the token-length pass before packing (0 = in the main process)."
    )
    loader_workers: int = Field(
        0, ge=0, description="torch DataLoader workers per rank that build packed batches (0 = in the main process)."
    )
    demo: bool = Field(
        False,
        description="Generate the synthetic demo data set (data_tools.demo_data: train.jsonl, eval.jsonl, images/) "
        "into the folder of data.train.0.path when that file is absent (for the tiny CPU recipe). Needs exactly one "
        "training dataset, named train.jsonl.",
    )

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if self.demo and len(self.train) != 1:
            raise ValueError(
                f"data.demo is true but data.train has {len(self.train)} datasets; demo data is generated into "
                "data.train[0].path only, so give exactly one (or set data.demo: false)"
            )
        if self.demo and self.train[0].path.name != "train.jsonl":
            raise ValueError(
                f"data.demo is true but data.train.0.path is {self.train[0].path}; the demo generator writes "
                "<folder>/train.jsonl, so point data.train.0.path at a file named train.jsonl"
            )
        if self.eval is not None and len(self.eval) == 0:
            raise ValueError("data.eval is an empty list; remove it (no evaluation) or list at least one dataset")
        return self


# ------------------------------------------------------------------------------------------------- packing


class PackingSection(_Section):
    """How samples are packed into fixed-length buffers."""

    model_config = ConfigDict(extra="forbid")

    packing_length: int = Field(
        4096, ge=16, description="Tokens per pack (text + image tokens, exact counts). The model sees (1, N) inputs."
    )
    max_vision_patches: int | None = Field(
        None,
        ge=4,
        description="Second budget: MoonViT patches (before the 2x2 merge) per pack, bounding vision-tower memory. "
        "null = no vision budget.",
    )
    mode: Literal["offline", "on_the_fly"] = Field(
        "offline",
        description="offline = pack the whole dataset once (best-fit-decreasing) into packing.pack_dir before "
        "training, resumable and inspectable; on_the_fly = pack windows of samples inside the data loader.",
    )
    pack_dir: Path | None = Field(
        None,
        description="Where offline packs are written/read. null = <train.output_dir>/packs (filled in at load). "
        "Relative paths resolve against the recipe file's folder. Unused (an error to set) with on_the_fly.",
    )
    window: int | None = Field(
        None,
        ge=1,
        description="Samples sorted and packed together. offline: null = the whole dataset (best fill). on_the_fly: "
        f"null = {DEFAULT_ON_THE_FLY_WINDOW} (filled in at load).",
    )
    pad_to_length: bool = Field(
        False,
        description="Pad every pack to exactly packing_length (the padding is one extra segment whose labels are all "
        "-100): static shapes at the cost of computing on padding.",
    )
    seed: int = Field(0, description="Seed of the sample shuffle and pack order.")
    balance_steps: bool = Field(
        True,
        description="Order packs so that the ranks of one step get similar ViT+LLM compute (fewer stragglers and "
        "collective timeouts). No effect on what is trained, only on which rank trains it when.",
    )

    @model_validator(mode="after")
    def _check(self) -> PackingSection:
        if self.mode == "on_the_fly" and "pack_dir" in self.model_fields_set and self.pack_dir is not None:
            raise ValueError(
                "packing.pack_dir is set but packing.mode is on_the_fly (packs are built in memory); remove "
                "packing.pack_dir or set packing.mode: offline"
            )
        return self


# --------------------------------------------------------------------------------------------------- train


class TrainSection(_Section):
    """The optimisation itself."""

    model_config = ConfigDict(extra="forbid")

    output_dir: Path = Field(
        description="Run folder: checkpoints, recipe.resolved.yaml, logs, TensorBoard, plots, exported model. "
        "Relative paths resolve against the recipe file's folder."
    )
    max_steps: int = Field(ge=1, description="Optimizer steps to run.")
    micro_batch_size: int = Field(1, ge=1, description="Packs per rank per forward/backward (micro-step).")
    global_batch_size: int = Field(
        ge=1,
        description="Packs per optimizer step over all ranks. Gradient accumulation = global_batch_size / "
        "(micro_batch_size x world_size), which must be an integer.",
    )
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (reached after warmup).")
    vision_lr: float | None = Field(
        None,
        gt=0,
        description="Absolute peak learning rate of the vision tower (null = train.learning_rate). Follows the same "
        "schedule shape as the main rate.",
    )
    projector_lr: float | None = Field(
        None,
        gt=0,
        description="Absolute peak learning rate of the projector (null = train.learning_rate). Same schedule shape.",
    )
    weight_decay: float = Field(
        0.0, ge=0, description="AdamW decoupled weight decay; never applied to norms, biases or the router bias."
    )
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2), each in [0, 1).")
    adam_eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    schedule: Literal["cosine", "linear", "constant", "wsd"] = Field(
        "cosine",
        description="Learning-rate shape after warmup: cosine or linear decay to min_lr_ratio x peak, constant, or "
        "wsd (warmup-stable-decay: constant, then linear decay over the last decay_fraction of the steps).",
    )
    warmup: int | float = Field(
        0,
        description="Linear warmup from 0: an integer is a number of steps, a float in [0, 1) a fraction of "
        "max_steps. Clipped to max_steps (and, for wsd, to the steps before the decay), never an error.",
    )
    decay_fraction: float = Field(
        0.1, gt=0, le=1, description="wsd only: fraction of max_steps spent in the final decay."
    )
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="Final learning rate of cosine/linear/wsd as a fraction of the peak."
    )
    grad_clip: float | None = Field(
        1.0, gt=0, description="Clip the global gradient norm to this value (null = no clipping; the norm is still logged)."
    )
    seed: int = Field(0, description="Seed of weight init (LoRA, generated models), dropout and data order.")
    save_every: int = Field(
        500, ge=1, description="Save a resumable checkpoint every N optimizer steps; the last step is always saved."
    )
    keep_last: int | None = Field(
        3, ge=1, description="Keep only the N newest checkpoints (null = keep all). The final one is never deleted."
    )
    resume: Literal["auto", "never"] | Path = Field(
        "auto",
        description="auto = resume from the newest checkpoint in output_dir if there is one (logged), else start; "
        "never = always start fresh (fails if output_dir holds checkpoints); a path = resume from that checkpoint.",
    )
    resume_ignore_changes: bool = Field(
        False,
        description="On resume the recipe is compared with the checkpoint's recipe.resolved.yaml and a difference "
        "stops the run; true allows it (e.g. a longer max_steps).",
    )
    loss_reduction: Literal["token", "sample", "sqrt"] = Field(
        "token",
        description="How supervised tokens are weighted over the whole optimizer step (all micro-batches and ranks): "
        "token = each token alike; sample = each sample alike; sqrt = each sample weighted by sqrt(its tokens).",
    )
    aux_loss_coef: float | None = Field(
        None, ge=0, description="Coefficient of the MoE sequence aux loss (null = the model config's aux_loss_alpha; 0 = off)."
    )
    ce_chunk_size: int = Field(
        4096, ge=1, description="Rows of logits computed at once by the chunked cross-entropy (memory vs. speed)."
    )
    eval_every: int | None = Field(
        None, ge=1, description="Evaluate on data.eval every N steps (null = only at the end when data.eval is given)."
    )
    eval_samples: int | None = Field(
        None, ge=1, description="Evaluate on the first N samples of data.eval (null = all of them)."
    )
    router_bias_update_rate: float = Field(
        0.0,
        ge=0,
        description="Aux-loss-free balancing: after each step move gate.e_score_correction_bias by this rate towards "
        "equal expert load (DeepSeek-V3). 0 = off (the bias stays as loaded).",
    )

    @field_validator("warmup", mode="before")
    @classmethod
    def _warmup_not_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("warmup is a number of steps (integer) or a fraction in [0, 1) (float), not a boolean")
        return value

    @field_validator("warmup")
    @classmethod
    def _warmup_range(cls, value: int | float) -> int | float:
        if isinstance(value, float) and not 0.0 <= value < 1.0:
            raise ValueError(
                f"a float warmup is a fraction of train.max_steps in [0, 1), got {value}; write an integer for a "
                "number of steps"
            )
        if isinstance(value, int) and value < 0:
            raise ValueError(f"warmup steps must be >= 0, got {value}")
        return value

    @field_validator("adam_betas")
    @classmethod
    def _betas_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in value):
            raise ValueError(f"each Adam beta must be in [0, 1), got {list(value)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainSection:
        if self.schedule != "wsd" and _explicit(self, ["decay_fraction"]):
            raise ValueError(
                f"train.decay_fraction only applies to schedule wsd, and train.schedule is {self.schedule}; "
                "remove it or set train.schedule: wsd"
            )
        if self.schedule == "constant" and _explicit(self, ["min_lr_ratio"]):
            raise ValueError("train.min_lr_ratio has no effect with train.schedule: constant; remove it")
        return self

    @property
    def decay_steps(self) -> int:
        """Steps of the final linear decay of the wsd schedule (0 for other schedules), at least 1 for wsd."""
        if self.schedule != "wsd":
            return 0
        return min(self.max_steps, max(1, round(self.decay_fraction * self.max_steps)))

    @property
    def warmup_steps(self) -> int:
        """Warmup in steps: a fraction times max_steps, clipped to the steps available (never an error)."""
        steps = round(self.warmup * self.max_steps) if isinstance(self.warmup, float) else self.warmup
        return max(0, min(steps, self.max_steps - self.decay_steps))


# ----------------------------------------------------------------------------------------------- deepspeed


class DeepSpeedSection(_Section):
    """DeepSpeed ZeRO settings (the trainer builds the DeepSpeed config from these plus train.*)."""

    model_config = ConfigDict(extra="forbid")

    zero_stage: int = Field(
        2, ge=0, le=3, description="ZeRO stage: 0 = DDP-like, 1 = shard optimizer state, 2 = + gradients, 3 = + params."
    )
    offload_optimizer: Literal["none", "cpu"] = Field(
        "none", description="Keep optimizer state on the CPU (ZeRO stage >= 1; uses DeepSpeed's CPU Adam)."
    )
    offload_param: Literal["none", "cpu"] = Field("none", description="Keep parameters on the CPU (ZeRO stage 3 only).")
    precision: Literal["auto", "bf16", "fp32", "fp64"] = Field(
        "auto",
        description="DeepSpeed precision mode; auto = follow model.dtype (bfloat16 -> bf16 with fp32 master weights, "
        "float32 -> fp32, float64 -> fp64). An explicit value must agree with model.dtype.",
    )
    torch_adam: bool = Field(
        True, description="true: torch.optim.AdamW (nothing to build; CPU and GPU). false: DeepSpeed's Adam in AdamW mode, "
        "FusedAdam on CUDA or DeepSpeedCPUAdam with offload_optimizer: cpu (extensions built on first use); refused "
        "on a CPU run without offload."
    )
    overlap_comm: bool = Field(False, description="Overlap gradient reduction with backward (ZeRO stage >= 1).")
    reduce_bucket_size: int = Field(500_000_000, ge=1, description="Elements per gradient reduce bucket.")
    extra: dict[str, Any] = Field(
        default_factory=dict,
        description="Mapping deep-merged into the generated DeepSpeed config, for settings not modelled here "
        "(e.g. zero_optimization.stage3_max_live_parameters). Keys the recipe already controls are errors.",
    )

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedSection:
        problems: list[str] = []
        if self.offload_param != "none" and self.zero_stage != 3:
            problems.append(
                f"deepspeed.offload_param: {self.offload_param} needs ZeRO stage 3, and deepspeed.zero_stage is "
                f"{self.zero_stage}; set deepspeed.zero_stage: 3 or deepspeed.offload_param: none"
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            problems.append(
                f"deepspeed.offload_optimizer: {self.offload_optimizer} needs ZeRO stage >= 1; raise "
                "deepspeed.zero_stage or set deepspeed.offload_optimizer: none"
            )
        if self.overlap_comm and self.zero_stage == 0:
            problems.append("deepspeed.overlap_comm needs ZeRO stage >= 1; set deepspeed.overlap_comm: false")
        for key, owner in _DS_OWNED_KEYS.items():
            if key in self.extra:
                problems.append(f"deepspeed.extra.{key} is set by the recipe ({owner}); remove it from deepspeed.extra")
        zero = self.extra.get("zero_optimization")
        if zero is not None and not isinstance(zero, dict):
            problems.append("deepspeed.extra.zero_optimization must be a mapping")
        elif zero:
            for key, owner in _DS_OWNED_ZERO_KEYS.items():
                if key in zero:
                    problems.append(
                        f"deepspeed.extra.zero_optimization.{key} is set by the recipe ({owner}); remove it from "
                        "deepspeed.extra"
                    )
        if problems:
            raise ValueError("\n".join(problems))
        return self


# ------------------------------------------------------------------------------------------------- logging


class Wandb(_Section):
    """Weights & Biases logging (needs the wandb package)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(False, description="Log metrics to W&B.")
    project: str = Field("vlmtune", description="W&B project.")
    run_name: str | None = Field(None, description="W&B run name (null = the name of train.output_dir).")

    @model_validator(mode="after")
    def _check(self) -> Wandb:
        stray = _explicit(self, ["project", "run_name"])
        if not self.enabled and stray and "enabled" not in self.model_fields_set:
            keys = ", ".join(f"logging.wandb.{k}" for k in stray)
            raise ValueError(f"{keys} set but logging.wandb.enabled is false; add logging.wandb.enabled: true")
        return self


class LoggingSection(_Section):
    """What the run reports and where."""

    model_config = ConfigDict(extra="forbid")

    log_every: int = Field(
        1, ge=1, description="TensorBoard / W&B scalars, and the console line when there is no progress bar, every N "
        "optimizer steps (and the last); metrics.jsonl records every step whatever N (resume and the curves read it).",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard scalars to <train.output_dir>/tensorboard.")
    wandb: Wandb = Field(default_factory=Wandb, description="Weights & Biases logging.")
    plots: bool = Field(True, description="Write loss / learning-rate curves as PNG into train.output_dir at the end.")


# -------------------------------------------------------------------------------------------------- launch


class Slurm(_Section):
    """Settings of the rendered sbatch script (`vlmtune launch --slurm`)."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(None, description="#SBATCH --partition (null = the cluster default).")
    time: str | None = Field(
        None,
        description="#SBATCH --time, e.g. '1-00:00:00' or '04:00:00' (quote it: YAML reads an unquoted 4:00:00 as the "
        "number 14400). null = the partition's limit.",
    )
    gpus_per_node: int | None = Field(
        None, ge=1, description="#SBATCH --gpus-per-node (null = launch.nproc_per_node)."
    )
    account: str | None = Field(None, description="#SBATCH --account (null = none).")
    extra_sbatch: list[str] = Field(
        default_factory=list, description="Extra '#SBATCH' option lines, e.g. ['--qos=high', '--exclusive']."
    )

    @field_validator("time", mode="before")
    @classmethod
    def _time_is_text(cls, value: Any) -> Any:
        if isinstance(value, int | float) and not isinstance(value, bool):
            raise ValueError(
                f"got the number {value}: YAML reads an unquoted HH:MM:SS as a number of seconds; quote the time, "
                "e.g. time: '04:00:00'"
            )
        return value


class LaunchSection(_Section):
    """How many processes, on which nodes."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int = Field(1, ge=1, description="Processes (GPUs) per node.")
    nnodes: int = Field(1, ge=1, description="Nodes.")
    node_rank: int = Field(0, ge=0, description="Rank of this node in [0, nnodes) (SLURM/torchrun set it per node).")
    master_addr: str = Field("127.0.0.1", description="Rendezvous host (the rank-0 node).")
    master_port: int = Field(29500, ge=1, le=65535, description="Rendezvous TCP port.")
    hostfile: Path | None = Field(
        None,
        description="DeepSpeed hostfile ('host slots=N' per line) for `deepspeed` launches. Relative paths resolve "
        "against the recipe file's folder.",
    )
    slurm: Slurm = Field(default_factory=Slurm, description="SLURM batch settings.")
    collective_timeout_s: int = Field(
        1800, ge=1, description="Timeout of a collective (NCCL/gloo) in seconds before the run fails."
    )

    @model_validator(mode="after")
    def _check(self) -> LaunchSection:
        if self.node_rank >= self.nnodes:
            raise ValueError(f"launch.node_rank ({self.node_rank}) must be < launch.nnodes ({self.nnodes})")
        return self

    @property
    def world_size(self) -> int:
        """Processes in the run: nproc_per_node x nnodes."""
        return self.nproc_per_node * self.nnodes


# -------------------------------------------------------------------------------------------------- recipe


_DTYPE_PRECISION = {"bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


class Recipe(_Section):
    """A full training recipe. Build it with :func:`vlmtune.config.load_recipe` (paths, overrides, world size)."""

    model_config = ConfigDict(extra="forbid")

    model: ModelSection = Field(description="The model to fine-tune.")
    data: DataSection = Field(description="Training and evaluation data.")
    packing: PackingSection = Field(default_factory=PackingSection, description="Packing of samples into buffers.")
    train: TrainSection = Field(description="Optimisation, checkpointing and evaluation.")
    deepspeed: DeepSpeedSection = Field(default_factory=DeepSpeedSection, description="DeepSpeed ZeRO settings.")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="Metrics and plots.")
    launch: LaunchSection = Field(default_factory=LaunchSection, description="Processes and nodes.")

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        problems: list[str] = []
        ds, train, data = self.deepspeed, self.train, self.data
        expected = _DTYPE_PRECISION[self.model.dtype]
        if ds.precision != "auto" and ds.precision != expected:
            problems.append(
                f"deepspeed.precision: {ds.precision} disagrees with model.dtype: {self.model.dtype} (which means "
                f"{expected}); set deepspeed.precision: auto"
            )
        if data.eval is None:
            for key in _explicit(train, ["eval_every", "eval_samples"]):
                if getattr(train, key) is not None:
                    problems.append(f"train.{key} is set but data.eval is empty; add data.eval datasets or remove it")
        if self.model.freeze.vision_tower and train.vision_lr is not None:
            problems.append("train.vision_lr is set but model.freeze.vision_tower is true; remove one of them")
        if self.model.freeze.projector and train.projector_lr is not None:
            problems.append("train.projector_lr is set but model.freeze.projector is true; remove one of them")
        if problems:
            raise ValueError("\n".join(problems))
        # Fill-ins, so that recipe.resolved.yaml states what will actually be used.
        if self.packing.mode == "offline" and self.packing.pack_dir is None:
            self.packing.pack_dir = self.train.output_dir / "packs"
        if self.packing.mode == "on_the_fly" and self.packing.window is None:
            self.packing.window = DEFAULT_ON_THE_FLY_WINDOW
        return self

    @property
    def precision(self) -> Literal["bf16", "fp32", "fp64"]:
        """DeepSpeed precision mode with ``auto`` resolved from model.dtype."""
        return _DTYPE_PRECISION[self.model.dtype]  # type: ignore[return-value]

    def world_size(self, world_size: int | None = None) -> int:
        """``world_size`` if given, else launch.nproc_per_node x launch.nnodes."""
        return self.launch.world_size if world_size is None else world_size

    def grad_accum_steps(self, world_size: int | None = None) -> int:
        """Micro-steps per optimizer step: global_batch_size / (micro_batch_size x world size).

        Args:
            world_size: ranks in the run; None = launch.nproc_per_node x launch.nnodes.

        Raises:
            RecipeError: when the division is not exact (or world_size < 1), with the nearest valid global sizes.
        """
        world = self.world_size(world_size)
        if world < 1:
            raise RecipeError(f"world size must be >= 1, got {world}")
        per_step = self.train.micro_batch_size * world
        gbs = self.train.global_batch_size
        if gbs % per_step:
            near = sorted({max(per_step, gbs // per_step * per_step), (gbs // per_step + 1) * per_step})
            raise RecipeError(
                f"train.global_batch_size={gbs} is not divisible by train.micro_batch_size "
                f"({self.train.micro_batch_size}) x world size ({world}) = {per_step}; use a multiple of {per_step} "
                f"(e.g. {' or '.join(map(str, near))}) or change train.micro_batch_size"
            )
        return gbs // per_step
