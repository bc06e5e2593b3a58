import itertools
import math

import pytest
import torch
from conftest import random_conditioning, tiny_model_config

from mmdit_core.config import ConfigError, FlowConfig, load_config
from mmdit_core.flow import RectifiedFlow
from mmdit_core.model import MMDiT, Positions, attention, timestep_embedding


def reference_attention(q, k, v, key_mask=None):
    """softmax(Q Kᵀ / √d) V with einsum, on (B, S, H, D) inputs -> (B, Sq, H·D)."""
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
    return out.flatten(2)


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Move every weight off its (partly zero) initialisation so each path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def test_heads_first_matches_einsum_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 7, 4, 8, generator=g) for _ in range(3))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[1, 4:] = False
    for key_mask in (None, mask):
        torch.testing.assert_close(
            attention(q, k, v, "heads_first", key_mask), reference_attention(q, k, v, key_mask), atol=1e-5, rtol=1e-5
        )


def test_seq_first_reproduces_the_head_axis_bug():
    """The bug's signature: an image token's output depends on no other token (image or text)."""
    outputs = {}
    for layout in ("heads_first", "seq_first"):
        torch.manual_seed(0)
        model = randomise(MMDiT(tiny_model_config(sdpa_layout=layout)))
        x = torch.randn(1, 4, 8, 8)
        cond = random_conditioning(1)
        base = model(x, torch.tensor([0.5]), cond.text, cond.mask, cond.pooled)
        x_other = x.clone()
        x_other[..., 6:, 6:] += 1.0  # perturb only the bottom-right patch
        text_other = cond.text + 1.0  # perturb every text token, pooled vector held fixed
        outputs[layout] = (
            (model(x_other, torch.tensor([0.5]), cond.text, cond.mask, cond.pooled) - base)[..., :6, :6].abs().max(),
            (model(x, torch.tensor([0.5]), text_other, cond.mask, cond.pooled) - base).abs().max(),
        )
    image_dep, text_dep = outputs["seq_first"]
    assert image_dep == 0 and text_dep == 0
    image_dep, text_dep = outputs["heads_first"]
    assert image_dep > 1e-3 and text_dep > 1e-3


def test_adaln_zero_blocks_start_as_identity_and_output_is_zero():
    model = MMDiT(tiny_model_config(depth=3))
    torch.manual_seed(1)
    img, ctx, c = torch.randn(2, 16, 32), torch.randn(2, 5, 32), torch.randn(2, 32)
    mask = torch.ones(2, 5, dtype=torch.bool)
    for block in model.blocks:
        out_img, out_ctx = block(img, ctx, c, mask, model.positions.rotary(4, 5, torch.zeros(2)))
        assert torch.equal(out_img, img) and torch.equal(out_ctx, ctx)
    cond = random_conditioning(2)
    assert torch.count_nonzero(model(torch.randn(2, 4, 8, 8), torch.rand(2), cond.text, cond.mask, cond.pooled)) == 0


# Refused by the config (test_config): cross + seq_first (unequal sequences cannot share the bug's view) and
# msrope without joint attention.
SWITCHES = [
    combo
    for combo in itertools.product(
        ["heads_first", "seq_first"],
        ["learned", "sincos", "rope2d", "msrope", "none"],
        ["adaln_zero", "additive"],
        ["joint", "cross", "adaln_only"],
        ["none", "layernorm", "rmsnorm"],
    )
    if not (combo[3] == "cross" and combo[0] == "seq_first") and not (combo[1] == "msrope" and combo[3] != "joint")
]


@pytest.mark.parametrize("layout,pos_emb,time_cond,block,qk_norm", SWITCHES)
def test_every_switch_combination_runs_forward_and_backward(layout, pos_emb, time_cond, block, qk_norm):
    for size in (8, 16):
        cfg = tiny_model_config(
            input_size=size,
            sdpa_layout=layout,
            pos_emb=pos_emb,
            time_cond=time_cond,
            block=block,
            qk_norm=qk_norm,
            width=32,
            num_heads=2,
        )
        model = randomise(MMDiT(cfg), std=0.05).train()
        cond = random_conditioning(2, valid=3)
        x = torch.randn(2, 4, size, size)
        out = model(x, torch.rand(2), cond.text, cond.mask)
        assert out.shape == x.shape
        out.square().mean().backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("block", ["joint", "cross"])
