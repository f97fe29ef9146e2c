"""Exercises of notebook 03, attention: scaled dot-product attention, its heads, the cross-attention module
and the GEGLU of the transformer's feed-forward.

Notation as in attention.py: B batch, N query tokens (image positions), L key tokens (words), d the width
of a query and a key, heads × dim_head = inner_dim. Each solution below is the code of the notebook's
solution cell (between # BEGIN SOLUTION and # END SOLUTION); each Mistake is a wrong answer students write,
with the hint it earns. Function exercises run in float64; module exercises (run_module) in float32, the
dtype a module is built in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import GEGLU, Attention
from .core import Exercise, Mistake, run_module

SOURCE_VASWANI = "Vaswani et al. 2017 (arXiv:1706.03762)"
SOURCE_LDM = "Rombach et al. 2022 (arXiv:2112.10752), section 3.3"


def _randn(generator, *shape, dtype=torch.float64):
    return torch.randn(shape, generator=generator, dtype=dtype)


def random_weights(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict for `module` with every entry drawn from `seed`: matrices and kernels scaled by their fan-in
    (so activations stay near unit size), norm scales around 1, biases around 0. Nothing is left at its
    initial value, so a block that uses the wrong norm or forgets a bias is seen."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, value in module.state_dict().items():
        noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
        if value.ndim >= 2:
            weights[name] = noise / value[0].numel() ** 0.5  # (out, in, ...): divide by sqrt(fan-in)
        elif name.endswith("weight"):
            weights[name] = 1 + 0.5 * noise  # a GroupNorm / LayerNorm scale
        else:
            weights[name] = 0.5 * noise
    return weights


def build(cls, *args, **kwargs) -> nn.Module:
    """cls(*args, **kwargs) without drawing from the global random generator: a check leaves the notebook's
    random state as it found it (the weights are replaced anyway)."""
    with torch.random.fork_rng(devices=[]):
        return cls(*args, **kwargs)


def _minildm_module(cls, weights: dict, dtype: torch.dtype, *args) -> nn.Module:
    """minildm's module cls(*args) holding `weights`, in `dtype`, ready to run."""
    module = build(cls, *args).to(dtype)
    module.load_state_dict(weights)
    return module.eval()


# ---- scaled dot-product attention -----------------------------------------------------------------------------


def attention(q, k, v):
    # BEGIN SOLUTION
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # Q Kᵀ / √d: (B, N, d) @ (B, d, L) -> (B, N, L)
    return scores.softmax(dim=-1) @ v  # softmax(Q Kᵀ / √d) V, each row over the keys: (B, N, L) @ (B, L, d_v)
    # END SOLUTION


def _attention_cases(seed):
    g = torch.Generator().manual_seed(seed)
    return [{"q": _randn(g, 2, 3, 6), "k": _randn(g, 2, 4, 6), "v": _randn(g, 2, 4, 5)},  # B N L d d_v all differ
            {"q": _randn(g, 3, 7, 4), "k": _randn(g, 3, 2, 4), "v": _randn(g, 3, 2, 5)}]


def _attention_mistake(scale=lambda d: d**0.5, softmax_dim=-1, value_width=False):
    def wrong(q, k, v):
        d = v.shape[-1] if value_width else q.shape[-1]
        return (q @ k.transpose(-1, -2) / scale(d)).softmax(dim=softmax_dim) @ v
    return wrong


