"""Loading Hugging Face causal LMs, building the tiny local model, the policy forward pass."""

from __future__ import annotations

import copy
import string
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlfuse.config import ModelConfig
from rlfuse.data import Batch, ForwardOutput, HeadInputs
from rlfuse.errors import ConfigError, RlfuseError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The tiny tokenizer: one token per printable ASCII character, plus four specials.
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = list(string.digits + string.ascii_letters + string.punctuation + " \n")
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def build_tiny_tokenizer():
    """A character-level tokenizer built with the `tokenizers` library (no download)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(cfg: ModelConfig, tokenizer: Any, seed: int) -> nn.Module:
    """A small Llama built from a transformers config; same seed, same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(state)
    return model


class ModelError(RlfuseError):
    """A model or tokenizer named in the config could not be loaded."""


def check_model_path(path: str, key: str, need: str = "config.json") -> None:
    """A clear error for a local model folder that cannot hold a model: a file, a missing
    folder given as a path, a folder without ``need``. Hub names (``org/name``) pass."""
    p = Path(path).expanduser()
    if p.is_file():
        raise ConfigError(key, "is a file; expected a model folder (save_pretrained) or a hub name", path)
    if p.is_dir():
        if not any(p.iterdir()):
            raise ConfigError(key, "is an empty folder; expected a model folder (save_pretrained)", path)
        if need and not (p / need).exists():
            raise ConfigError(key, f"is a folder without {need}: not a save_pretrained model folder", path)
    elif path.startswith(("/", "./", "../", "~")) or path.count("/") > 1:
        raise ConfigError(key, "no such folder", path)


def _load(what: str, path: str, key: str, fn: Any) -> Any:
    try:
        return fn()
    except (OSError, ValueError, ImportError) as e:  # transformers' own errors for a bad model/tokenizer
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"could not load the {what} '{path}' ({key}): {first}") from e