def test_text_padding_is_masked(block):
    model = randomise(MMDiT(tiny_model_config(block=block)))
    text = random_conditioning(2).text  # (2, 5, 16)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, True]])  # valid lengths 3 and 5
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    padded = text.clone()
    padded[0, 3:] = 100.0  # garbage in row 0's padding, which row 1's length keeps in the attended sequence
    pooled = torch.randn(2, 16)  # given, so that only attention can see the padding
    base = model(x, t, text, mask, pooled)
    torch.testing.assert_close(model(x, t, padded, mask, pooled), base)
    unmasked = model(x, t, padded, torch.ones_like(mask), pooled)
    # the same tokens unmasked do change row 0: the mask is what holds
    assert (unmasked[0] - base[0]).abs().max() > 1e-3


def test_text_padding_attended_is_the_silent_bug_of_unmasked_padding_keys():
    correct = randomise(MMDiT(tiny_model_config()))
    buggy = MMDiT(tiny_model_config(text_padding="attended"))
    buggy.load_state_dict(correct.state_dict())
    cond = random_conditioning(2, length=6, valid=3)
    cond.text[:, 3:] = 0.0  # padding as the text encoder returns it: zero states
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    base = correct(x, t, cond.text, cond.mask, cond.pooled)
    attended = buggy(x, t, cond.text, cond.mask, cond.pooled)
    torch.testing.assert_close(attended, correct(x, t, cond.text, torch.ones_like(cond.mask), cond.pooled))
    assert (attended - base).abs().max() > 1e-3  # zero states still make keys (the projections' biases)


def test_timestep_input_t_is_the_silent_bug_of_a_thousand_times_slower_sinusoids():
    t = torch.rand(5)
    torch.testing.assert_close(timestep_embedding(t, scale=1.0), timestep_embedding(t / 1000))
    correct = randomise(MMDiT(tiny_model_config()))
    buggy = MMDiT(tiny_model_config(timestep_input="t"))
    buggy.load_state_dict(correct.state_dict())
    cond, x = random_conditioning(5), torch.randn(5, 4, 8, 8)
    base = correct(x, t, cond.text, cond.mask, cond.pooled)
    torch.testing.assert_close(
        buggy(x, t, cond.text, cond.mask, cond.pooled), correct(x, t / 1000, cond.text, cond.mask, cond.pooled)
    )
    assert (buggy(x, t, cond.text, cond.mask, cond.pooled) - base).abs().max() > 1e-3


@pytest.mark.parametrize("block", ["joint", "cross", "adaln_only"])
def test_activation_checkpointing_gives_the_same_output_and_gradients(block):
    outputs, grads = [], []
    for checkpointing in ("none", "blocks"):
        torch.manual_seed(0)
        model = randomise(MMDiT(tiny_model_config(block=block, activation_checkpointing=checkpointing))).train()
        cond = random_conditioning(2, valid=3)
        out = model(torch.ones(2, 4, 8, 8), torch.tensor([0.2, 0.7]), cond.text, cond.mask)
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append([p.grad for p in model.parameters()])
    torch.testing.assert_close(outputs[0], outputs[1])
    for off, blocks in zip(*grads):
        torch.testing.assert_close(off, blocks)


def test_positional_embeddings_tell_patches_apart():
    """With no position signal a model is equivariant to permuting patches; with any kind it is not."""
    for pos_emb in ("learned", "sincos", "rope2d", "msrope", "none"):
        model = randomise(MMDiT(tiny_model_config(pos_emb=pos_emb, patch_size=4)))
        cond = random_conditioning(1)
        x, t = torch.randn(1, 4, 8, 8), torch.tensor([0.3])
        swapped = torch.cat([x[..., 4:], x[..., :4]], dim=-1)  # swap the left and right patches
        out, out_swapped = model(x, t, cond.text, cond.mask), model(swapped, t, cond.text, cond.mask)
        equivariant = torch.allclose(torch.cat([out[..., 4:], out[..., :4]], dim=-1), out_swapped, atol=1e-5)
        assert equivariant == (pos_emb == "none"), pos_emb