ATTENTION = Exercise(
    name="attention", notebook="03_attention",
    task="attention(q, k, v) -> (B, N, d_v): scaled dot-product attention softmax(Q Kᵀ / √d) V for queries "
         "q (B, N, d), keys k (B, L, d) and values v (B, L, d_v); each query's weights over the L keys sum to 1.",
    source=f"{SOURCE_VASWANI}, eq. (1): Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V ({SOURCE_LDM})",
    solution=attention, cases=_attention_cases,
    reference=lambda q, k, v: F.scaled_dot_product_attention(q, k, v),  # what minildm's Attention calls
    mistakes=(
        Mistake("the softmax runs over the queries (dim=-2): each query's weights must sum to 1 over the keys, "
                "softmax(dim=-1) on the (B, N, L) scores", _attention_mistake(softmax_dim=-2)),
        Mistake("the scale is missing: divide the scores by √d (d = the width of q and k) before the softmax",
                _attention_mistake(scale=lambda d: 1.0)),
        Mistake("divided by d: the scale is √d, which keeps the scores' standard deviation at 1",
                _attention_mistake(scale=lambda d: d)),
        Mistake("scaled by the width of the values: d is the width of the queries and keys, q.shape[-1]",
                _attention_mistake(value_width=True)),
    ),
)


# ---- several heads --------------------------------------------------------------------------------------------


def multi_head_attention(hidden_states, context, to_q, to_k, to_v, to_out_weight, to_out_bias, heads):
    # BEGIN SOLUTION
    B, N, _ = hidden_states.shape
    L = context.shape[1]
    q = hidden_states @ to_q.T  # (B, N, query_dim) -> (B, N, inner): queries from the image positions
    k = context @ to_k.T  # (B, L, context_dim) -> (B, L, inner): keys and values from the context
    v = context @ to_v.T
    dim_head = q.shape[-1] // heads
    q = q.view(B, N, heads, dim_head).transpose(1, 2)  # (B, N, inner) -> (B, heads, N, dim_head)
    k = k.view(B, L, heads, dim_head).transpose(1, 2)  # (B, L, inner) -> (B, heads, L, dim_head)
    v = v.view(B, L, heads, dim_head).transpose(1, 2)  # (B, L, inner) -> (B, heads, L, dim_head)
    probs = (q @ k.transpose(-1, -2) / dim_head**0.5).softmax(dim=-1)  # softmax(Q Kᵀ / √d) per head: (B, heads, N, L)
    out = (probs @ v).transpose(1, 2).reshape(B, N, heads * dim_head)  # (B, heads, N, dim_head) -> (B, N, inner)
    return out @ to_out_weight.T + to_out_bias  # Concat(head_1 .. head_h) W^O: (B, N, query_dim)
    # END SOLUTION


def _attention_weights(seed, query_dim, context_dim, heads, dim_head):
    module = build(Attention, query_dim, context_dim, heads, dim_head)
    weights = random_weights(module, seed)
    return {"to_q": weights["to_q.weight"].double(), "to_k": weights["to_k.weight"].double(),
            "to_v": weights["to_v.weight"].double(), "to_out_weight": weights["to_out.0.weight"].double(),
            "to_out_bias": weights["to_out.0.bias"].double(), "heads": heads}


def _heads_cases(seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, 2, 5, 10)  # B 2, N 5, query_dim 10; 3 heads of 4: inner 12
    cross = {"hidden_states": x, "context": _randn(g, 2, 7, 6), **_attention_weights(seed, 10, 6, 3, 4)}
    own = {"hidden_states": x, "context": x, **_attention_weights(seed + 10, 10, 10, 3, 4)}  # self-attention
    return [cross, own]


