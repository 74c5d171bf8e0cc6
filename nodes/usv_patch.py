"""How USV rides on a ComfyUI model without forking its code.

One `USVPatch` lives in each patched model clone's model_options["transformer_options"]; every
USV node adds or replaces its feature there (sparse attention, token merging), so applying a
node twice replaces rather than stacks, and the nodes compose in either order.

Each clone owns its patch, whatever ModelPatcher.clone() copies: ComfyUI up to 0.13 deep-copies
model_options, later releases copy only its dicts and lists and share every other object. So a
USV node installs a fresh copy on the clone it returns, and an ON_CLONE callback gives any other
clone (a LoRA loader's, another pack's) its own copy too. Settings are shared (they are frozen);
run statistics never are.

Per diffusion-model call, the DIFFUSION_MODEL wrapper asks the family's adapter how the call lays
out its tokens (a grid, with tokens before or after it) and puts a `CallContext` into a copy of
transformer_options, together with
- an optimized_attention_override that chains whatever override it found there (attention-backend
  nodes, Sage or KJNodes patches) and serves grid self-attention itself;
- per-block replacements that chain any replacement already there and tell the override which
  block it is in (and, with token merging, merge before the block and unmerge after).
Everything is installed per call, on top of what other packs put there, and nothing global is
touched. Callbacks only count steps and close a run's statistics.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

log = logging.getLogger("usv")

PATCH_KEY = "usv_patch"
CALL_KEY = "usv_call"
WRAPPER_KEY = "usv"


@dataclass
class CallContext:
    """What one diffusion-model call needs to know about its tokens."""

    patch: "USVPatch"
    model: torch.nn.Module  # the diffusion model running this call
    grid: tuple[int, int, int]
    prefix: int  # tokens before the grid (Wan reference latents)
    step: int
    suffix: int = 0  # tokens after the grid (Wan context latents, LTX keyframe guides)
    block: int = -1
    calls_in_block: int = 0
    block_sizes: torch.Tensor | None = None  # set when tokens are merged: tokens per cube
    merged_tokens: int | None = None
    gate: torch.Tensor | None = None  # (B, heads, N, D) gate of the running block's coarse branch
    merge_plan: object = None  # the token-merging plan this call's blocks share
    merge_plans: dict = field(default_factory=dict)  # ratio -> plan, when a policy varies the ratio by block
    num_steps: int = 0  # steps of the running schedule (0: unknown)
    zero_masks: dict = field(default_factory=dict)  # id(mask) -> (mask, all zeros?): one check per call

    @property
    def grid_tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w


@dataclass
class RunStats:
    """Counts of what happened to each attention call, by (step, block, path)."""

    calls: Counter = field(default_factory=Counter)
    steps: int = 0
    entropy: dict = field(default_factory=dict)  # (step, block) -> (B, heads) normalised coarse entropy
    keep: dict = field(default_factory=dict)  # (step, block) -> keep ratio (float or per-head tensor)
    merged: dict = field(default_factory=dict)  # (step, block) -> tokens after merging / before
    grid: tuple | None = None  # token grid of the run's last call
    policy: object = None  # usv_core.policy.PolicyRun: the policy's observations and decisions in this run
    started: dict = field(default_factory=dict)  # step -> perf_counter() at its first model call
    ended: float | None = None  # perf_counter() when sampling ended

    def count(self, step: int, block: int, path: str) -> None:
        self.calls[(step, block, path)] += 1

    def paths(self) -> Counter:
        out = Counter()
        for (_, _, path), n in self.calls.items():
            out[path] += n
        return out

    def step_seconds(self) -> dict[int, float]:
        """Wall-clock seconds of each step: from its first model call to the next step's (the
        sampler reads the step's sigma on the host first, so the device has finished by then),
        the last one to the end of sampling."""
        steps = sorted(self.started)
        ends = [self.started[s] for s in steps[1:]] + [self.ended]
        return {s: e - self.started[s] for s, e in zip(steps, ends) if e is not None}

    def sparse_steps(self) -> set[int]:
        """Steps in which any attention call ran sparse or any block ran merged."""
        return {s for (s, _b, path), n in self.calls.items() if n and path in ("sparse", "merged")}


class USVPatch:
    """The features that USV nodes set on one model clone, and that clone's run statistics."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.features: dict[str, object] = {}
        self.run = RunStats()
        self.last_run: RunStats | None = None
        self._warned: set[str] = set()
        self._prepare_steps = 0
        # ComfyUI's MultiGPU (0.28+) runs a clone's work on per-device clones in threads: each
        # device's clone owns a patch, registered here by device, so that no thread writes
        # another's statistics and USV Report can merge them
        self.devices: dict = {}

    def copy(self) -> "USVPatch":
        """The same settings with statistics of its own. Features are frozen (and may hold
        weights), so they are shared."""
        other = USVPatch(self.adapter)
        other.features = dict(self.features)
        return other

    def __deepcopy__(self, memo):
        return self.copy()

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("USV: %s", message)

    # callbacks -----------------------------------------------------------------------------
    def on_prepare_state(self, timestep) -> None:
        self._prepare_steps += 1

    def on_cleanup(self) -> None:
        if self.run.started:
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()  # the last step's kernels belong to its time
            self.run.ended = time.perf_counter()
        if self.run.calls or self.run.steps:
            self.last_run = self.run
        self.run = RunStats()
        self._prepare_steps = 0


