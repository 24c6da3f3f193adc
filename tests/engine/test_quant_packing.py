"""The Hub's AWQ and GPTQ layouts: known-answer bit packing, conversion to the engine's int4 layers
against the formats' dequantization formulas written out here, save -> load round trips, and
quantized HF folders loading with LLM.from_pretrained against transformers running the float
weights the codes stand for."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from engine import LLM, EngineConfig
from engine.quant.checkpoint import (FusedParts, HubQuantConfig, awq_to_int4, gptq_to_int4, int4_to_awq,
                                     int4_to_gptq, save_quantized)
from engine.quant.gptq import gptq_linear
from engine.quant.int4 import Int4Linear, quantize_int4
from engine.quant.packing import AWQ_ORDER, pack_awq, pack_last, pack_rows, unpack_awq, unpack_last, unpack_rows


def i32(x: int) -> int:
    """The int32 whose bits are the unsigned 32-bit x."""
    return x - 2**32 if x >= 2**31 else x


# --- known answers ------------------------------------------------------------------------------

def test_sequential_packing_known_answer():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15, 0, 0, 0, 0, 0, 0, 9]])
    words = pack_last(codes)
    assert words.dtype == torch.int32
    assert words.tolist() == [[i32(0x87654321), i32(0x9000000F)]]
    assert unpack_last(words).tolist() == codes.tolist()


def test_awq_packing_known_answer():
    # Nibble i holds code AWQ_ORDER[i] = 0, 2, 4, 6, 1, 3, 5, 7: codes 1..8 -> nibbles (low first) 1,3,5,7,2,4,6,8.
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [15, 0, 0, 0, 0, 0, 0, 0], [0, 15, 0, 0, 0, 0, 0, 0]])
    words = pack_awq(codes)
    assert words[:, 0].tolist() == [i32(0x86427531), 0xF, 0xF0000]
    assert torch.equal(unpack_awq(words), codes.to(torch.uint8))


def test_gptq_qweight_packs_along_the_input_dimension():
    codes = torch.arange(16).view(16, 1).repeat(1, 3) % 16  # [in=16, out=3]
    codes[:, 2] = 15 - codes[:, 2]
    words = pack_rows(codes)
    assert words.shape == (2, 3)
    assert words[:, 0].tolist() == [i32(0x76543210), i32(0xFEDCBA98)]
    assert words[:, 2].tolist() == [i32(0x89ABCDEF), i32(0x01234567)]
    assert torch.equal(unpack_rows(words), codes.to(torch.uint8))


def awq_pack_loop(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing loop, word by word: qweight[:, col] |= intweight[:, col*8 + order[i]] << 4i."""
    rows, cols = intweight.shape
    out = torch.zeros((rows, cols // 8), dtype=torch.int64)
    for col in range(cols // 8):
        for i in range(8):
            out[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]].long() << (4 * i)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def gptq_pack_loop(intweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's qweight loop: row r of the packed tensor holds input features 8r..8r+7, 4 bits apart."""
    k, n = intweight.shape
    out = torch.zeros((k // 8, n), dtype=torch.int64)
    for r in range(k // 8):
        for j in range(8):
            out[r] |= intweight[8 * r + j].long() << (4 * j)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def test_vectorised_packing_matches_the_published_loops():
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (24, 40), generator=gen)
    assert torch.equal(pack_awq(codes), awq_pack_loop(codes))
    assert torch.equal(pack_rows(codes), gptq_pack_loop(codes))


def test_packing_rejects_codes_out_of_range_and_ragged_dims():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_last(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_last(torch.zeros((2, 12), dtype=torch.int64))


# --- one layer: Hub tensors -> Int4Linear -------------------------------------------------------

def random_awq(k: int, n: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    zeros = torch.randint(0, 16, (k // group, n), generator=gen)
    scales = (torch.rand((k // group, n), generator=gen) * 0.02 + 0.001).half()
    return codes, zeros, scales


def awq_dequant_formula(codes, zeros, scales, group):
    """w[out, in] = (code[in, out] - zero[in // G, out]) * scale[in // G, out], transposed."""
    g = torch.arange(codes.shape[0]) // group
    return ((codes.float() - zeros[g].float()) * scales[g].float()).t()


def test_awq_tensors_become_the_int4_layer_they_describe():
    codes, zeros, scales = random_awq(64, 24, 16)
    layer = awq_to_int4(awq_pack_loop(codes), awq_pack_loop(zeros), scales)
    assert (layer.in_features, layer.out_features, layer.group_size) == (64, 24, 16)
    assert torch.equal(layer.dequantized_weight(), awq_dequant_formula(codes, zeros, scales, 16))
    back = int4_to_awq(layer)
    assert torch.equal(back["qweight"], awq_pack_loop(codes)) and torch.equal(back["qzeros"], awq_pack_loop(zeros))
    assert torch.equal(back["scales"], scales)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_tensors_become_the_int4_layer_they_describe(act_order):
    k, n, group = 64, 16, 16
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (k, n), generator=gen)
    stored_zeros = torch.randint(0, 16, (k // group, n), generator=gen)  # v1: zero - 1
    scales = (torch.rand((k // group, n), generator=gen) * 0.02 + 0.001).half()
    g_idx = torch.arange(k) // group
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    qzeros = pack_last(stored_zeros)
    layer = gptq_to_int4(gptq_pack_loop(codes), qzeros, scales, g_idx.int(), group)
    assert (layer.perm is not None) == act_order
    # AutoGPTQ v1: w[in, out] = scale[g_idx[in], out] * (code[in, out] - (stored_zero[g_idx[in], out] + 1)).
    ref = (scales[g_idx].float() * (codes.float() - (stored_zeros[g_idx].float() + 1))).t()
    assert torch.equal(layer.dequantized_weight(), ref)
    x = torch.randn(3, k)
    assert torch.allclose(layer(x), x @ ref.t(), atol=1e-5, rtol=1e-5)  # the permutation is applied to x
    back = int4_to_gptq(layer)
    assert torch.equal(back["qweight"], gptq_pack_loop(codes)) and torch.equal(back["qzeros"], qzeros)
    assert torch.equal(back["g_idx"], g_idx.int()) and torch.equal(back["scales"], scales)


def test_gptq_zero_point_zero_cannot_be_saved_in_the_v1_layout():
    layer = Int4Linear(*quantize_int4(torch.rand(8, 32) + 0.1, 16), None, 16)  # all-positive groups: zero 0
    assert (layer.zeros == 0).any()
    with pytest.raises(ValueError, match="zero - 1"):
        int4_to_gptq(layer)
    assert torch.equal(awq_to_int4(**{k: v for k, v in int4_to_awq(layer).items()}).dequantized_weight(),
                       layer.dequantized_weight())


def test_hub_quant_config_rejects_layouts_it_cannot_read():
    assert HubQuantConfig.from_hf_config({}) is None
    for qc, field in [({"quant_method": "bitsandbytes"}, "quant_method"),
                      ({"quant_method": "gptq", "bits": 8, "group_size": 128}, "bits"),
                      ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "version"),
                      ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size")]:
        with pytest.raises(ValueError, match=f"quantization_config.{field}"):
            HubQuantConfig.from_hf_config({"quantization_config": qc})


# --- whole models -------------------------------------------------------------------------------

def tiny_config(**kw) -> LlamaConfig:
    """Input dims 128 and 256 (multiples of the engine's group check), GQA, float32."""
    return LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, vocab_size=256, max_position_embeddings=512,
                       rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **kw)


HF_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"]


def write_hub_folder(tmp_path, method: str, group: int = 64, act_order: bool = False):
    """A quantized HF folder written with the published loops from random codes, and the transformers
    model holding the float weights those codes stand for (the reference)."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    cfg = tiny_config()
    hf = LlamaForCausalLM(cfg).eval()
    state = {k: v.clone() for k, v in hf.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    for i in range(cfg.num_hidden_layers):
        # One act-order permutation per input (q/k/v share theirs, as GPTQ's Hessians make them), except
        # up_proj, which gets its own: the engine keeps gate/up as separate parts then.
        perms = {}
        for name in HF_LINEARS:
            p = f"model.layers.{i}.{name}"
            w = state.pop(f"{p}.weight")
            n, k = w.shape
            codes = torch.randint(0, 16, (k, n), generator=gen)
            zeros = torch.randint(1 if method == "gptq" else 0, 16, (k // group, n), generator=gen)
            scales = (torch.rand((k // group, n), generator=gen) * 0.01 + 0.002).half()
            g_idx = torch.arange(k) // group
            if act_order:
                key = "up" if name.endswith("up_proj") else name.split(".")[0] + str(k)
                perms.setdefault(key, torch.randperm(k, generator=gen))
                g_idx = g_idx[perms[key]]
            deq = ((codes.float() - zeros[g_idx].float()) * scales[g_idx].float()).t()
            hf.get_submodule(p).weight.data.copy_(deq)
            if method == "awq":
                state.update({f"{p}.qweight": awq_pack_loop(codes), f"{p}.qzeros": awq_pack_loop(zeros),
                              f"{p}.scales": scales})
            else:
                state.update({f"{p}.qweight": gptq_pack_loop(codes), f"{p}.qzeros": pack_last(zeros - 1),
                              f"{p}.scales": scales, f"{p}.g_idx": g_idx.int()})
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    d = cfg.to_dict()
    d["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group, "version": "gemm",
                                "zero_point": True, "desc_act": act_order, "sym": False}
    (tmp_path / "config.json").write_text(json.dumps(d))
    return hf


@pytest.mark.parametrize("method,act_order", [("awq", False), ("gptq", False), ("gptq", True)])
def test_hub_folder_loads_with_from_pretrained(tmp_path, method, act_order):
    hf = write_hub_folder(tmp_path, method, act_order=act_order)
    llm = LLM.from_pretrained(tmp_path, EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32)
    assert llm.config.quantization == method  # the checkpoint's method, as vLLM picks it
    qkv, gate_up = llm.model.layers[0].self_attn.qkv_proj, llm.model.layers[0].mlp.gate_up_proj
    assert isinstance(qkv, Int4Linear) and (qkv.perm is not None) == act_order
    assert isinstance(gate_up, FusedParts if act_order else Int4Linear)
    assert type(llm.model.embed_tokens) is torch.nn.Embedding  # a checkpoint's table runs as it is
    ids = [1, 5, 9, 77, 200, 3, 41]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    out = llm.prompt_logits(ids)
    assert torch.allclose(out, ref, atol=2e-4, rtol=1e-3), (out - ref).abs().max()
    # Other modes start from the float weights the codes stand for (held in the scales' fp16: ~1e-3 relative).
    llm.reconfigure(EngineConfig(device="cpu", max_model_len=256, quantization=None))
    assert torch.allclose(llm.prompt_logits(ids), ref, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_save_then_load_gives_the_same_dequantized_weights(tmp_path, method):
    cfg = tiny_config()
    llm = LLM.random(cfg, EngineConfig(device="cpu", quantization="int4", max_model_len=256), dtype=torch.float32)
    model = llm.model
    if method == "gptq":  # an act-order GPTQ layer with its permutation, and zero points >= 1
        lin = torch.nn.Linear(128, 256, bias=False)  # q 128 + k 64 + v 64
        lin.weight.data.normal_(0, 0.05)
        x = torch.randn(512, 128) * torch.linspace(0.1, 3, 128)
        model.layers[1].self_attn.qkv_proj = gptq_linear(lin, x.t() @ x / 512, 128, act_order=True)
        for name, m in model.named_modules():
            if isinstance(m, Int4Linear):
                m.zeros.clamp_(min=1)
    qc = save_quantized(model, cfg.to_dict(), tmp_path, method)
    assert qc.lm_head and qc.desc_act == (method == "gptq")
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == method and saved["bits"] == 4 and saved["group_size"] == 128
    loaded = LLM.from_pretrained(tmp_path, EngineConfig(device="cpu", max_model_len=256), dtype=torch.float32)
    for name, m in model.named_modules():
        if isinstance(m, Int4Linear):
            m2 = loaded.model.get_submodule(name)
            assert torch.equal(m2.dequantized_weight(), m.dequantized_weight()), name
    ids = [3, 14, 15, 92, 65]
    assert torch.allclose(loaded.prompt_logits(ids), llm.prompt_logits(ids), atol=1e-5, rtol=1e-5)
