"""Sequence parallelism for one video over several processes (Ulysses style, torch.distributed).

Every rank holds a contiguous shard of the token sequence through the whole transformer block;
attention turns sequence shards into head shards (one all-to-all), runs VSA on its heads over the
whole grid, and turns them back (another). Selection is per head, so each head selects exactly
what one process would, and the output equals one process's. Token merging plans on the gathered
metric, so every rank holds the same plan (checked).

Forward only (inference): the collectives carry no gradients.
"""

from .attention import sequence_parallel_vsa
from .comm import gather_tokens, heads_to_seq, seq_to_heads, shard_sizes, shard_tokens
from .merge import plan_merge_parallel
from .spawn import spawn

__all__ = ["sequence_parallel_vsa", "seq_to_heads", "heads_to_seq", "shard_sizes", "shard_tokens", "gather_tokens",
           "plan_merge_parallel", "spawn"]
