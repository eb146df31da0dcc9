"""Regenerate the transformers parity fixtures in tests/data/llama/.

Run from anywhere, in an environment with torch, transformers, peft,
bitsandbytes and safetensors (README.md in this directory lists the versions
used):

    python tests/data/llama/generate.py

Writes, next to this script:

  f32/       a tiny random LlamaForCausalLM saved by transformers
             (config.json, model.safetensors)
  nf4/       the same model loaded with load_in_4bit (NF4, double quant,
             f32 compute) and saved by transformers
  peft/      a LoRA adapter on q_proj/v_proj saved by peft
             (adapter_config.json, adapter_model.safetensors)
  expected.safetensors
             input_ids / attention_mask of a right-padded batch, transformers'
             output_hidden_states for each model (f32.hidden_states.{i},
             nf4.hidden_states.{i}, peft.hidden_states.{i}) and the rotary
             inv_freq buffer (f32.inv_freq)
"""

import pathlib
import shutil

import torch
from safetensors.torch import save_file
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model

HERE = pathlib.Path(__file__).resolve().parent

torch.manual_seed(20260522)

config = LlamaConfig(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    # head_dim 16, theta 1e4: wavelengths 6.3 (kept), 19.9 and 62.8 (smoothed),
    # 199 and up (divided by the factor), with original_max_position_embeddings 64.
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
)
config._attn_implementation = "eager"
model = LlamaForCausalLM(config).eval()
with torch.no_grad():
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1.0 + 0.1 * torch.randn_like(p))
        elif "embed_tokens" in name or "lm_head" in name:
            p.copy_(torch.randn_like(p))
        else:
            p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)

# Lengths 12, 7 and 3, right-padded with EOS (2); BOS (1) first.
lengths = [12, 7, 3]
ids = torch.randint(3, 96, (3, 12))
ids[:, 0] = 1
mask = torch.zeros(3, 12, dtype=torch.int64)
for r, n in enumerate(lengths):
    mask[r, :n] = 1
    ids[r, n:] = 2

expected = {
    "input_ids": ids.to(torch.int32),
    "attention_mask": mask.to(torch.int32),
    "f32.inv_freq": model.model.rotary_emb.inv_freq.clone(),
}


def record(prefix, m):
    with torch.no_grad():
        out = m(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    for i, h in enumerate(out.hidden_states):
        expected[f"{prefix}.hidden_states.{i}"] = h.float().contiguous()


record("f32", model)
for sub in ["f32", "nf4", "peft"]:
    shutil.rmtree(HERE / sub, ignore_errors=True)
model.save_pretrained(HERE / "f32")

q = LlamaForCausalLM.from_pretrained(
    HERE / "f32",
    quantization_config=BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    ),
    attn_implementation="eager",
    device_map="cpu",
)
# Train mode (Llama has no dropout, so the computation is the same): in eval
# mode bitsandbytes' CPU backend repacks 4-bit weights for an AVX512-BF16
# kernel (`packing_format_for_cpu`, `gemv_4bit`) whose results differ from
# dequantize-then-matmul by about 1e-2 here. Train mode takes the generic
# path, dequantize_4bit then an f32 matmul, which is the format's definition
# and what bitsandbytes' CUDA path computes for more than one token.
record("nf4", q.train())
q.save_pretrained(HERE / "nf4")

lora = LoraConfig(
    r=4,
    lora_alpha=8,
    lora_dropout=0.05,
    target_modules=["q_proj", "v_proj"],
    init_lora_weights=False,  # random B, so the adapter changes the output
)
base = LlamaForCausalLM.from_pretrained(HERE / "f32", attn_implementation="eager").eval()
pm = get_peft_model(base, lora).eval()
record("peft", pm)
# Name the base model relative to the repository, not this machine.
pm.peft_config["default"].base_model_name_or_path = "tests/data/llama/f32"
pm.save_pretrained(HERE / "peft")

save_file(expected, HERE / "expected.safetensors", metadata={"format": "pt"})
# Files the tests do not read.
for extra in ["f32/generation_config.json", "nf4/generation_config.json", "peft/README.md"]:
    (HERE / extra).unlink(missing_ok=True)
for p in sorted(HERE.rglob("*")):
    if p.is_file():
        print(p.relative_to(HERE), p.stat().st_size)