def get_patch(model) -> USVPatch | None:
    return model.model_options.get("transformer_options", {}).get(PATCH_KEY)


def _on_prepare_state(patcher, timestep, *_rest):
    patch = get_patch(patcher)
    if patch is not None:
        patch.on_prepare_state(timestep)


def _on_cleanup(patcher, *_rest):
    patch = get_patch(patcher)
    if patch is not None:
        patch.on_cleanup()


def _on_clone(_original, clone, *_rest):
    """ON_CLONE: the clone gets a copy of the patch of its own. clone() copied transformer_options
    itself (a dict) on every release, so the copy never reaches the model it was cloned from."""
    opts = clone.model_options.get("transformer_options")
    patch = opts.get(PATCH_KEY) if isinstance(opts, dict) else None
    if patch is not None:
        opts[PATCH_KEY] = patch.copy()


def _on_multigpu_clone(main, clone, *_rest):
    """ON_DEEPCLONE_MULTIGPU / ON_MATCH_MULTIGPU_CLONES: `clone` serves `main` on its load device."""
    patch, own = get_patch(main), get_patch(clone)
    if patch is not None and own is not None and own is not patch:
        patch.devices[clone.load_device] = own


def device_patch(patch: USVPatch, transformer_options: dict) -> USVPatch:
    """The patch of the per-device clone running this call (MultiGPU), else `patch`."""
    device = transformer_options.get("multigpu_thread_device")
    return patch.devices.get(device, patch) if device is not None else patch


def patched_clone(model, adapter, feature_name: str, feature) -> object:
    """A clone of `model` with `feature` set under `feature_name`; the model given is untouched."""
    import comfy.patcher_extension as pe

    m = model.clone()  # a patched model's ON_CLONE callback already gave m its own copy
    patch = get_patch(m)
    if patch is None:
        patch = USVPatch(adapter)
        m.model_options.setdefault("transformer_options", {})[PATCH_KEY] = patch
        m.add_wrapper_with_key(pe.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, diffusion_model_wrapper)
        m.add_callback_with_key(pe.CallbacksMP.ON_PREPARE_STATE, WRAPPER_KEY, _on_prepare_state)
        m.add_callback_with_key(pe.CallbacksMP.ON_CLEANUP, WRAPPER_KEY, _on_cleanup)
        m.add_callback_with_key(pe.CallbacksMP.ON_CLONE, WRAPPER_KEY, _on_clone)
        for name in ("ON_DEEPCLONE_MULTIGPU", "ON_MATCH_MULTIGPU_CLONES"):  # ComfyUI 0.28+
            if hasattr(pe.CallbacksMP, name):
                m.add_callback_with_key(getattr(pe.CallbacksMP, name), WRAPPER_KEY, _on_multigpu_clone)
    patch.adapter = adapter
    patch.features[feature_name] = feature
    return m


# the per-call machinery --------------------------------------------------------------------

def step_index(transformer_options: dict, patch: USVPatch) -> int:
    """Index of the current sampling step, from the sigmas ComfyUI's samplers put in
    transformer_options; falls back to counting prepare_state callbacks."""
    sigmas = transformer_options.get("sample_sigmas")
    current = transformer_options.get("sigmas")
    if sigmas is None or current is None or len(sigmas) < 2:
        return max(0, patch._prepare_steps - 1)
    sigma = float(current.flatten()[0])
    sched = sigmas[:-1].float().cpu()
    return int(torch.argmin((sched - sigma).abs()))


def _bind(executor, args, kwargs) -> inspect.BoundArguments:
    sig = inspect.signature(executor.original)
    bound = sig.bind(*args, **kwargs)
    return bound


