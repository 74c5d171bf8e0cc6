"""cuDNN's block-sparse attention as a benchmark anchor: `cudnn.BSA.block_sparse_attention_forward`
from nvidia-cudnn-frontend >= 1.32 (a CuTe DSL kernel compiled on first use; it needs
nvidia-cutlass-dsl and not libcudnn). Square blocks of 64 or 128 tokens on SM90. The pattern is
given as lists, like ours: q2k_block_index (B, H, Nq/block, kmax) int32 key-block ids, with
q2k_block_nums (B, H, Nq/block) entries read per row (or one fixed count), and block_sizes
(num_key_blocks,) the real tokens of each key block. SM90 takes only whole query blocks: the
caller's sequence is padded to whole blocks (padded query rows are computed and dropped).

The graph API's SDPA block_mask route (128 x 128 tiles) declines on Hopper ("only Blackwell is
supported", libcudnn 9.19 on an H200), so it is not an anchor here.
"""

import torch


def versions() -> str:
    parts = []
    for mod in ("cudnn", "cutlass"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except Exception as e:
            parts.append(f"{mod} not importable ({type(e).__name__})")
    major, minor = torch.cuda.get_device_capability()
    return ", ".join(parts + [f"sm{major}{minor}"])


def make_runner(q, k, v, index, counts, block=64, block_sizes=None):
    """A zero-argument callable running cuDNN BSA once on (B, H, Npad, D) bf16 CUDA tensors whose
    length is a whole number of blocks, replayed from a CUDA graph (the wrapper's host work per
    call outlasts a small kernel); and one returning the output of the last run.

    index (B, H, Nq_blocks, kmax) / counts (B, H, Nq_blocks) int32: the key blocks of each query
    block; block_sizes (num_key_blocks,) int32 real tokens per key block (None: all full).
    Raises RuntimeError naming what is missing when the frontend or the GPU cannot run it."""
    try:
        from cudnn import BSA
    except Exception as e:
        raise RuntimeError(f"cudnn.BSA needs nvidia-cudnn-frontend >= 1.32 [{versions()}]: {e}") from e
    if q.shape[2] % block:
        raise ValueError(f"pad the sequence to whole {block}-token blocks (N={q.shape[2]})")
    kw = dict(sparse_block_size=block, block_sizes=block_sizes, q2k_block_nums=counts.to(torch.int32).contiguous())
    index = index.to(torch.int32).contiguous()

    def fwd():
        return BSA.block_sparse_attention_forward(q, k, v, index, **kw)["o_tensor"]

    try:
        fwd()  # compiles this configuration; unsupported shapes and GPUs raise here
        torch.cuda.synchronize()
    except Exception as e:
        raise RuntimeError(f"cuDNN BSA forward failed [{versions()}]: {type(e).__name__}: {str(e)[:400]}") from e
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fwd()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd()
    graph.replay()
    torch.cuda.synchronize()
    run = graph.replay
    return run, (lambda: out)
