"""Reference numbers for SmolLM2-135M-Instruct, computed by transformers.

Loads the GGUF that scripts/fetch-smollm2 caches with transformers' own GGUF
loader (`from_pretrained(dir, gguf_file=...)`, float32, eager attention, CPU)
and writes small expected files into tests/data/smollm2/ (README.md there says
what each holds). The Rust tests compare this crate's GGUF loader, tokenizer
and forward pass against them; they are independent of the crate's code.

Not run in CI: CI only reads the files this wrote. To run it again, in a
throwaway virtual environment outside the repository (versions used for the
committed files; torch from PyPI pulls CUDA libraries it does not need here):

    python3 -m venv ../refvenv
    ../refvenv/bin/pip install torch==2.15.0 transformers==5.23.0 \\
        tokenizers==0.23.3 accelerate==1.16.0 gguf==0.19.0 numpy==2.4.6 \\
        safetensors==0.8.0
    export TLI_SMOLLM2_GGUF="$(scripts/fetch-smollm2)"
    HF_HUB_OFFLINE=1 ../refvenv/bin/python scripts/reference/smollm2.py

(Python 3.11; accelerate is needed by transformers' GGUF loading.) About
1.5 CPU-minutes; a few minutes of wall time on two busy cores.

Options: --gguf FILE (default: $TLI_SMOLLM2_GGUF), --out DIR (default:
tests/data/smollm2 in this repository). Nothing is downloaded: the GGUF is
read from disk and everything else comes from it.
"""

import argparse
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import sys
import time

import gguf
import numpy
import safetensors
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]

# Hidden-state indices kept, in transformers' output_hidden_states numbering:
# 0 is the embeddings, i the output of block i, 30 the last block's output
# after the final RMSNorm.
LAYERS = [0, 1, 2, 15, 30]

# Pairs taken from the shipped lists (checked below to be there): single
# words, multi-word phrases, an apostrophe, and two control pairs.
PAIRS = [
    ("maji", "water", "train"),
    ("ng'ombe", "cow", "train"),
    ("moto", "fire", "train"),
    ("habari", "news", "train"),
    ("hongera", "congratulations", "train"),
    ("kusafiri", "travel", "train"),
    ("kumi na moja", "eleven", "train"),
    ("mtoto mchanga", "baby", "train"),
    ("chakula cha jioni", "dinner", "train"),
    ("theluji", "snow", "control"),
    ("zawadi", "gift", "control"),
]

# Strings a byte-level BPE gets wrong in small ways.
TRICKY = [
    " maji",
    " water",
    "Maji",
    "MAJI",
    "  two  spaces",
    "twenty-one",
    "123 4567",
    "3.14",
    "Hello, world!",
    "ng\u2019ombe",  # right single quotation mark instead of the apostrophe
    "\U0001f600 maji",  # emoji
    "caf\u00e9",
    "a\tb\nc",
    "<|im_start|>user",  # a special token's text
    "",
]

# Inputs whose hidden states are stored: (name, text, prepend BOS).
STATES = [
    ("bos_maji", "maji", True),
    ("bos_water", "water", True),
    ("maji", "maji", False),
]


def read_pairs(path):
    pairs = set()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        sw, en = line.split("\t")
        pairs.add((sw, en))
    return pairs


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path, value):
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def gguf_facts(path):
    """Metadata and tensor list as the gguf package reads them."""
    reader = gguf.GGUFReader(path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores",
        ):
            metadata[key] = {"array_length": len(field.data)}
            continue
        if key == "tokenizer.chat_template":
            metadata[key] = {"sha256": hashlib.sha256(field.contents().encode()).hexdigest()}
            continue
        metadata[key] = field.contents()
    tensors = [
        # ggml order: the first dimension is the contiguous one (columns).
        {"name": t.name, "type": t.tensor_type.name, "ggml_shape": [int(d) for d in t.shape]}
        for t in reader.tensors
    ]
    token_types = [int(x) for x in reader.fields["tokenizer.ggml.token_type"].contents()]
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    special = {i: tokens[i] for i, ty in enumerate(token_types) if ty != 1}
    return metadata, tensors, special