def diffusion_model_wrapper(executor, *args, **kwargs):
    bound = _bind(executor, args, kwargs)
    opts = bound.arguments.get("transformer_options")
    patch = opts.get(PATCH_KEY) if isinstance(opts, dict) else None
    if patch is None or not patch.features:
        return executor(*args, **kwargs)
    patch = device_patch(patch, opts)
    step = step_index(opts, patch)
    patch.run.steps = max(patch.run.steps, step + 1)
    patch.run.started.setdefault(step, time.perf_counter())
    layout = patch.adapter.token_layout(executor.class_obj, bound.arguments)
    if isinstance(layout, str):
        # a call USV cannot lay out as a grid runs dense; say so once, with the reason
        patch.warn_once("layout:" + layout, f"{patch.adapter.name}: {layout}; these calls run dense")
        patch.run.count(step, -1, "dense:layout")
        return executor(*args, **kwargs)
    ctx = CallContext(patch=patch, model=executor.class_obj, grid=layout.grid, prefix=layout.prefix,
                      suffix=layout.suffix, step=step)
    sigmas = opts.get("sample_sigmas")
    ctx.num_steps = len(sigmas) - 1 if sigmas is not None and len(sigmas) > 1 else 0
    patch.run.grid = layout.grid

    opts = dict(opts)
    opts[PATCH_KEY] = patch
    opts[CALL_KEY] = ctx
    opts["optimized_attention_override"] = AttentionOverride(opts.get("optimized_attention_override"))
    replace = dict(opts.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    # a block's index is its position in the adapter's list: HunyuanVideo's single blocks follow
    # its double blocks, so dense_blocks, statistics and the policy see one numbering
    for index, key in enumerate(patch.adapter.block_keys(executor.class_obj)):
        dit[key] = BlockHook(key, dit.get(key), index)
    replace["dit"] = dit
    opts["patches_replace"] = replace
    # a feature that reshapes the whole call (USV Sequence Parallel) goes on top of all of the above
    for feature in list(patch.features.values()):
        wrap = getattr(feature, "wrap_call", None)
        if wrap is not None:
            opts = wrap(ctx, opts)
    bound.arguments["transformer_options"] = opts
    return executor(*bound.args, **bound.kwargs)


class BlockHook:
    """A per-block replacement that marks which block runs, lets features act around it, and
    chains the replacement that was there before."""

    def __init__(self, key, previous, index=None):
        self.key = key
        self.index = index
        self.previous = previous

    def _inner(self, args, extra):
        ctx: CallContext | None = args.get("transformer_options", {}).get(CALL_KEY)
        sparse = ctx.patch.features.get("sparse_attention") if ctx is not None else None
        if sparse is not None:
            sparse.block_gate(ctx, args)  # sees the block's real input, merged or not
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)

    def __call__(self, args, extra):
        ctx: CallContext | None = args.get("transformer_options", {}).get(CALL_KEY)
        if ctx is None:
            return self._inner(args, extra)
        ctx.block = -1 if self.index is None else self.index
        ctx.calls_in_block = 0
        merge = ctx.patch.features.get("token_merge")
        if merge is not None and self.index is not None:
            return merge.run_block(ctx, args, extra, self._inner)
        return self._inner(args, extra)


