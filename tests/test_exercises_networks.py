"""The exercises of notebooks 03 (attention) and 04 (the UNet), beyond the generic checks of test_exercises.py:
other correct answers pass (a loop over heads, einsum, float64, another order of float32 operations), the
cases reach the edges (t = 0 and 999, an odd width, sizes that all differ, two seeds), a check leaves the
notebook's random state alone, and the student versions of the module exercises say which exercise to do."""

import inspect
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minildm import exercises
from minildm.attention import Attention, FeedForward
from minildm.exercises.attention import CrossAttention
from minildm.exercises.student import strip_solutions, student_notebook
from minildm.exercises.unet import BasicTransformerBlock, ResnetBlock2D
from minildm.unet import timestep_embedding

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"
FUNCTIONS = ["attention", "multi_head_attention", "geglu", "timestep_embedding"]
MODULES = ["CrossAttention", "ResnetBlock2D", "BasicTransformerBlock"]


def _passes(name, fn, capsys):
    passed = exercises.check(name, fn)
    out = capsys.readouterr().out
    assert passed, out
    return out


# ---- other correct answers pass ---------------------------------------------------------------------------------


def _einsum_attention(q, k, v):
    weights = torch.einsum("bnd,bld->bnl", q, k) / math.sqrt(k.shape[-1])
    return torch.einsum("bnl,bld->bnd", F.softmax(weights, dim=2), v)


def _heads_in_a_loop(hidden_states, context, to_q, to_k, to_v, to_out_weight, to_out_bias, heads):
    q, k, v = F.linear(hidden_states, to_q), F.linear(context, to_k), F.linear(context, to_v)
    dim_head = q.shape[-1] // heads
    outputs = [_einsum_attention(q[..., h * dim_head:(h + 1) * dim_head], k[..., h * dim_head:(h + 1) * dim_head],
                                 v[..., h * dim_head:(h + 1) * dim_head]) for h in range(heads)]
    return F.linear(torch.cat(outputs, dim=-1), to_out_weight, to_out_bias)


def _geglu_with_erf(x, weight, bias):
    projected = F.linear(x, weight, bias)
    half = projected.shape[-1] // 2
    gate = projected[..., half:]
    return projected[..., :half] * 0.5 * gate * (1 + torch.erf(gate / math.sqrt(2)))  # GELU(g) = g Φ(g)


def _embedding_in_float64(timesteps, dim, max_period=10000):
    half = dim // 2
    angles = timesteps[:, None].double() * max_period ** (-torch.arange(half, dtype=torch.float64) / half)
    return F.pad(torch.cat([angles.cos(), angles.sin()], dim=-1), (0, dim % 2))


def _embedding_written_into_zeros(timesteps, dim, max_period=10000):  # float32, powers instead of exp(log)
    half = dim // 2
    angles = timesteps[:, None] * max_period ** (-torch.arange(half) / half)
    embedding = torch.zeros(len(timesteps), dim)
    embedding[:, :half], embedding[:, half:2 * half] = angles.cos(), angles.sin()
    return embedding


@pytest.mark.parametrize("name, fn", [("attention", _einsum_attention), ("multi_head_attention", _heads_in_a_loop),
                                      ("geglu", _geglu_with_erf), ("timestep_embedding", _embedding_in_float64),
                                      ("timestep_embedding", _embedding_written_into_zeros)])
def test_other_correct_functions_pass(name, fn, capsys):
    _passes(name, fn, capsys)


class _CrossAttentionHeadByHead(CrossAttention):
    def forward(self, hidden_states, encoder_hidden_states):
        q, k, v = self.to_q(hidden_states), self.to_k(encoder_hidden_states), self.to_v(encoder_hidden_states)
        dim_head = q.shape[-1] // self.heads
        outputs = []
        for head in range(self.heads):
            cols = slice(head * dim_head, (head + 1) * dim_head)
            probs = (q[..., cols] @ k[..., cols].transpose(1, 2) / dim_head**0.5).softmax(-1)
            outputs.append(probs @ v[..., cols])
        return self.to_out[0](torch.cat(outputs, dim=-1))


class _ResnetBlockOtherwise(ResnetBlock2D):
    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(temb * torch.sigmoid(temb)).unsqueeze(-1).unsqueeze(-1)
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class _TransformerBlockStepByStep(BasicTransformerBlock):
    def forward(self, x, encoder_hidden_states):
        h = self.attn1(self.norm1(x))
        x = h + x
        h = self.attn2(self.norm2(x), encoder_hidden_states=encoder_hidden_states)
        x = h + x
        return self.ff(self.norm3(x)) + x


@pytest.mark.parametrize("name, cls", [("CrossAttention", _CrossAttentionHeadByHead),
                                       ("ResnetBlock2D", _ResnetBlockOtherwise),
                                       ("BasicTransformerBlock", _TransformerBlockStepByStep)])
def test_other_correct_modules_pass(name, cls, capsys):
    _passes(name, cls, capsys)