def test_tiny_model_overfits_eight_fixed_latents():
    torch.manual_seed(0)
    model = MMDiT(tiny_model_config(width=64, num_heads=4))
    flow = RectifiedFlow(FlowConfig(prediction="velocity"))
    x0, noise = torch.randn(8, 4, 8, 8), torch.randn(8, 4, 8, 8)
    t = torch.linspace(0.1, 0.9, 8)
    cond = random_conditioning(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(300):
        loss = flow.per_sample_loss(model, x0, noise, t, cond).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_a_model_config_of_any_text_width_runs_without_naming_the_pooled_width():
    model = MMDiT(tiny_model_config(text_dim=32))  # the pooled vector is the masked mean of text: its width is text_dim
    out = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 5, 32))
    assert out.shape == (2, 4, 8, 8)


# ---- positions: MSRoPE and other grids ------------------------------------------------------------


def test_msrope_places_text_tokens_on_the_diagonal_as_1d_rope():
    positions = Positions(tiny_model_config(pos_emb="msrope", width=64, num_heads=2))  # head dim 32
    g, L, D = 4, 6, 32
    rotary = positions.rotary(g, L, torch.zeros(1))
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, D), torch.randn(1, 1, 1, D)

    def text_logit(i: int, j: int) -> float:  # text token i's query against text token j's key
        qs, ks = q.expand(1, L, 1, D), k.expand(1, L, 1, D)
        return (rotary.text(qs)[0, i, 0] @ rotary.text(ks)[0, j, 0]).item()

    for shift in (1, 2, 3):  # the same relative position, anywhere along the text: the same logit
        assert text_logit(0, 2) == pytest.approx(text_logit(shift, 2 + shift), rel=1e-5)
    assert text_logit(0, 2) != pytest.approx(text_logit(0, 3), rel=1e-3)
    # a text token's logits to image tokens follow the image tokens' places: the same key at every
    # place gives a different logit at each
    keys = rotary.image(k.expand(1, g * g, 1, D))[0, :, 0]  # (N, D)
    logits = keys @ rotary.text(q.expand(1, L, 1, D))[0, 0, 0]
    assert len(set(logits.round(decimals=4).tolist())) == g * g
    x = torch.randn(2, g * g, 2, D)
    torch.testing.assert_close(rotary.image(x).norm(dim=-1), x.norm(dim=-1))  # rotations keep norms
    torch.testing.assert_close(rotary.text(x[:, :L]).norm(dim=-1), x[:, :L].norm(dim=-1))


def rotary_angles(positions: Positions, grid: int, t: float = 0.0) -> torch.Tensor:
    """The image tokens' rotation angles, (N, D/2), read back from their cos and sin."""
    cos, sin = positions.rotary(grid, 3, torch.full((1,), t)).image_angles
    return torch.atan2(sin, cos)[:, 0]