class AttentionOverride:
    """ComfyUI's optimized_attention_override: serve grid self-attention with a USV feature,
    hand everything else to the override that was installed before, or to the original."""

    def __init__(self, previous):
        # Never wrap ourselves twice when an outer USV wrapper already installed one.
        while isinstance(previous, AttentionOverride):
            previous = previous.previous
        self.previous = previous

    def delegate(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    # Opaque to torch.compile: routing reads the step, block and call counters of this call, and a
    # traced copy would guard on them and compile again every step. Attention is one kernel either
    # way, so a graph break around it costs little; the blocks around it stay compiled.
    @torch.compiler.disable
    def __call__(self, func, *args, **kwargs):
        opts = kwargs.get("transformer_options") or {}
        ctx: CallContext | None = opts.get(CALL_KEY)
        feature = ctx.patch.features.get("sparse_attention") if ctx is not None else None
        if ctx is None:
            return self.delegate(func, args, kwargs)
        ctx.calls_in_block += 1
        if feature is None:
            return self.delegate(func, args, kwargs)
        call = _parse_attention_call(args, kwargs)
        run, name = ctx.patch.run, ctx.patch.adapter.name
        if ctx.merged_tokens is not None:
            expected = ctx.merged_tokens
        else:
            expected = ctx.prefix + ctx.grid_tokens + ctx.suffix
        # Joint attention (HunyuanVideo) carries text tokens after the grid in the same call.
        text = 0
        if (call is not None and getattr(ctx.patch.adapter, "text_suffix", False) and ctx.merged_tokens is None
                and call.q_len > expected):
            text = call.q_len - expected
        # The first attention call of a block is its self-attention (Wan, LTX-Video, HunyuanVideo);
        # the later ones are cross-attention (keys from the text, or LTX-2's audio).
        if ctx.calls_in_block != 1:
            run.count(ctx.step, ctx.block, "declined")
            return self.delegate(func, args, kwargs)
        if call is None:
            if ctx.block >= 0:
                # LTX guides below strength 1 split self-attention into query groups over all keys
                ctx.patch.warn_once("split", f"{name}: a block's self-attention came in parts (queries and keys "
                                             "of different lengths, as LTX keyframe guides below strength 1 do); "
                                             "those calls run dense")
                run.count(ctx.step, ctx.block, "dense:split")
            else:
                run.count(ctx.step, ctx.block, "declined")
            return self.delegate(func, args, kwargs)
        if call.q_len != expected + text or call.k_len != expected + text:
            if ctx.block >= 0:
                ctx.patch.warn_once("tokens", f"{name}: self-attention saw {call.q_len} tokens where the video "
                                              f"layout has {expected + text}; those calls run dense")
                run.count(ctx.step, ctx.block, "dense:tokens")
            else:
                run.count(ctx.step, ctx.block, "declined")
            return self.delegate(func, args, kwargs)
        if call.mask is not None and not (text and _all_zeros(ctx, call.mask)):
            # an all-zero additive mask (HunyuanVideo without padded text) changes nothing; any
            # other mask (padded text, LTX guide attenuation) is a call the sparse path does not model
            ctx.patch.warn_once("mask", f"{name}: an attention mask on self-attention "
                                        f"({'padded text' if text else 'such as a guide strength'})")
            run.count(ctx.step, ctx.block, "dense:mask")
            return self.delegate(func, args, kwargs)
        if ctx.merged_tokens is None and (ctx.prefix or ctx.suffix):
            # tokens before the grid move behind it, so that the grid is one contiguous run and
            # every token outside it attends and is attended densely, as joint text is
            call = call.grid_first(ctx.prefix, ctx.grid_tokens)
            text = call.q_len - ctx.grid_tokens
        out = feature.attend(ctx, call, text=text)
        if out is None:
            return self.delegate(func, args, kwargs)
        return out


def _all_zeros(ctx: CallContext, mask) -> bool:
    """Whether an additive attention mask is all zeros; checked once per mask tensor and call."""
    if not isinstance(mask, torch.Tensor) or mask.dtype == torch.bool:
        return False
    hit = ctx.zero_masks.get(id(mask))
    if hit is None or hit[0] is not mask:
        hit = (mask, not bool(mask.any()))
        ctx.zero_masks[id(mask)] = hit
    return hit[1]


@dataclass
class AttentionCall:
    q: torch.Tensor  # (B, heads, N, D)
    k: torch.Tensor
    v: torch.Tensor
    heads: int
    mask: object
    skip_output_reshape: bool
    moved_prefix: int = 0  # tokens moved from before the grid to behind it (grid_first)
    grid_tokens: int = 0

    @property
    def q_len(self) -> int:
        return self.q.shape[2]

    @property
    def k_len(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    def grid_first(self, prefix: int, grid_tokens: int) -> "AttentionCall":
        """The same call with its `prefix` tokens moved behind the grid; output() moves them back."""
        if not prefix:
            return self

        def order(t):
            return torch.cat([t[:, :, prefix:prefix + grid_tokens], t[:, :, :prefix], t[:, :, prefix + grid_tokens:]], 2)

        return AttentionCall(order(self.q), order(self.k), order(self.v), self.heads, self.mask,
                             self.skip_output_reshape, prefix, grid_tokens)

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, D) back to the token order and layout ComfyUI's caller expects."""
        if self.moved_prefix:
            p, g = self.moved_prefix, self.grid_tokens
            out = torch.cat([out[:, :, g:g + p], out[:, :, :g], out[:, :, g + p:]], 2)
        if self.skip_output_reshape:
            return out
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


_ATTN_PARAMS = ("q", "k", "v", "heads", "mask", "attn_precision", "skip_reshape", "skip_output_reshape")


def _parse_attention_call(args, kwargs) -> AttentionCall | None:
    values = dict(zip(_ATTN_PARAMS, args))
    for name in _ATTN_PARAMS:
        if name in kwargs:
            values[name] = kwargs[name]
    q, k, v, heads = (values.get(n) for n in ("q", "k", "v", "heads"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not isinstance(heads, int):
        return None
    if values.get("skip_reshape", False):
        if q.ndim != 4:
            return None
    else:
        if q.ndim != 3 or q.shape[-1] % heads:
            return None
        b = q.shape[0]
        q, k, v = (t.view(b, t.shape[1], heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    if q.shape != k.shape or k.shape != v.shape:
        return None
    return AttentionCall(q, k, v, heads, values.get("mask"), bool(values.get("skip_output_reshape", False)))
