#!/usr/bin/python3
"""backprompt's NumPy reference oracle: an independent float64 forward pass for GPT-2 and Llama
models stored as GGUF (llama.cpp tensor names).

Written from the architectures' definitions, not from backprompt's C++ code, so that the two
can be compared (tests/test_reference.cpp).

Usage:
    reference.py MODEL.gguf --tokens 1,2,3 --out FILE   # logits of every position, raw
                                                        # little-endian float32 [n_tokens][n_vocab]
    reference.py MODEL.gguf --tokens 1 --greedy N       # prints N greedily generated ids
"""

import argparse
import os
import sys

import numpy as np

sys.dont_write_bytecode = True  # keep the source tree clean of __pycache__
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gguf_reader import GgufFile  # noqa: E402


# ---------------------------------------------------------------------------------------------
# Model: hyperparameters and weights (float64)

class Config:
    pass


class Model:
    def __init__(self, path):
        f = GgufFile(path)
        arch = f.get("general.architecture")
        if arch not in ("gpt2", "llama"):
            raise ValueError(f"{path}: unsupported architecture {arch!r}")
        c = Config()
        c.arch = arch
        c.n_ctx = int(f.get(f"{arch}.context_length"))
        c.n_embd = int(f.get(f"{arch}.embedding_length"))
        c.n_ff = int(f.get(f"{arch}.feed_forward_length"))
        c.n_layer = int(f.get(f"{arch}.block_count"))
        c.n_head = int(f.get(f"{arch}.attention.head_count"))
        c.head_dim = c.n_embd // c.n_head
        if arch == "gpt2":
            c.n_kv_head = c.n_head
            c.norm_eps = float(f.get("gpt2.attention.layer_norm_epsilon"))
        else:
            c.n_kv_head = int(f.get("llama.attention.head_count_kv", c.n_head))
            c.norm_eps = float(f.get("llama.attention.layer_norm_rms_epsilon"))
            c.rope_dim = int(f.get("llama.rope.dimension_count", c.head_dim))
            c.rope_base = float(f.get("llama.rope.freq_base", 10000.0))
        self.config = c
        self.file = f

        # Weights: a matrix with GGUF ne = [in, out] is a (out, in) array; y = x @ W.T.
        self.token_embd = f.tensor("token_embd.weight")                      # (n_vocab, n_embd)
        self.output = (f.tensor("output.weight") if "output.weight" in f.tensors
                       else self.token_embd)                                 # (n_vocab, n_embd)
        c.n_vocab = self.token_embd.shape[0]
        self.output_norm_w = f.tensor("output_norm.weight")                  # (n_embd,)
        if arch == "gpt2":
            self.position_embd = f.tensor("position_embd.weight")            # (n_ctx, n_embd)
            self.output_norm_b = f.tensor("output_norm.bias")                # (n_embd,)

        self.layers = []
        for il in range(c.n_layer):
            def t(name, il=il):
                return f.tensor(f"blk.{il}.{name}")
            if arch == "gpt2":
                layer = {
                    "attn_norm_w": t("attn_norm.weight"), "attn_norm_b": t("attn_norm.bias"),
                    "qkv_w": t("attn_qkv.weight"), "qkv_b": t("attn_qkv.bias"),   # (3*n_embd, n_embd)
                    "o_w": t("attn_output.weight"), "o_b": t("attn_output.bias"),
                    "ffn_norm_w": t("ffn_norm.weight"), "ffn_norm_b": t("ffn_norm.bias"),
                    "up_w": t("ffn_up.weight"), "up_b": t("ffn_up.bias"),          # (n_ff, n_embd)
                    "down_w": t("ffn_down.weight"), "down_b": t("ffn_down.bias"),  # (n_embd, n_ff)
                }
            else:
                layer = {
                    "attn_norm_w": t("attn_norm.weight"),
                    "q_w": t("attn_q.weight"),        # (n_head*head_dim, n_embd)
                    "k_w": t("attn_k.weight"),        # (n_kv_head*head_dim, n_embd)
                    "v_w": t("attn_v.weight"),        # (n_kv_head*head_dim, n_embd)
                    "o_w": t("attn_output.weight"),   # (n_embd, n_head*head_dim)
                    "ffn_norm_w": t("ffn_norm.weight"),
                    "gate_w": t("ffn_gate.weight"),   # (n_ff, n_embd)
                    "up_w": t("ffn_up.weight"),       # (n_ff, n_embd)
                    "down_w": t("ffn_down.weight"),   # (n_embd, n_ff)
                }
            self.layers.append(layer)


# ---------------------------------------------------------------------------------------------
# Building blocks