def encode_row(tok, text, bos):
    ids = tok(text, add_special_tokens=False).input_ids
    return ([tok.bos_token_id] if bos else []) + ids


@torch.no_grad()
def hidden_states(model, ids):
    out = model(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        output_hidden_states=True,
    )
    return [h[0] for h in out.hidden_states]  # each [tokens, hidden]


def cosine(a, b):
    a = a.double()
    b = b.double()
    return float(a @ b / (a.norm() * b.norm()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=os.environ.get("TLI_SMOLLM2_GGUF"))
    parser.add_argument("--out", default=str(REPO / "tests" / "data" / "smollm2"))
    args = parser.parse_args()
    if not args.gguf:
        sys.exit('no GGUF: pass --gguf or export TLI_SMOLLM2_GGUF="$(scripts/fetch-smollm2)"')
    gguf_path = pathlib.Path(args.gguf).resolve()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    started = time.time()
    torch.manual_seed(0)
    shipped = read_pairs(REPO / "data" / "sw-en-train.tsv") | read_pairs(
        REPO / "data" / "sw-en-control.tsv"
    )
    for sw, en, _ in PAIRS:
        assert (sw, en) in shipped, f"{sw!r}/{en!r} is not in data/"

    d, f = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=f, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    loaded = time.time()
    config = model.config

    # --- model.json: what transformers derived, and the GGUF as read by gguf.
    metadata, tensors, gguf_special = gguf_facts(gguf_path)
    tied = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    probe = tok("maji").input_ids
    plain = tok("maji", add_special_tokens=False).input_ids
    write_json(
        out / "model.json",
        {
            "gguf": {
                "file": gguf_path.name,
                "bytes": gguf_path.stat().st_size,
                "sha256": sha256(gguf_path),
                "metadata": metadata,
                "special_tokens": {str(i): t for i, t in gguf_special.items()},
                "tensors": tensors,
            },
            "config": {
                "model_type": config.model_type,
                "hidden_size": config.hidden_size,
                "intermediate_size": config.intermediate_size,
                "num_hidden_layers": config.num_hidden_layers,
                "num_attention_heads": config.num_attention_heads,
                "num_key_value_heads": config.num_key_value_heads,
                "head_dim": config.head_dim,
                "vocab_size": config.vocab_size,
                "max_position_embeddings": config.max_position_embeddings,
                "rope_parameters": config.rope_parameters,
                "rms_norm_eps": config.rms_norm_eps,
                "hidden_act": config.hidden_act,
                "tie_word_embeddings": config.tie_word_embeddings,
                "lm_head_shares_embeddings": tied,
                "bos_token_id": config.bos_token_id,
                "eos_token_id": config.eos_token_id,
                "pad_token_id": config.pad_token_id,
                "unk_token_id": getattr(config, "unk_token_id", None),
            },
            "parameters": {
                n: list(p.shape)
                for n, p in model.named_parameters()
                if ".layers." not in n or ".layers.0." in n
            },
            "parameter_count": sum(p.numel() for p in model.parameters()),
            "tokenizer": {
                "class": type(tok).__name__,
                "model": type(tok.backend_tokenizer.model).__name__,
                "pre_tokenizer": repr(tok.backend_tokenizer.pre_tokenizer),
                "post_processor": repr(tok.backend_tokenizer.post_processor),
                "vocab_size_with_added": len(tok),
                "bos_token": tok.bos_token,
                "bos_token_id": tok.bos_token_id,
                "eos_token": tok.eos_token,
                "eos_token_id": tok.eos_token_id,
                "unk_token": tok.unk_token,
                "pad_token": tok.pad_token,
                # Whether add_special_tokens=True changes "maji" at all, and how.
                "adds_special_tokens": probe != plain,
                "adds_bos": probe[:1] == [tok.bos_token_id] and probe[1:] == plain,
                "adds_eos": probe[-1:] == [tok.eos_token_id] and probe[:-1] == plain,
            },
        },
    )

    # --- tokens.json: ids with and without special tokens.
    entries = []
    texts = [(w, f"{src} {lang}") for sw, en, src in PAIRS for w, lang in ((sw, "sw"), (en, "en"))]
    texts += [(t, "tricky") for t in TRICKY]
    for text, kind in texts:
        without = tok(text, add_special_tokens=False).input_ids
        entries.append(
            {
                "text": text,
                "kind": kind,
                "ids": without,
                "tokens": tok.convert_ids_to_tokens(without),
                "ids_with_special": tok(text, add_special_tokens=True).input_ids,
                "decoded": tok.decode(without),
            }
        )
    write_json(
        out / "tokens.json",
        {
            "bos_token_id": tok.bos_token_id,
            "adds_bos": probe[:1] == [tok.bos_token_id] and probe[1:] == plain,
            "entries": entries,
        },
    )

    # --- hidden_states.safetensors: exact f32 hidden states of short inputs.
    tensors_out = {}
    for name, text, bos in STATES:
        ids = encode_row(tok, text, bos)
        hs = hidden_states(model, ids)
        tensors_out[f"{name}.input_ids"] = torch.tensor(ids, dtype=torch.int32)
        for layer in LAYERS:
            h = hs[layer].contiguous().clone()
            assert torch.isfinite(h).all(), f"{name} layer {layer} not finite"
            tensors_out[f"{name}.hidden_states.{layer}"] = h
    meta = {
        "layers": ",".join(map(str, LAYERS)),
        "inputs": ";".join(f"{n}={t!r} bos={b}" for n, t, b in STATES),
        "note": "transformers output_hidden_states of one unpadded row, float32, eager attention",
    }
    save_file(tensors_out, str(out / "hidden_states.safetensors"), metadata=meta)

    # --- sink.json: mean-pooled cosines per layer, with and without BOS.
    # with_bos.words: BOS prepended, pooled over the word's own tokens
    # (what --bos auto gives in "words" pooling); with_bos.all: BOS included
    # in the mean; without_bos: tokenizer as is (--bos never; "words" and
    # "all" are the same there, the first token sits at position 0).
    layers_all = list(range(config.num_hidden_layers + 1))
    sink_pairs = []
    sums = {
        "with_bos_words": [0.0] * len(layers_all),
        "with_bos_all": [0.0] * len(layers_all),
        "without_bos": [0.0] * len(layers_all),
    }
    for sw, en, _ in PAIRS:
        row = {"swahili": sw, "english": en}
        with_b = [hidden_states(model, encode_row(tok, w, True)) for w in (sw, en)]
        without = [hidden_states(model, encode_row(tok, w, False)) for w in (sw, en)]
        row["with_bos_words"] = [
            cosine(with_b[0][l][1:].mean(0), with_b[1][l][1:].mean(0)) for l in layers_all
        ]
        row["with_bos_all"] = [
            cosine(with_b[0][l].mean(0), with_b[1][l].mean(0)) for l in layers_all
        ]
        row["without_bos"] = [
            cosine(without[0][l].mean(0), without[1][l].mean(0)) for l in layers_all
        ]
        for k in sums:
            sums[k] = [s + c for s, c in zip(sums[k], row[k])]
        sink_pairs.append(row)
    n = len(PAIRS)
    write_json(
        out / "sink.json",
        {
            "layers": layers_all,
            "note": "cosine (f64) of mean-pooled hidden states of each pair's two words, each word run alone",
            "mean_over_pairs": {k: [s / n for s in v] for k, v in sums.items()},
            "pairs": sink_pairs,
        },
    )

    finished = time.time()
    write_json(
        out / "versions.json",
        {
            "command": "HF_HUB_OFFLINE=1 python scripts/reference/smollm2.py",
            "gguf": gguf_path.name,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gguf_package": importlib.metadata.version("gguf"),
            "accelerate": importlib.metadata.version("accelerate"),
            "tokenizers": importlib.metadata.version("tokenizers"),
            "numpy": numpy.__version__,
            "safetensors": safetensors.__version__,
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "load_seconds": round(loaded - started, 1),
            "wall_seconds": round(finished - started, 1),
        },
    )
    print(f"wrote {out} in {finished - started:.1f} s (loading {loaded - started:.1f} s)")


if __name__ == "__main__":
    main()
