"""Causal language models: a small GPT in plain PyTorch, and ``transformers`` models built from a config.

Both map token ids ``(N, L)`` to next-token logits ``(N, L, V)``; :class:`GPT` also exposes
:meth:`GPT.hidden_states` and :attr:`GPT.head` for the chunked loss (:mod:`kd_lightning.loss.chunked`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import KDError, check_integer


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: Tensor, allowed: Tensor | None = None, cache: tuple[KVCache, int] | None = None) -> Tensor:
        """``allowed``: ``(N, 1, L, K)`` bool, which keys each position may attend to; ``None``: every earlier one (and,
        after cached tokens, all of those).
        ``cache``: ``(the cache, this block's index)``: the keys and values of ``x`` join those read before (``K`` of
        them in all), which ``x`` attends to as ``allowed`` says."""
        n, length, dim = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            k, v = cache[0].extend(cache[1], k, v)
        causal = allowed is None and k.shape[2] == length  # new tokens after cached ones see every cached one
        attended = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, is_causal=causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(attended.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """Pre-norm transformer block: attention, then a 4x MLP, each with a residual."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = CausalSelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, allowed: Tensor | None = None, cache: tuple[KVCache, int] | None = None) -> Tensor:
        x = x + self.attention(self.norm1(x), allowed, cache)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """A GPT-2-style decoder: token + learned position embeddings, ``depth`` blocks, a tied output head.

    Args:
        vocab_size: output rows ``V`` (at least the tokenizer's size; more rows are padding).
        context_length: the longest sequence it reads (positions it has embeddings for).
        dim, depth, heads: width, number of blocks, attention heads (``dim % heads == 0``).
        dropout: on attention weights and block outputs while training.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int = 128,
        dim: int = 128,
        depth: int = 4,
        heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise KDError(f"model.dim ({dim}) must be a multiple of model.heads ({heads}).")
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(context_length, dim)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.head.weight = self.token_embedding.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden_states(self, tokens: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Final hidden states ``(N, L, dim)`` of token ids ``(N, L)``.

        ``position_ids`` ``(N, L)``: each token's position in its own example, for rows that pack several examples one
        after another (a new example wherever the position does not go up by one); each token then attends only to the
        earlier tokens of its example. ``None``: one example a row, positions ``0 .. L-1``.
        """
        length = tokens.shape[1]
        if length > self.context_length:
            raise KDError(
                f"a sequence of {length} tokens is longer than the model's context of {self.context_length}; "
                f"set data.block_size={self.context_length} or less (or build the model with "
                f"context_length={length})."
            )
        positions = torch.arange(length, device=tokens.device) if position_ids is None else position_ids
        allowed = None if position_ids is None else _within_example(position_ids)
        return self.read(tokens, positions, allowed)

    def read(self, tokens: Tensor, positions: Tensor, allowed: Tensor | None, cache: KVCache | None = None) -> Tensor:
        """Final hidden states of ``tokens`` at ``positions``, attending as ``allowed`` says (after the tokens in
        ``cache``, which then holds these too)."""
        x = self.dropout(self.token_embedding(tokens) + self.position_embedding(positions))
        for index, block in enumerate(self.blocks):
            x = block(x, allowed, None if cache is None else (cache, index))
        if cache is not None:
            cache.length += tokens.shape[1]
        return self.norm(x)

    def forward(self, tokens: Tensor, position_ids: Tensor | None = None) -> Tensor:
        """Next-token logits ``(N, L, V)`` of token ids ``(N, L)`` (``position_ids``: see :meth:`hidden_states`)."""
        return self.head(self.hidden_states(tokens, position_ids))

    @torch.no_grad()
    def generate(
        self,
        prompts: Tensor,
        max_new_tokens: int,
        *,
        prompt_mask: Tensor | None = None,
        greedy: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
        synced: bool = False,
    ) -> Tensor:
        """Continue ``prompts`` ``(N, P)`` by up to ``max_new_tokens`` tokens each: ``(N, P + T)``, ``T`` the tokens made.

        Each new token reads only itself against the keys and values of the tokens before it (a key/value cache), in
        eval mode and under ``no_grad``; the model's mode is restored after. ``prompt_mask`` ``(N, P)``: 1 for a
        prompt's tokens, 0 for padding on the left (prompts of different lengths, aligned on the right); padding is
        never attended to and positions count from each prompt's first token. ``greedy``: the likeliest token, else one
        drawn (with ``generator``) at ``temperature`` from the ``top_k`` likeliest and the smallest set holding
        ``top_p`` of the probability. A row that has made ``eos_token_id`` makes it again until all have (then it stops).
        ``synced``: take all ``max_new_tokens`` steps even when every row has stopped (a model sharded across processes
        gathers its parameters at every step, on every process together).
        """
        rows, prompt_length = prompts.shape
        check_integer("max_new_tokens", max_new_tokens)
        if prompt_length + max_new_tokens > self.context_length:
            raise KDError(
                f"a prompt of {prompt_length} tokens and max_new_tokens={max_new_tokens} exceed the model's "
                f"context of {self.context_length}; lower max_new_tokens or shorten the prompts."
            )
        real = torch.ones_like(prompts, dtype=torch.bool) if prompt_mask is None else prompt_mask.to(torch.bool)
        positions = (real.long().cumsum(-1) - 1).clamp_min(0)
        padded = not bool(real.all())  # without padding no mask is needed: causal, then every cached token
        allowed = None
        if padded:
            causal = torch.ones(prompt_length, prompt_length, dtype=torch.bool, device=prompts.device).tril()
            itself = torch.eye(
                prompt_length, dtype=torch.bool, device=prompts.device
            )  # a padding query reads itself, not NaN
            allowed = ((causal & real[:, None, :]) | itself)[:, None]
        cache = KVCache(len(self.blocks), prompt_length + max_new_tokens)
        training = self.training
        self.eval()
        try:
            logits = self.head(self.read(prompts, positions, allowed, cache)[:, -1])
            position, made = positions[:, -1:], [prompts]
            finished = torch.zeros(rows, dtype=torch.bool, device=prompts.device)
            for step in range(max_new_tokens):
                token = _next_token(logits, greedy, temperature, top_k, top_p, generator)
                if eos_token_id is not None:
                    token = torch.where(finished, eos_token_id, token)
                    finished |= token == eos_token_id
                made.append(token[:, None])
                if step == max_new_tokens - 1 or (not synced and bool(finished.all())):
                    break
                position = position + 1
                if padded:
                    real = torch.cat([real, real.new_ones(rows, 1)], 1)
                logits = self.head(
                    self.read(token[:, None], position, real[:, None, None, :] if padded else None, cache)[:, -1]
                )
        finally:
            self.train(training)
        return torch.cat(made, 1)