def load_tokenizer(cfg: ModelConfig):
    path = cfg.tokenizer or cfg.name_or_path
    if path is None:
        return build_tiny_tokenizer()
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    check_model_path(path, key, need="")
    tok = _load("tokenizer", path, key, lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(cfg: ModelConfig, tokenizer: Any, seed: int) -> nn.Module:
    if cfg.name_or_path is None:
        model = build_tiny_model(cfg, tokenizer, seed).to(DTYPES[cfg.dtype or "float32"])
    else:
        model = load_pretrained(cfg.name_or_path, cfg)
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        if tokenizer.eos_token_id is not None:
            model.generation_config.eos_token_id = tokenizer.eos_token_id
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.lora.r:
        model = apply_lora(model, cfg)
    return model


# ------------------------------------------------------------------------- LoRA (peft)


def apply_lora(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """Wrap ``model`` in a peft LoRA model: only the adapters train, the base is frozen."""
    lc = cfg.lora
    if lc.r < 0 or lc.alpha <= 0 or not 0 <= lc.dropout < 1:
        raise ValueError(f"model.lora: need r >= 0, alpha > 0, 0 <= dropout < 1; got r={lc.r}, alpha={lc.alpha}, dropout={lc.dropout}")
    try:
        import peft
    except ImportError:
        raise ImportError("model.lora.r > 0 needs peft: pip install 'rlfuse[lora]'") from None
    targets = list(lc.target_modules) if lc.target_modules else "all-linear"
    config = peft.LoraConfig(
        task_type="CAUSAL_LM", r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets
    )
    try:
        model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise ValueError(f"model.lora.target_modules={targets}: {e}") from None
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return model


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "get_base_model")


class AdapterDisabled(nn.Module):
    """The reference of a LoRA policy: the same base model with its adapters switched off.

    No copy: the policy is held outside the module tree, so this module has no parameters of
    its own and moving or freezing it never touches the policy."""

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.__dict__["peft_model"] = peft_model

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.peft_model.disable_adapter():
            return self.peft_model(*args, **kwargs)


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load a checkpoint folder written by :func:`save_pretrained` into ``model`` in place."""
    if is_peft(model):
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(model, load_file(str(Path(folder) / "adapter_model.safetensors")))
        return
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=next(model.parameters()).dtype)
    model.load_state_dict(loaded.state_dict())


def save_merged(model: nn.Module, tokenizer: Any, folder: Path, dtype: str | None = None) -> None:
    """A plain ``save_pretrained`` folder of a LoRA policy with its adapter merged in."""
    merged = copy.deepcopy(model).merge_and_unload()
    folder.mkdir(parents=True, exist_ok=True)
    save_pretrained(merged, folder, dtype)
    tokenizer.save_pretrained(folder)


def load_pretrained(path: str, cfg: ModelConfig) -> nn.Module:
    from transformers import AutoModelForCausalLM

    dtype = cfg.dtype or "float32"
    if dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got '{cfg.dtype}'")
    key = "model.ref_name_or_path" if path == cfg.ref_name_or_path else "model.name_or_path"
    check_model_path(path, key)
    return _load("model", path, key, lambda: AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[dtype], trust_remote_code=cfg.trust_remote_code
    ))


def torch_dtype(name: str, key: str) -> torch.dtype:
    """``DTYPES[name]``, or an error naming the config key."""
    if name not in DTYPES:
        raise ValueError(f"{key} must be one of {sorted(DTYPES)}, got '{name}'")
    return DTYPES[name]


def save_pretrained(
    model: nn.Module, folder: Path, dtype: str | None = None, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """``model.save_pretrained(folder)``, the weights cast to ``dtype`` when given (the
    model itself keeps its own dtype). A LoRA model writes its adapter (in its own dtype).
    ``state_dict`` replaces the model's own (a sharded policy's gathered weights)."""
    if (dtype is None and state_dict is None) or is_peft(model):
        model.save_pretrained(folder)
        return
    cast = torch_dtype(dtype, "trainer.save_dtype") if dtype is not None else None
    tied = _tied_names(model)  # written once, as save_pretrained does with the model's own state
    state = {k: (v.to(cast) if cast is not None and v.is_floating_point() else v)
             for k, v in (state_dict if state_dict is not None else model.state_dict()).items() if k not in tied}
    model.save_pretrained(folder, state_dict=state)
    config = getattr(model, "config", None)
    if config is not None and dtype is not None:  # record the saved dtype, so `from_pretrained(dtype="auto")` loads it as saved
        cfg_file = Path(folder) / "config.json"
        if cfg_file.exists():
            import json

            data = json.loads(cfg_file.read_text())
            data["dtype"] = data["torch_dtype"] = dtype
            cfg_file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _tied_names(model: nn.Module) -> set[str]:
    """Names of parameters that are another parameter (a tied lm_head), after the first."""
    seen: set[int] = set()
    tied = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(name)
        seen.add(id(p))
    return tied


def frozen_copy(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:  # (B, T)
    """Positions that count only real tokens, as HF ``generate`` uses for padded rows."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _from_hidden_ok(model: nn.Module) -> bool:
    """Whether logits are exactly ``hidden @ lm_head.T`` (no soft-capping or scaling)."""
    c = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(c, attr, None) not in (None, 1, 1.0):
            return False
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return isinstance(head, nn.Linear) and hasattr(model, "base_model") and model.base_model is not model


#: Vocabularies from this size up (real tokenizers) get the tied-embedding gradient fold of
#: :func:`trunk_inputs` (below it the (V, H) temporary is small) and the common-prefix layout of
#: :mod:`rlfuse.packing`; the tiny model (99 tokens) keeps its seeded figures.
LARGE_VOCAB = 8192


