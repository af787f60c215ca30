"""The pack's reference DiT (procache_core.reference.dit): attention and MLP branches."""
import torch

from ..schedule import StepKind
from ..tokens import attention_received, split_heads
from .base import BlockStack, Branch, FamilySpec


def _received(block, args, kwargs, ctx):
    # The attention's qkv projection output holds q and k side by side: [B, N, 3C].
    attn = block.attn
    if not ctx.deep:
        return []

    def hook(module, inputs, out):
        q, k, _ = out.chunk(3, dim=-1)
        sampled = q[:, ctx.queries(q.shape[1], q.device)]
        ctx.store({"mlp": attention_received(split_heads(sampled, attn.heads), split_heads(k, attn.heads))})
    return [(attn.qkv, hook)]


def block_reuse(block, branch, x, c):
    # Reuse steps as the method's DiT code runs them: this step's modulation and gates on cached
    # branch outputs, without the norms and modulated inputs. A block that refreshes tokens on
    # this step runs its MLP module, whose tap does the selective update.
    sh1, sc1, g1, sh2, sc2, g2 = block.adaLN_modulation(c).chunk(6, dim=-1)
    x = torch.addcmul(x, g1.unsqueeze(1), branch("attn", like=x))     # x + g1 * attn, one pass
    if getattr(branch, "kind", None) == StepKind.SELECTIVE:
        mlp = block.mlp(block.norm2(x) * (1 + sc2.unsqueeze(1)) + sh2.unsqueeze(1))
    else:       # tokens: the MLP's input, for a router that computes the MLP while the attention is reused
        mlp = branch("mlp", like=x, tokens=lambda: block.norm2(x) * (1 + sc2.unsqueeze(1)) + sh2.unsqueeze(1))
    return torch.addcmul(x, g2.unsqueeze(1), mlp)


REFERENCE = FamilySpec(
    name="reference-dit",
    description="reference DiT: self-attention and MLP, adaLN-Zero gates",
    stacks=(BlockStack("blocks", reuse_forward=block_reuse, branches=(
        Branch("attn", "attn", role="self_attention", probes=(("attention_received", _received),)),
        Branch("mlp", "mlp", role="mlp"),
    )),),
    detect=lambda m: type(m).__name__ == "DiT" and hasattr(m, "blocks") and hasattr(m, "final_layer"),
)
