"""A tiny Llama with planted massive channels that reproduces the rotate-patch failure (lp issue 14).

The residual stream is E[token] on the ordinary channels plus a token-independent offset M on three
*massive* channels (~99% of ||h||^2). Attention is switched off and every MLP is made linear
(gate pre-activation K on the massive channels, silu(K) ~ K): layer l multiplies the ordinary
channels by `growth` and the massive ones by `massive_growth`. The final norm ignores the massive
channels and the LM head scores token v against E[v-1], so the dense model predicts token + 1
(windows `ramp_windows`). Removing layers shrinks the ordinary channels relative to the massive ones:
channel-wise scaling repairs it exactly, while H diag(s) H^T leaks the massive channels into all others.
"""

import torch

from lp.models import tiny_model

MASSIVE = [3, 17, 40]


def planted_model(L=8, D=64, M=300.0, growth=2.0, massive_growth=1.3, beta=0.3, K=20.0, seed=0):
    m = tiny_model("llama", num_layers=L, hidden_size=D, seed=seed)
    g = torch.Generator().manual_seed(seed)
    rest = [c for c in range(D) if c not in MASSIVE]
    E = torch.randn(m.config.vocab_size, D, generator=g)
    E[:, MASSIVE] = 0
    rms = M * (len(MASSIVE) / D) ** 0.5  # rms of the embedding output, dominated by the massive channels
    with torch.no_grad():
        m.lm_head.weight.copy_(beta * rms * (massive_growth / growth) ** L * torch.roll(E, 1, 0))
        E[:, MASSIVE] = M
        m.model.embed_tokens.weight.copy_(E)
        m.model.norm.weight.fill_(1.0)
        m.model.norm.weight[MASSIVE] = 0
        for i, layer in enumerate(m.model.layers):
            layer.self_attn.o_proj.weight.zero_()
            layer.post_attention_layernorm.weight.fill_(1.0)
            mlp = layer.mlp
            mlp.gate_proj.weight.zero_()
            mlp.gate_proj.weight[:, MASSIVE] = K / (len(MASSIVE) * M / rms)
            mlp.up_proj.weight.zero_()
            mlp.down_proj.weight.zero_()
            for c in range(D):
                mlp.up_proj.weight[c, c] = 1.0
                mlp.down_proj.weight[c, c] = ((growth if c in rest else massive_growth) - 1) * rms * massive_growth ** i / K
    return m.eval()


def ramp_windows(n, T, seed):
    """[n, T] windows of consecutive byte ids (mod 256) from random starts."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 256, (n, 1), generator=g) + torch.arange(T)) % 256