def _minildm_attention(hidden_states, context, to_q, to_k, to_v, to_out_weight, to_out_bias, heads):
    weights = {"to_q.weight": to_q, "to_k.weight": to_k, "to_v.weight": to_v, "to_out.0.weight": to_out_weight,
               "to_out.0.bias": to_out_bias}
    module = _minildm_module(Attention, weights, hidden_states.dtype, to_q.shape[1], to_k.shape[1], heads,
                             to_q.shape[0] // heads)
    with torch.no_grad():
        return module(hidden_states, context)


def _heads_mistake(split_transpose=True, merge_transpose=True, whole_width_scale=False, project=True):
    def wrong(hidden_states, context, to_q, to_k, to_v, to_out_weight, to_out_bias, heads):
        B, N, _ = hidden_states.shape
        L = context.shape[1]
        q, k, v = hidden_states @ to_q.T, context @ to_k.T, context @ to_v.T
        inner = q.shape[-1]
        dim_head = inner // heads
        if split_transpose:
            q, k, v = (x.view(B, -1, heads, dim_head).transpose(1, 2) for x in (q, k, v))
        else:
            q, k, v = q.reshape(B, heads, N, dim_head), k.reshape(B, heads, L, dim_head), v.reshape(B, heads, L, -1)
        probs = (q @ k.transpose(-1, -2) / (inner if whole_width_scale else dim_head) ** 0.5).softmax(dim=-1)
        out = probs @ v
        out = out.transpose(1, 2).reshape(B, N, inner) if merge_transpose else out.reshape(B, N, inner)
        return out @ to_out_weight.T + to_out_bias if project else out
    return wrong


MULTI_HEAD_ATTENTION = Exercise(
    name="multi_head_attention", notebook="03_attention",
    task="multi_head_attention(hidden_states, context, to_q, to_k, to_v, to_out_weight, to_out_bias, heads) -> "
         "(B, N, query_dim): project hidden_states (B, N, query_dim) to queries and context (B, L, context_dim) to "
         "keys and values (to_q, to_k, to_v: nn.Linear weights (inner, in), no bias), split the inner width into "
         "`heads` heads of dim_head = inner / heads, attend in each head, merge the heads and apply the output "
         "projection (to_out_weight (query_dim, inner), to_out_bias (query_dim,)).",
    source=f"{SOURCE_VASWANI}, section 3.2.2: MultiHead(Q, K, V) = Concat(head_1, ..., head_h) W^O, "
           "head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V), each head scaled by √d_k = √dim_head",
    solution=multi_head_attention, cases=_heads_cases, reference=_minildm_attention,
    mistakes=(
        Mistake("heads split without the transpose: a straight reshape of (B, N, inner) to (B, heads, N, dim_head) "
                "mixes positions and channels; view it as (B, N, heads, dim_head), then transpose(1, 2)",
                _heads_mistake(split_transpose=False, merge_transpose=False)),
        Mistake("scaled by the whole inner width: each head is its own attention of width dim_head, so divide "
                "by √dim_head", _heads_mistake(whole_width_scale=True)),
        Mistake("the output projection is missing: after merging the heads, multiply by to_out_weight.T and add "
                "to_out_bias (W^O), back to query_dim", _heads_mistake(project=False)),
        Mistake("heads merged in the wrong order: (B, heads, N, dim_head) must go back to (B, N, heads, dim_head) "
                "(transpose(1, 2)) before the reshape to (B, N, inner)", _heads_mistake(merge_transpose=False)),
    ),
)


# ---- the cross-attention module ----------------------------------------------------------------------------------


class CrossAttention(nn.Module):
    def __init__(self, query_dim, cross_attention_dim, heads, dim_head):
        super().__init__()
        # EXERCISE CrossAttention
        # BEGIN SOLUTION
        inner_dim = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)  # W_Q, for the image positions
        self.to_k = nn.Linear(cross_attention_dim, inner_dim, bias=False)  # W_K, for the text tokens
        self.to_v = nn.Linear(cross_attention_dim, inner_dim, bias=False)  # W_V, for the text tokens
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim), nn.Dropout(0.0)])  # diffusers' names
        # END SOLUTION

    def forward(self, hidden_states, encoder_hidden_states):
        # EXERCISE CrossAttention
        # BEGIN SOLUTION
        B, N, _ = hidden_states.shape
        L = encoder_hidden_states.shape[1]
        q = self.to_q(hidden_states)  # Q = W_Q φ(z_t): (B, N, inner)
        k = self.to_k(encoder_hidden_states)  # K = W_K τ(y): (B, L, inner)
        v = self.to_v(encoder_hidden_states)  # V = W_V τ(y): (B, L, inner)
        q = q.view(B, N, self.heads, -1).transpose(1, 2)  # (B, N, inner) -> (B, heads, N, dim_head)
        k = k.view(B, L, self.heads, -1).transpose(1, 2)  # (B, L, inner) -> (B, heads, L, dim_head)
        v = v.view(B, L, self.heads, -1).transpose(1, 2)  # (B, L, inner) -> (B, heads, L, dim_head)
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(Q Kᵀ / √d) V in each head: (B, heads, N, dim_head)
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, heads, N, dim_head) -> (B, N, inner)
        return self.to_out[1](self.to_out[0](out))  # (B, N, query_dim)
        # END SOLUTION