@pytest.mark.parametrize("kind", ["rope2d", "msrope"])
def test_rope_scaling_on_a_larger_grid(kind):
    positions = Positions(tiny_model_config(pos_emb=kind, width=64, num_heads=2))  # head dim 32, trained grid 4
    trained, q = rotary_angles(positions, 4), 32 // 4
    extrapolated = rotary_angles(positions, 8)
    for scaling in ("none", "interpolate", "ntk", "time_aware"):  # the trained grid is never rescaled
        positions.scaling = scaling
        torch.testing.assert_close(rotary_angles(positions, 4), trained)
    positions.scaling = "interpolate"  # every position shrunk by 4/8 into the trained range
    interpolated = rotary_angles(positions, 8)
    if kind == "rope2d":  # token (2r, 2c) of the 8 × 8 grid turns as token (r, c) of the trained 4 × 4
        torch.testing.assert_close(interpolated.unflatten(0, (8, 8))[::2, ::2].flatten(0, 1), trained)
    assert interpolated[:, q - 1].abs().max() < extrapolated[:, q - 1].abs().max()  # the slowest never wraps
    positions.scaling = "ntk"  # the fastest frequency kept, the slowest interpolated
    ntk = rotary_angles(positions, 8)
    torch.testing.assert_close(ntk[:, 0], extrapolated[:, 0])
    torch.testing.assert_close(ntk[:, q - 1], interpolated[:, q - 1], rtol=1e-4, atol=1e-5)
    positions.scaling = "time_aware"  # Lumina-Next: interpolated at high noise, NTK nearer the data
    torch.testing.assert_close(rotary_angles(positions, 8, t=0.9), interpolated)
    torch.testing.assert_close(rotary_angles(positions, 8, t=0.1), ntk)


def test_centred_rope_origin_puts_index_zero_at_the_centre():
    centred = Positions(tiny_model_config(width=64, num_heads=2, rope_origin="centre"))
    angles = rotary_angles(centred, 4).unflatten(0, (4, 4))  # rows and columns -2..1
    assert torch.count_nonzero(angles[2, 2]) == 0 and torch.count_nonzero(angles[0, 0]) > 0
    corner = rotary_angles(Positions(tiny_model_config(width=64, num_heads=2)), 4).unflatten(0, (4, 4))
    assert torch.count_nonzero(corner[0, 0]) == 0


def test_rope_scaling_needs_another_side_and_rotary_positions():
    with pytest.raises(ConfigError, match="rope_scaling=ntk acts only on another grid"):
        load_config(None, ["sample.rope_scaling=ntk"])
    cfg = load_config(None, ["sample.rope_scaling=ntk", "eval.image_size=48"])
    assert cfg.transfer == "48px-rope_ntk" and load_config(None, ["eval.image_size=48"]).transfer == "48px"
    with pytest.raises(ConfigError, match="model.pos_emb=learned has none"):
        load_config(None, ["sample.rope_scaling=ntk", "eval.image_size=48", "model.pos_emb=learned"])


def test_msrope_needs_joint_attention():
    with pytest.raises(ValueError, match="msrope places image and text tokens in one frame"):
        tiny_model_config(pos_emb="msrope", block="cross")


@pytest.mark.parametrize("pos_emb", ["learned", "sincos", "rope2d", "msrope", "none"])
def test_a_model_samples_at_another_resolution_than_it_was_trained_at(pos_emb):
    model = randomise(MMDiT(tiny_model_config(pos_emb=pos_emb)))  # trained grid 4 × 4 (8 × 8, patch 2)
    cond = random_conditioning(2)
    out = model(torch.randn(2, 4, 12, 12), torch.rand(2), cond.text, cond.mask)  # a 6 × 6 grid
    assert out.shape == (2, 4, 12, 12) and torch.isfinite(out).all()


def test_an_msrope_model_round_trips_through_a_checkpoint(tmp_path):
    from mmdit_core.checkpoint import load_checkpoint, save_checkpoint
    from mmdit_core.config import build_config

    cfg = build_config(
        {
            "model": {"width": 32, "depth": 2, "num_heads": 2, "pos_emb": "msrope"},
            "data": {"image_size": 8},
            "text": {"dim": 16},
        }
    )
    model = randomise(MMDiT(cfg.model))
    save_checkpoint(tmp_path / "c", model=model, config=cfg, step=3)
    loaded = MMDiT(cfg.model)
    info = load_checkpoint(tmp_path / "c", model=loaded)
    cond = random_conditioning(2)
    x, t = torch.randn(2, 3, 8, 8), torch.rand(2)
    assert info.config.model.pos_emb == "msrope"
    torch.testing.assert_close(loaded(x, t, cond.text, cond.mask), model(x, t, cond.text, cond.mask))