def layer_norm(x, w, b, eps):
    mean = x.mean(axis=-1, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


def rms_norm(x, w, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * w


def gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def causal_attention(q, k, v, n_head, n_kv_head):
    """q: (n, n_head, hd), k/v: (n, n_kv_head, hd) -> (n, n_head*hd). Query head h reads kv
    head h // (n_head / n_kv_head)."""
    n, _, hd = q.shape
    group = n_head // n_kv_head
    mask = np.triu(np.full((n, n), -np.inf), k=1)  # (n, n): -inf above the diagonal
    out = np.empty_like(q)
    for h in range(n_head):
        kv = h // group
        scores = q[:, h, :] @ k[:, kv, :].T / np.sqrt(hd) + mask  # (n, n)
        out[:, h, :] = softmax(scores) @ v[:, kv, :]
    return out.reshape(n, n_head * hd)


def rope(x, positions, rope_dim, base):
    """Rotates adjacent pairs (x[2i], x[2i+1]) of each head for i < rope_dim/2 by
    pos * base^(-2i/rope_dim). x: (n, heads, head_dim)."""
    x = x.copy()
    i = np.arange(rope_dim // 2)
    inv_freq = base ** (-2.0 * i / rope_dim)                           # (rope_dim/2,)
    theta = positions[:, None].astype(np.float64) * inv_freq[None, :]  # (n, rope_dim/2)
    cos = np.cos(theta)[:, None, :]
    sin = np.sin(theta)[:, None, :]
    x0 = x[:, :, 0:rope_dim:2].copy()
    x1 = x[:, :, 1:rope_dim:2].copy()
    x[:, :, 0:rope_dim:2] = x0 * cos - x1 * sin
    x[:, :, 1:rope_dim:2] = x0 * sin + x1 * cos
    return x


# ---------------------------------------------------------------------------------------------
# Forward passes: all positions of one sequence starting at position 0

def forward_gpt2(m, tokens):
    c = m.config
    n = len(tokens)
    positions = np.arange(n)
    x = m.token_embd[tokens] + m.position_embd[positions]  # (n, n_embd)
    for L in m.layers:
        h = layer_norm(x, L["attn_norm_w"], L["attn_norm_b"], c.norm_eps)
        qkv = h @ L["qkv_w"].T + L["qkv_b"]                 # (n, 3*n_embd)
        q = qkv[:, 0 * c.n_embd:1 * c.n_embd].reshape(n, c.n_head, c.head_dim)
        k = qkv[:, 1 * c.n_embd:2 * c.n_embd].reshape(n, c.n_head, c.head_dim)
        v = qkv[:, 2 * c.n_embd:3 * c.n_embd].reshape(n, c.n_head, c.head_dim)
        a = causal_attention(q, k, v, c.n_head, c.n_head)
        x = x + a @ L["o_w"].T + L["o_b"]
        h = layer_norm(x, L["ffn_norm_w"], L["ffn_norm_b"], c.norm_eps)
        ff = gelu_tanh(h @ L["up_w"].T + L["up_b"])          # (n, n_ff)
        x = x + ff @ L["down_w"].T + L["down_b"]
    x = layer_norm(x, m.output_norm_w, m.output_norm_b, c.norm_eps)
    return x @ m.output.T                                    # (n, n_vocab)


def forward_llama(m, tokens):
    c = m.config
    n = len(tokens)
    positions = np.arange(n)
    x = m.token_embd[tokens].copy()                          # (n, n_embd)
    for L in m.layers:
        h = rms_norm(x, L["attn_norm_w"], c.norm_eps)
        q = (h @ L["q_w"].T).reshape(n, c.n_head, c.head_dim)
        k = (h @ L["k_w"].T).reshape(n, c.n_kv_head, c.head_dim)
        v = (h @ L["v_w"].T).reshape(n, c.n_kv_head, c.head_dim)
        q = rope(q, positions, c.rope_dim, c.rope_base)
        k = rope(k, positions, c.rope_dim, c.rope_base)
        a = causal_attention(q, k, v, c.n_head, c.n_kv_head)
        x = x + a @ L["o_w"].T
        h = rms_norm(x, L["ffn_norm_w"], c.norm_eps)
        ff = silu(h @ L["gate_w"].T) * (h @ L["up_w"].T)    # (n, n_ff)
        x = x + ff @ L["down_w"].T
    x = rms_norm(x, m.output_norm_w, c.norm_eps)
    return x @ m.output.T                                    # (n, n_vocab)


def forward(m, tokens):
    """Logits (float64, shape (len(tokens), n_vocab)) of every position."""
    tokens = np.asarray(tokens, dtype=np.int64)
    c = m.config
    if len(tokens) == 0:
        return np.zeros((0, c.n_vocab))
    if len(tokens) > c.n_ctx:
        raise ValueError(f"{len(tokens)} tokens exceed the context length {c.n_ctx}")
    if tokens.min() < 0 or tokens.max() >= c.n_vocab:
        raise ValueError(f"token id out of range [0, {c.n_vocab})")
    if c.arch == "gpt2":
        return forward_gpt2(m, tokens)
    return forward_llama(m, tokens)


def greedy(m, tokens, n_new):
    """Appends n_new argmax tokens (recomputing the whole sequence each step: slow but simple)."""
    tokens = list(tokens)
    out = []
    for _ in range(n_new):
        if len(tokens) >= m.config.n_ctx:
            break
        nxt = int(np.argmax(forward(m, tokens)[-1]))
        tokens.append(nxt)
        out.append(nxt)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--tokens", required=True, help="comma-separated token ids")
    ap.add_argument("--out", help="write all-position logits here (float32 LE [n_tokens][n_vocab])")
    ap.add_argument("--greedy", type=int, default=0, help="print this many greedily generated ids")
    args = ap.parse_args(argv)

    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    m = Model(args.model)
    if args.out:
        logits = forward(m, tokens).astype("<f4")
        with open(args.out, "wb") as f:
            f.write(logits.tobytes())
    if args.greedy:
        print(",".join(str(t) for t in greedy(m, tokens, args.greedy)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