class _SelfAttention(CrossAttention):
    def forward(self, hidden_states, encoder_hidden_states):
        return super().forward(hidden_states, hidden_states)


class _QueriesFromTheText(CrossAttention):
    def forward(self, hidden_states, encoder_hidden_states):
        return super().forward(encoder_hidden_states, hidden_states)


class _SoftmaxOverTheQueries(CrossAttention):
    def forward(self, hidden_states, encoder_hidden_states):
        B, N, _ = hidden_states.shape
        q = self.to_q(hidden_states).view(B, N, self.heads, -1).transpose(1, 2)
        k = self.to_k(encoder_hidden_states).view(B, -1, self.heads, q.shape[-1]).transpose(1, 2)
        v = self.to_v(encoder_hidden_states).view(B, -1, self.heads, q.shape[-1]).transpose(1, 2)
        probs = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-2)
        return self.to_out[0]((probs @ v).transpose(1, 2).reshape(B, N, -1))


def _cross_attention_case(seed, B, N, L, query_dim, cross_attention_dim, heads, dim_head):
    init = {"query_dim": query_dim, "cross_attention_dim": cross_attention_dim, "heads": heads, "dim_head": dim_head}
    g = torch.Generator().manual_seed(seed)
    inputs = {"hidden_states": _randn(g, B, N, query_dim, dtype=torch.float32),
              "encoder_hidden_states": _randn(g, B, L, cross_attention_dim, dtype=torch.float32)}
    return {"init": init, "weights": random_weights(build(Attention, **init), seed), "inputs": inputs}


def _cross_attention_cases(seed):
    # The first case gives image and text the same width, so that the answers taking keys from the image or
    # queries from the text run (and get their hint) instead of failing on a shape; the second has all sizes
    # different: B 2, N 5, L 7, query_dim 10, cross_attention_dim 6, 3 heads of 4.
    return [_cross_attention_case(seed, B=3, N=5, L=4, query_dim=8, cross_attention_dim=8, heads=2, dim_head=3),
            _cross_attention_case(seed + 10, B=2, N=5, L=7, query_dim=10, cross_attention_dim=6, heads=3,
                                  dim_head=4)]


CROSS_ATTENTION = Exercise(
    name="CrossAttention", notebook="03_attention",
    task="class CrossAttention(nn.Module) with __init__(query_dim, cross_attention_dim, heads, dim_head) and "
         "forward(hidden_states, encoder_hidden_states) -> (B, N, query_dim): queries from the image tokens "
         "hidden_states (B, N, query_dim), keys and values from the text encoder_hidden_states "
         "(B, L, cross_attention_dim). Use minildm's names, so that its weights load: to_q, to_k, to_v "
         "(nn.Linear to heads * dim_head, no bias) and to_out = nn.ModuleList([nn.Linear(inner, query_dim), "
         "nn.Dropout(0.0)]).",
    source=f"{SOURCE_LDM}: Q = W_Q φ(z_t), K = W_K τ_θ(y), V = W_V τ_θ(y), "
           "Attention(Q, K, V) = softmax(Q Kᵀ / √d) V",
    solution=CrossAttention, cases=_cross_attention_cases, reference=Attention, run=run_module,
    mistakes=(
        Mistake("that is self-attention: the keys and values must come from the text (encoder_hidden_states), "
                "only the queries from the image (hidden_states)", _SelfAttention),
        Mistake("queries and keys swapped: the image positions ask (Q = to_q(hidden_states)), the words answer "
                "(K, V from encoder_hidden_states); the output has one row per image position", _QueriesFromTheText),
        Mistake("the softmax runs over the queries: each image position's weights must sum to 1 over the words, "
                "softmax(dim=-1) on the (B, heads, N, L) scores", _SoftmaxOverTheQueries),
    ),
)


