"""Rope scaling types against transformers' own ``ROPE_INIT_FUNCTIONS``: the inverse frequencies and
the attention factor, bit for bit, read from a config.json the way the loader reads it (both the
``rope_parameters`` and the older ``rope_scaling`` layouts). The end-to-end greedy checks against
transformers are in test_models_hf_parity (Llama, Qwen2) and test_models_phi3.
"""

from __future__ import annotations

import pytest
import torch
from pagedserve.models.hf_config import RopeConfig
from pagedserve.models.layers.rotary import SUPPORTED_ROPE_TYPES, RotaryEmbedding, inverse_frequencies

HEAD_DIM = 32
LONGROPE = {
    "rope_type": "longrope",
    "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
    "long_factor": [1.5 + 0.7 * i for i in range(HEAD_DIM // 2)],
}
CASES = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn-betas-untruncated": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    "yarn-mscale": {
        "rope_type": "yarn",
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
    },
    "yarn-attention-factor": {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 64,
        "attention_factor": 0.8,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "longrope": {**LONGROPE, "original_max_position_embeddings": 64},
    "longrope-partial": {**LONGROPE, "original_max_position_embeddings": 64, "partial_rotary_factor": 0.5},
}


def _hf_config(rope: dict, layout: str, max_pos: int = 256):
    import transformers

    rope = dict(rope)
    partial = rope.pop("partial_rotary_factor", 1.0)
    if partial != 1.0:  # longrope's factors cover the rotated dimensions only
        rope["short_factor"], rope["long_factor"] = rope["short_factor"][:8], rope["long_factor"][:8]
    common = dict(
        hidden_size=4 * HEAD_DIM,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=max_pos,
        partial_rotary_factor=partial,
    )
    if layout == "rope_parameters":
        return transformers.LlamaConfig(rope_parameters={"rope_theta": 5000.0, **rope}, **common)
    old = {("type" if k == "rope_type" else k): v for k, v in rope.items()}
    return transformers.LlamaConfig(rope_theta=5000.0, rope_scaling=old, **common)


def _ours(hf_config) -> RopeConfig:
    return RopeConfig.from_hf(hf_config.to_dict())


@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
@pytest.mark.parametrize("name", list(CASES))
def test_inverse_frequencies_match_transformers(name, layout):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = _hf_config(CASES[name], layout)
    rope = _ours(config)
    assert rope.type == CASES[name]["rope_type"] and rope.theta == 5000.0
    dim = int(HEAD_DIM * rope.partial_rotary_factor)
    # dynamic and longrope depend on the length: within, at and past the (original) window. (Without
    # a length transformers' longrope takes the short factors, ours the engine context's.)
    for seq_len in (64, 65, 256, 1000) if rope.type == "longrope" else (None, 64, 65, 256, 1000):
        want, want_factor = ROPE_INIT_FUNCTIONS[rope.type](config, "cpu", seq_len=seq_len)
        got, got_factor = inverse_frequencies(rope, dim, seq_len)
        assert got.dtype == torch.float32 and torch.equal(got, want), (seq_len, got, want)
        assert got_factor == pytest.approx(want_factor, rel=1e-15)


def test_the_rope_scaling_layout_reads_like_rope_parameters():
    for rope in CASES.values():
        new, old = _ours(_hf_config(rope, "rope_parameters")), _ours(_hf_config(rope, "rope_scaling"))
        assert new == old


def test_phi3_old_names_mean_longrope():
    common = {"short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "rope_theta": 10000.0}
    for old_name in ("su", "yarn"):
        hf = {"model_type": "phi3", "rope_scaling": {"type": old_name, **common}}
        assert RopeConfig.from_hf(hf).type == "longrope"
    assert RopeConfig.from_hf({"rope_scaling": {"type": "yarn", "factor": 2.0}}).type == "yarn"


def test_phi3_top_level_original_length_wins():
    hf = {
        "max_position_embeddings": 4096,
        "original_max_position_embeddings": 512,
        "rope_scaling": {"type": "longrope", "original_max_position_embeddings": 9999},
    }
    assert RopeConfig.from_hf(hf).original_max_position_embeddings == 512


def test_dynamic_is_the_identity_within_the_window_and_fixed_beyond():
    rope = RopeConfig(type="dynamic", factor=2.0, max_position_embeddings=128)
    plain = RotaryEmbedding(HEAD_DIM, 128, RopeConfig(max_position_embeddings=128))
    assert torch.equal(RotaryEmbedding(HEAD_DIM, 128, rope).cos_cache, plain.cos_cache)
    # a cache longer than the window gets one NTK base, for its whole length
    longer = RotaryEmbedding(HEAD_DIM, 512, rope)
    want, _ = inverse_frequencies(rope, HEAD_DIM, 512)
    torch.testing.assert_close(longer.cos_cache[7], (7 * want).cos())


def test_longrope_factor_set_follows_the_engine_context():
    rope = RopeConfig(
        type="longrope",
        factor=None,  # from the lengths: 256 / 64
        short_factor=(1.0,) * 8,
        long_factor=(4.0,) * 8,
        original_max_position_embeddings=64,
        max_position_embeddings=256,
    )
    short = RotaryEmbedding(16, 256, RopeConfig(**{**rope.__dict__, "context_len": 64}))
    long = RotaryEmbedding(16, 256, rope)  # context_len None: max_position_embeddings (256) > 64
    scale = (1 + torch.log(torch.tensor(4.0)) / torch.log(torch.tensor(64.0))).sqrt().item()
    torch.testing.assert_close(short.cos_cache[0], torch.full((8,), scale))  # attention factor, both
    torch.testing.assert_close(long.cos_cache[0], torch.full((8,), scale))
    inv_short, inv_long = (inverse_frequencies(rope, 16, n)[0] for n in (64, 65))
    torch.testing.assert_close(short.sin_cache[100], (100 * inv_short).sin() * scale)
    torch.testing.assert_close(long.sin_cache[3], (3 * inv_long).sin() * scale)


def test_partial_rotary_leaves_the_other_dimensions_alone():
    rope = RopeConfig(partial_rotary_factor=0.25)
    rotary = RotaryEmbedding(HEAD_DIM, 64, rope)
    q, k = torch.randn(5, 3, HEAD_DIM), torch.randn(5, 1, HEAD_DIM)
    positions = torch.tensor([0, 1, 7, 30, 63])
    q2, k2 = rotary(positions, q.clone(), k.clone())
    assert torch.equal(q2[..., 8:], q[..., 8:]) and torch.equal(k2[..., 8:], k[..., 8:])
    full = RotaryEmbedding(8, 64, RopeConfig())  # the rotated part is a plain rope of 8 dimensions
    want_q, want_k = full(positions, q[..., :8].clone(), k[..., :8].clone())
    assert torch.equal(q2[..., :8], want_q) and torch.equal(k2[..., :8], want_k)


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        (RopeConfig(type="ntk-by-parts"), r"'ntk-by-parts' is not supported; supported: \['default'"),
        (RopeConfig(type="yarn", factor=2.0), "needs original_max_position_embeddings"),
        (
            RopeConfig(
                type="longrope",
                short_factor=(1.0,) * 3,
                long_factor=(1.0,) * 8,
                original_max_position_embeddings=32,
            ),
            "short_factor and long_factor of 8 values",
        ),
        (RopeConfig(partial_rotary_factor=0.35), "odd rotary size"),
    ],
)
def test_bad_rope_configs_fail_when_the_model_is_built(rope, message):
    with pytest.raises(ValueError, match=message):
        RotaryEmbedding(16, 64, rope)