def test_a_module_with_other_parameter_names_is_told_which(capsys):
    class PlainOutput(nn.Module):
        def __init__(self, query_dim, cross_attention_dim, heads, dim_head):
            super().__init__()
            self.to_q = nn.Linear(query_dim, heads * dim_head, bias=False)
            self.to_k = nn.Linear(cross_attention_dim, heads * dim_head, bias=False)
            self.to_v = nn.Linear(cross_attention_dim, heads * dim_head, bias=False)
            self.to_out = nn.Linear(heads * dim_head, query_dim)  # minildm's is a ModuleList: to_out.0

        def forward(self, hidden_states, encoder_hidden_states):
            return hidden_states

    assert not exercises.check("CrossAttention", PlainOutput)
    out = capsys.readouterr().out
    assert "missing to_out.0.bias, to_out.0.weight" in out and "to_out.bias, to_out.weight" in out


# ---- the cases ------------------------------------------------------------------------------------------------


def test_the_timestep_solution_is_minildms_bit_for_bit():
    # Equal to the last bit, so that a wrong answer off by a constant factor is reported as one.
    timesteps = torch.arange(1000)
    for dim in (6, 9, 64, 320):
        for max_period in (100, 10000):
            assert torch.equal(exercises.solution("timestep_embedding")(timesteps, dim, max_period),
                               timestep_embedding(timesteps, dim, max_period))


def test_the_timestep_cases_reach_0_and_999_and_an_odd_width():
    exercise = exercises.EXERCISES["timestep_embedding"]
    for seed in (0, 1):
        cases = exercise.cases(seed)
        assert all({0, 999} <= set(case["timesteps"].tolist()) for case in cases)
        assert any(case["dim"] % 2 for case in cases) and any(case.get("max_period", 10000) != 10000 for case in cases)
    assert not torch.equal(exercise.cases(0)[0]["timesteps"], exercise.cases(1)[0]["timesteps"])


def _dimensions(name, case):
    """The sizes a wrong axis could confuse, in one case of exercise `name`."""
    if name == "attention":
        (B, N, d), (_, L, _), d_v = case["q"].shape, case["k"].shape, case["v"].shape[-1]
        return [B, N, L, d, d_v]
    if name == "multi_head_attention":
        (B, N, query_dim), (_, L, context_dim) = case["hidden_states"].shape, case["context"].shape
        inner, heads = case["to_q"].shape[0], case["heads"]
        return [B, N, L, query_dim, context_dim, heads, inner // heads, inner]
    if name == "geglu":
        return [*case["x"].shape, case["weight"].shape[0] // 2]
    if name == "timestep_embedding":
        return [len(case["timesteps"]), case["dim"]]
    init, inputs = case["init"], list(case["inputs"].values())
    if name == "ResnetBlock2D":
        (B, C_in, H, W), temb = inputs[0].shape, inputs[1].shape[-1]
        return [B, C_in, init["out_channels"], H, W, temb]
    (B, N, width), (_, L, context_width) = inputs[0].shape, inputs[1].shape
    return [B, N, L, width, context_width, init["heads"], init["dim_head"], init["heads"] * init["dim_head"]]


@pytest.mark.parametrize("name", FUNCTIONS + MODULES)
def test_cases_change_with_the_seed_and_a_case_has_all_sizes_different(name):
    exercise = exercises.EXERCISES[name]
    first, second = exercise.cases(0), exercise.cases(1)
    tensors = [[v for v in (case.get("inputs") or case).values() if torch.is_tensor(v)]
               for case in (first[0], second[0])]
    assert any(not torch.equal(a, b) for a, b in zip(*tensors)), "the seed should change the inputs"
    assert any(len(set(_dimensions(name, case))) == len(_dimensions(name, case)) for case in first), \
        [_dimensions(name, case) for case in first]


@pytest.mark.parametrize("name", FUNCTIONS + MODULES)
def test_cases_leave_the_global_random_state_alone(name):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    exercises.EXERCISES[name].cases(0)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_a_function_check_leaves_the_global_random_state_alone(name, capsys):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _passes(name, exercises.solution(name), capsys)
    assert torch.equal(torch.get_rng_state(), before)


# ---- the student versions ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODULES)
def test_a_module_exercise_left_as_its_stub_is_not_done_yet(name, capsys):
    source = strip_solutions(inspect.getsource(exercises.solution(name)))
    assert source.count(f'raise NotImplementedError("exercise {name}: your code here")') >= 1
    assert "exercise __init__" not in source and "exercise forward" not in source
    namespace = {"torch": torch, "nn": nn, "F": F, "Attention": Attention, "FeedForward": FeedForward}
    exec(source, namespace)
    assert not exercises.check(name, namespace[name])
    assert f"… {name}: not done yet" in capsys.readouterr().out


@pytest.mark.parametrize("notebook", ["03_attention", "04_unet"])
def test_the_student_notebooks_hold_every_exercise_as_a_stub(notebook):
    student = json.dumps(student_notebook(json.loads((NOTEBOOKS / f"{notebook}.ipynb").read_text())))
    for name in exercises.names(notebook):
        assert f"exercise {name}: your code here" in student, name
        assert f'{name} = exercises.use(\\"{name}\\", {name})' in student, name