# ---- GEGLU, the feed-forward's gate -------------------------------------------------------------------------------


def geglu(x, weight, bias):
    # BEGIN SOLUTION
    h, g = (x @ weight.T + bias).chunk(2, dim=-1)  # (B, N, 2 * dim_out) -> 2 x (B, N, dim_out)
    return h * F.gelu(g)  # h · GELU(g): the exact GELU, g Φ(g), gates h
    # END SOLUTION


def _geglu_cases(seed):
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, 2, 3, 5)  # B 2, N 3, dim_in 5; dim_out 4
    return [{"x": x, "weight": _randn(g, 8, 5) / 5**0.5, "bias": 0.5 * _randn(g, 8)},
            {"x": _randn(g, 3, 4, 6), "weight": _randn(g, 14, 6) / 6**0.5, "bias": 0.5 * _randn(g, 14)}]


def _minildm_geglu(x, weight, bias):
    module = _minildm_module(GEGLU, {"proj.weight": weight, "proj.bias": bias}, x.dtype, weight.shape[1],
                             weight.shape[0] // 2)
    with torch.no_grad():
        return module(x)


def _geglu_mistake(gate):
    def wrong(x, weight, bias):
        h, g = (x @ weight.T + bias).chunk(2, dim=-1)
        return gate(h, g)
    return wrong


GEGLU_EXERCISE = Exercise(
    name="geglu", notebook="03_attention",
    task="geglu(x, weight, bias) -> (B, N, dim_out): project x (B, N, dim_in) with an nn.Linear's weight "
         "(2 * dim_out, dim_in) and bias (2 * dim_out,), split the result into halves h, g along the last axis "
         "(h first), and return h · GELU(g).",
    source="Shazeer 2020 (arXiv:2002.05202), section 2: GEGLU(x) = GELU(x W + b) ⊗ (x V + c); Stable Diffusion "
           "(and minildm's GEGLU) compute both from one projection, the GELU on its second half",
    solution=geglu, cases=_geglu_cases, reference=_minildm_geglu,
    mistakes=(
        Mistake("GELU on the wrong half: the first half h is the value, the second half g the gate: h · GELU(g)",
                _geglu_mistake(lambda h, g: F.gelu(h) * g)),
        Mistake("that is SiLU (SwiGLU's gate): GEGLU gates with the GELU, F.gelu(g)",
                _geglu_mistake(lambda h, g: h * F.silu(g))),
        Mistake("that is a sigmoid (the original GLU's gate): GEGLU gates with the GELU, F.gelu(g)",
                _geglu_mistake(lambda h, g: h * torch.sigmoid(g))),
        Mistake("no gate: GELU(h) alone is a plain feed-forward; multiply the value half h by GELU of the gate "
                "half g", _geglu_mistake(lambda h, g: F.gelu(h))),
        Mistake("that is GELU's tanh approximation: Stable Diffusion uses the exact GELU, g Φ(g) (F.gelu(g) "
                "without approximate='tanh')", _geglu_mistake(lambda h, g: h * F.gelu(g, approximate="tanh"))),
    ),
)


EXERCISES = [ATTENTION, MULTI_HEAD_ATTENTION, CROSS_ATTENTION, GEGLU_EXERCISE]