def trunk_inputs(model: nn.Module, ids: torch.Tensor, fold: bool = True) -> dict[str, torch.Tensor]:
    """The token inputs of a forward: ``input_ids``, or -- when the trained input embedding is
    tied to the lm_head (one (V, H) weight) -- ``inputs_embeds`` looked up from the detached
    weight, whose gradient a hook adds into the weight's gradient row by row.

    Why: autograd sums the two gradients of a tied weight, the lm_head's (V, H) product and the
    embedding's, which ``embedding_backward`` makes as a zero-filled (V, H) tensor (SmolLM2:
    113 MiB fp32) at the very end of the backward, where the step's peak memory is (every other
    gradient exists by then). ``index_add_`` of the looked-up rows needs none. Same gradient up
    to the order of fp32 additions (tested). Only for a plain ``nn.Embedding`` (no max_norm,
    frequency scaling or sparse gradient), in a grad-enabled forward, ``fold`` (False under
    fsdp, whose unsharded weights are not leaves) and a vocabulary >= :data:`LARGE_VOCAB`."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    w = getattr(emb, "weight", None)
    if not (
        fold and torch.is_grad_enabled() and type(emb) is nn.Embedding and w is not None and w.is_leaf
        and w.requires_grad and getattr(head, "weight", None) is w and w.shape[0] >= LARGE_VOCAB
        and emb.max_norm is None and not emb.scale_grad_by_freq and not emb.sparse
    ):  # fmt: skip
        return {"input_ids": ids}
    e = nn.functional.embedding(ids, w.detach(), emb.padding_idx).requires_grad_()
    pad = emb.padding_idx

    def fold_rows(leaf: torch.Tensor) -> None:
        g, leaf.grad = leaf.grad, None
        rows, idx = g.reshape(-1, g.shape[-1]), ids.reshape(-1)
        if pad is not None:  # embedding_backward gives the padding row no gradient
            keep = idx != pad
            rows, idx = rows[keep], idx[keep]
        if w.grad is None:  # the lm_head's gradient comes later (or not at all): start it
            w.grad = torch.zeros_like(w)
        w.grad.index_add_(0, idx, rows.to(w.grad.dtype))

    e.register_post_accumulate_grad_hook(fold_rows)
    return {"inputs_embeds": e}


def forward(
    model: nn.Module,
    batch: Batch,
    *,
    entropy: bool = False,
    hidden: bool = False,
    temperature: float = 1.0,
    head: bool = False,
) -> ForwardOutput:
    """Token log-probs of ``batch.input_ids`` under ``model``, aligned with the tokens.

    The full (B, T, V) logits tensor is never formed when the model allows it: the final
    hidden states go through :func:`rlfuse.kernels.linear_token_logprobs` with the lm_head
    weight, chunked over tokens -- only at the positions ``response_mask`` scores, with
    all-padding columns dropped and a prompt shared by several rows run once
    (:mod:`rlfuse.packing`); log-probs and entropy outside ``response_mask`` are then 0.
    Otherwise the logits go through :func:`rlfuse.kernels.token_logprobs`.
    With ``head=True`` the forward stops before the lm_head's log-softmax: the result holds
    :class:`~rlfuse.data.HeadInputs` (hidden rows + lm_head, or the logits) and computes
    log-probs (and, with ``entropy``, the entropy) from them only when they are read.
    """
    from rlfuse.fsdp import root_of

    root = root_of(model)
    if root is not None:  # sharded (trainer.strategy=fsdp): gather the root parameters around it all
        return root(_forward, model, batch, entropy=entropy, hidden=hidden, temperature=temperature, head=head,
                    fold=False)  # fmt: skip
    return _forward(model, batch, entropy=entropy, hidden=hidden, temperature=temperature, head=head)


def _forward(
    model: nn.Module, batch: Batch, *, entropy: bool, hidden: bool, temperature: float, head: bool = False,
    fold: bool = True,
) -> ForwardOutput:
    if isinstance(model, AdapterDisabled):  # a LoRA policy's reference: the base alone
        with model.peft_model.disable_adapter():
            return forward(model.peft_model, batch, entropy=entropy, hidden=hidden, temperature=temperature, head=head)
    if is_peft(model):  # the wrapped transformers model (adapters injected in its layers)
        model = model.get_base_model()
    ids, mask = batch.input_ids, batch.attention_mask
    pos = position_ids(mask)
    if _from_hidden_ok(model):
        inputs, h = _forward_scored(model, batch, pos, hidden=hidden, temperature=temperature, fold=fold)
    else:
        tokens = trunk_inputs(model, ids, fold)
        out = model(**tokens, attention_mask=mask, position_ids=pos, output_hidden_states=hidden)
        h = out.hidden_states[-1] if hidden else None
        # (B, T): column t holds the token t + 1 that logits[:, t] predicts; a row's first real
        # token has no prediction (padding before it) and the last column none: not scored
        nxt = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
        labels = torch.cat([nxt, nxt.new_full((nxt.shape[0], 1), -100)], dim=1)
        inputs = HeadInputs(labels=labels, shape=tuple(ids.shape), logits=out.logits, temperature=temperature)
    if head:
        return ForwardOutput(hidden=h, head=inputs, head_entropy=entropy)
    lp, ent = inputs.logprobs(entropy)
    return ForwardOutput(logprobs=lp, entropy=ent, hidden=h)


# Whether forwards run a prompt shared by several rows once (``model.share_prefix``), and
# pack rows that share nothing into common sequences (``model.pack``, see rlfuse.packing).
SHARE_PREFIX = True
PACK = False


def configure(cfg: ModelConfig) -> None:
    """Apply the forward-pass settings of ``cfg`` (called by the trainer)."""
    global SHARE_PREFIX, PACK
    SHARE_PREFIX = bool(getattr(cfg, "share_prefix", True))
    PACK = bool(getattr(cfg, "pack", False))


def _forward_scored(
    model: nn.Module, batch: Batch, pos: torch.Tensor, *, hidden: bool, temperature: float, fold: bool = True
) -> tuple[HeadInputs, torch.Tensor | None]:
    """The hidden-states path of :func:`forward`: the trunk's final hidden states at the
    scored positions only, padding columns dropped, shared prompts run once (see
    :mod:`rlfuse.packing`), as head inputs in the rows layout; and (B, T, H) hidden states
    when asked."""
    from rlfuse import packing

    ids, mask = batch.input_ids, batch.attention_mask
    B, T = ids.shape
    score = packing.scored_positions(batch.response_mask, mask)  # (B, T)
    impl = getattr(model.config, "_attn_implementation", None)
    layout = None
    if (SHARE_PREFIX or PACK) and impl in ("sdpa", "eager"):
        common = SHARE_PREFIX and getattr(model.config, "vocab_size", 0) >= LARGE_VOCAB
        layout = packing.plan_shared_prefixes(ids, mask, batch.response_mask, pos, pack=PACK, share=SHARE_PREFIX,
                                              common=common)  # fmt: skip
    bi, ti = score.nonzero(as_tuple=True)  # scored tokens; each is predicted at t - 1
    h = None
    if layout is not None:
        dtype = next(model.parameters()).dtype
        out = model.base_model(
            **trunk_inputs(model, layout.input_ids, fold),
            attention_mask=layout.attention_mask(impl, dtype),
            position_ids=layout.position_ids,
        )
        flat = out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])  # (G * L, H)
        rows = flat[layout.where[bi, ti - 1]]  # (N, H)
        if hidden:
            real = layout.where >= 0
            h = flat[layout.where.clamp_min(0)] * real[..., None].to(flat.dtype)  # (B, T, H)
    else:
        cols = packing.trim_columns(mask)
        tokens = trunk_inputs(model, ids[:, cols], fold)
        out = model.base_model(**tokens, attention_mask=mask[:, cols], position_ids=pos[:, cols])
        hc = out.last_hidden_state  # (B, T', H)
        rows = hc[bi, ti - 1 - cols.start]  # (N, H)
        if hidden:
            h = torch.nn.functional.pad(hc, (0, 0, cols.start, T - cols.stop))  # (B, T, H)
    lm_head = model.get_output_embeddings()
    inputs = HeadInputs(
        labels=ids[bi, ti], shape=(B, T), index=(bi, ti), hidden=rows, weight=lm_head.weight,
        bias=lm_head.bias, temperature=temperature,
    )  # fmt: skip
    return inputs, h