class KVCache:
    """The keys and values of the tokens a :class:`GPT` has read, per block: ``(N, heads, capacity, dim / heads)``
    buffers filled from the left (``length`` tokens so far)."""

    def __init__(self, blocks: int, capacity: int) -> None:
        self.capacity, self.length = capacity, 0
        self.keys: list[Tensor | None] = [None] * blocks
        self.values: list[Tensor | None] = [None] * blocks

    def extend(self, block: int, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
        """Add ``(N, heads, t, d)`` keys and values after those held; all of them so far."""
        if self.keys[block] is None:
            shape = (*keys.shape[:2], self.capacity, keys.shape[-1])
            self.keys[block], self.values[block] = keys.new_zeros(shape), values.new_zeros(shape)
        end = self.length + keys.shape[2]
        self.keys[block][:, :, self.length : end] = keys
        self.values[block][:, :, self.length : end] = values
        return self.keys[block][:, :, :end], self.values[block][:, :, :end]


def _next_token(
    logits: Tensor,
    greedy: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``(N,)`` tokens from next-token logits ``(N, V)``: the likeliest, or drawn at ``temperature`` from the ``top_k``
    likeliest and the nucleus holding ``top_p`` of the probability."""
    if greedy:
        return logits.argmax(-1)
    if not temperature > 0:
        raise KDError(
            f"the sampling temperature must be > 0, got {temperature}; for the likeliest token use greedy=true."
        )
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        before = ordered.softmax(-1).cumsum(-1) - ordered.softmax(-1)  # probability of the likelier tokens
        logits = logits.masked_fill(
            torch.zeros_like(logits, dtype=torch.bool).scatter(-1, order, before >= top_p), float("-inf")
        )
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _within_example(position_ids: Tensor) -> Tensor:
    """``(N, 1, L, L)`` bool: True where query ``i`` may attend to key ``j``, an earlier token (or itself) of the same
    packed example; an example starts wherever the position does not go up by one."""
    starts = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1) != 1
    example = starts.cumsum(-1)  # (N, L)
    length = position_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    return ((example[:, :, None] == example[:, None, :]) & causal)[:, None]


def hf_causal_lm(model_type: str, **config: Any) -> nn.Module:
    """A ``transformers`` causal LM built from a config, with fresh weights (nothing is downloaded).

    ``hf_causal_lm("gpt2", vocab_size=2048, n_layer=2, n_embd=64, n_head=2, n_positions=128)``;
    from Hydra: ``{_target_: kd_lightning.models.gpt.hf_causal_lm, model_type: llama, ...}``.
    Needs the ``lm`` extra (``pip install kd_lightning[lm]``).
    """
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        raise KDError("Hugging Face models need the transformers package: pip install 'kd_lightning[lm]'.") from None
    try:
        hf_config = AutoConfig.for_model(model_type, **config)
    except ValueError as error:
        raise KDError(f"model_type {model_type!r} is not a transformers model type ({error}).") from None
    return AutoModelForCausalLM.from_config(hf_config)


def gpt_to_transformers(model: GPT) -> nn.Module:
    """The same network as a ``transformers`` ``GPT2LMHeadModel`` (same logits; exact GELU, ``activation_function=gelu``),
    for ``save_pretrained`` and plain ``AutoModelForCausalLM.from_pretrained``. GPT-2 keeps its linear weights as
    ``(in, out)`` (``Conv1D``): ours are transposed into it."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        raise KDError(
            "exporting as a transformers model needs the transformers package: pip install 'kd_lightning[lm]'."
        ) from None
    dim, blocks = model.token_embedding.embedding_dim, model.blocks
    config = GPT2Config(
        vocab_size=model.vocab_size,
        n_positions=model.context_length,
        n_embd=dim,
        n_layer=len(blocks),
        n_head=blocks[0].attention.heads if len(blocks) else 1,
        n_inner=4 * dim,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=model.norm.eps,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=None,
    )
    converted = GPT2LMHeadModel(config)
    state = {
        "transformer.wte.weight": model.token_embedding.weight,
        "transformer.wpe.weight": model.position_embedding.weight,
        "transformer.ln_f.weight": model.norm.weight,
        "transformer.ln_f.bias": model.norm.bias,
    }
    for i, block in enumerate(blocks):
        ours = {
            "ln_1": block.norm1,
            "ln_2": block.norm2,
            "attn.c_attn": block.attention.qkv,
            "attn.c_proj": block.attention.proj,
            "mlp.c_fc": block.mlp[0],
            "mlp.c_proj": block.mlp[2],
        }
        for name, layer in ours.items():
            transposed = isinstance(layer, nn.Linear)  # GPT-2's Conv1D holds (in, out)
            state[f"transformer.h.{i}.{name}.weight"] = layer.weight.t() if transposed else layer.weight
            state[f"transformer.h.{i}.{name}.bias"] = layer.bias
    missing, unexpected = converted.load_state_dict(
        {k: v.detach().clone().contiguous() for k, v in state.items()}, strict=False
    )
    left = [key for key in missing if key != "lm_head.weight"]  # tied to wte
    if left or unexpected:
        raise KDError(f"GPT -> GPT-2 conversion left weights unset: {left or unexpected}; please report this.")
    converted.tie_weights()
    return converted.eval()