def test_supported_types_are_transformers_names():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(SUPPORTED_ROPE_TYPES) - {"default"} <= set(ROPE_INIT_FUNCTIONS)


_FUSED_PARTIAL = """
import torch
from pagedserve.models.hf_config import RopeConfig
from pagedserve.models.layers import fused
from pagedserve.models.layers.rotary import RotaryEmbedding
device = "cuda" if torch.cuda.is_available() else "cpu"
rope = RopeConfig(type="yarn", factor=4.0, original_max_position_embeddings=32, partial_rotary_factor=0.5)
rotary = RotaryEmbedding(32, 128, rope).to(device)
g = torch.Generator().manual_seed(0)
q, k = torch.randn(6, 4, 32, generator=g).to(device), torch.randn(6, 2, 32, generator=g).to(device)
positions = torch.tensor([0, 3, 31, 32, 90, 127], device=device)
assert fused.enabled(q)
got_q, got_k = rotary(positions, q.clone(), k.clone())
fused._disabled_by_env = lambda: True
want_q, want_k = rotary(positions, q.clone(), k.clone())
torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
assert torch.equal(got_q[..., 16:], q[..., 16:])
print("ok")
"""


def _run_fused_partial(env: dict[str, str]) -> None:
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _FUSED_PARTIAL],
        env=os.environ | env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.slow  # the Triton interpreter
def test_fused_rotary_kernel_rotates_the_partial_dimensions_in_the_interpreter():
    pytest.importorskip("triton")
    _run_fused_partial({"TRITON_INTERPRET": "1"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_rotary_kernel_rotates_the_partial_dimensions_on_gpu():
    _run_fused_partial({})
