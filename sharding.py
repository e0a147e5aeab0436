"""
What fits in memory: FSDP2 sharding of parameters, gradients and optimizer state (--fsdp) and the full state dicts
checkpoints hold; --batch_size auto, which probes the GPU; and the loss path (full logits or chunks) a micro-batch
takes. train_gpt2.py calls these by module name; this module never imports it.

DDP keeps everything on every GPU: 4 bytes of weights, 4 of gradients and 8 of AdamW moments per parameter. FSDP2
(torch.distributed.fsdp.fully_shard) keeps 1/world_size of each; a block's weights are all-gathered just before its
forward and backward, and its gradients reduce-scattered after. Parameters become DTensors, with the names of the
plain model, so the fused AdamW, clip_grad_norm_ (a global norm over all shards) and the checkpoint format stay
those of a single process: a checkpoint moves between one process, DDP and FSDP.
"""

import contextlib
import copy
import math

import torch
import torch.distributed as dist

import common
from common import GPT2_VOCAB, UsageError


# -----------------------------------------------------------------------------
# FSDP2 (--fsdp) and the state of a model that is sharded or not


def is_sharded(model):
    return hasattr(model, "set_requires_gradient_sync")  # an FSDPModule; no import needed for the plain model


def local_part(t):
    """This rank's shard of a DTensor; a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def gradient_sync(train_model, sync):
    """Context for one micro-step's backward: reduce gradients over ranks (sync) or only accumulate them locally.
    DDP: no_sync(). FSDP: no reduce-scatter until the last micro-step; meanwhile each rank accumulates unsharded
    gradients of the whole model (a full gradient's memory, traded for world_size times less traffic)."""
    if is_sharded(train_model):
        train_model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if sync else train_model.no_sync()


def ddp_without_buffer_sync():
    """DDP's flag that syncs no buffers each forward (the only ones, the rotary tables, follow from the config):
    broadcast_buffers, which torch 2.13 renamed forward_sync_buffers (the old name warns there)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    new = "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers" if new else "broadcast_buffers": False}


def params_finite(model, ctx):
    """Whether all parameters are finite; under FSDP each rank checks its shards and all ranks agree."""
    ok = torch.stack([local_part(p).isfinite().all() for p in model.parameters()]).all().float()
    if is_sharded(model):
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def fsdp_api():
    """FSDP2's API: public in torch.distributed.fsdp since torch 2.6 (2.4 and 2.5 keep it in a private module)."""
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    except ImportError:
        raise UsageError(f"--fsdp needs torch >= 2.6 (FSDP2 in torch.distributed.fsdp), this is torch "
                         f"{torch.__version__}: upgrade torch (pip install -U torch) or drop --fsdp") from None
    return MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method


def shard_model(model, ctx, dtype):
    """Shard the model in place, in dtype (the run's precision; training then runs without autocast). Each Block
    is one FSDP group, the root holds the rest: wte and lm_head are one tied parameter, and both modules live in the
    root, so the tie survives sharding. Its forward all-gathers: every rank must call it. Not compiled yet:
    compile_blocks, once --batch_size auto has probed the sharded model."""
    from torch.distributed.device_mesh import init_device_mesh

    MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method = fsdp_api()
    if dtype == torch.float16:
        raise UsageError("--fsdp runs in bfloat16 or float32 (float16 would need a sharded gradient scaler): use "
                         "--dtype bfloat16 or float32")
    mesh = init_device_mesh(ctx.device_type, (ctx.world_size,))
    # bf16: FSDP casts the gathered weights to bf16 for compute, keeps the fp32 master shards, and reduces gradients
    # in fp32. Autocast on top would only re-cast the same weights, so it is switched off (LayerNorm runs in bf16).
    # Inputs are not cast: a block's come from the bf16 root already, and the rotary cos/sin tables (--arch modern)
    # stay float32 as under DDP's autocast
    param_dtype = None if dtype == torch.float32 else dtype
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    # sampling and HellaSwag call these instead of forward(): they must gather the root's weights too
    register_fsdp_forward_method(model, "generate")
    register_fsdp_forward_method(model, "logits_at")
    if ctx.master:
        name = str(dtype).replace("torch.", "")
        compute = name if dtype == torch.float32 else f"{name} (FSDP casts the weights; no autocast)"
        print(f"FSDP: {len(model.transformer.h)} blocks + root sharded over {ctx.world_size} ranks | compute {compute} "
              "| gradients reduced in float32")


def compile_blocks(model):
    """Compile each block in place (names unchanged), as Module.compile does: its whole call, FSDP's hooks
    included, so that under FSDP each compiled graph sits between two all-gathers. Compiled for training only: a
    block in eval() mode (the val loss, sampling's KV-cache prefill and one-token steps, HellaSwag's logits_at of
    varying shapes) runs eagerly, where each new shape would compile a graph of its own on every rank, up to
    Dynamo's recompile limit."""
    def training_only(block):
        compiled = torch.compile(block._call_impl)
        return lambda *args, **kwargs: (compiled if block.training else block._call_impl)(*args, **kwargs)

    for block in model.transformer.h:
        block._compiled_call_impl = training_only(block)  # what Module.compile sets, and Module.__call__ calls


def state_bytes_per_rank(model, optimizer):
    """Bytes this rank holds of parameters, gradients and optimizer state (its shards under FSDP)."""
    params = list(model.parameters())
    opt_tensors = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return {
        "parameters": sum(local_part(p).nbytes for p in params),
        "gradients": sum(local_part(p.grad).nbytes for p in params if p.grad is not None),
        "optimizer": sum(local_part(v).nbytes for v in opt_tensors),
    }


def state_memory_line(model, optimizer, ctx):
    b = state_bytes_per_rank(model, optimizer)
    how = "a full copy" + (" on every rank" if ctx.ddp else "")
    how = f"FSDP, 1/{ctx.world_size} each" if is_sharded(model) else how
    return "state per rank: " + " | ".join(f"{k} {v / 2**20:.3f} MiB" for k, v in b.items()) + f" ({how})"


def rekey_optimizer_state(state, key):
    """An optimizer state_dict with each parameter's key k replaced by key[k] (names <-> param-group order)."""
    groups = [{**g, "params": [key[k] for k in g["params"]]} for g in state["param_groups"]]
    return {"state": {key[k]: s for k, s in state["state"].items()}, "param_groups": groups}


def full_state_dicts(model, optimizer, ctx):
    """(model state_dict, optimizer state_dict) of the whole model on rank 0, (None, None) on the others.
    Under FSDP every rank must call it: the shards are gathered one tensor at a time and moved to CPU (cpu_offload),
    so no GPU ever holds the whole optimizer state. The optimizer's is converted to a plain AdamW's format."""
    if not is_sharded(model):
        return (model.state_dict(), optimizer.state_dict()) if ctx.master else (None, None)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    if not ctx.master:
        return None, None
    # keyed by parameter name here; a plain optimizer numbers its parameters 0, 1, ... in param-group order
    index = {name: i for i, name in enumerate(n for g in optim_state["param_groups"] for n in g["params"])}
    return model_state, rekey_optimizer_state(optim_state, index)


def load_optimizer_state(model, optimizer, state):
    """Load a plain AdamW state_dict (from any of single process, DDP, FSDP) into the optimizer; under FSDP each
    rank keeps its shards of the full tensors (every rank has read the checkpoint)."""
    if not is_sharded(model):
        if next(model.parameters()).device.type == "cpu":
            # AdamW keeps the very tensors it is given on the CPU: copies, not pages of the memory-mapped checkpoint
            # (whose mapping would then hold the file, even once pruned, for the whole run)
            state = copy.deepcopy(state)
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    name_of = {id(p): name for name, p in model.named_parameters()}
    names = [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]
    named = rekey_optimizer_state(state, names)
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))


# -----------------------------------------------------------------------------
# What fits in GPU memory: the loss path and --batch_size auto


# the float32 logits may take this share of the free GPU memory before the loss is computed in chunks
FULL_LOGITS_MEMORY_FRACTION = 0.25


# The eager full-logits loss (uncompiled root: --compile 0, or FSDP, which compiles the blocks) holds several float32
# (B, T, vocab) tensors: what it saves for backward (distinct tensors, counted with saved_tensors_hooks: GPT-2's head
# log-softmax's output, nll_loss saving the same one; the soft-capped head of --arch modern also tanh's output) and,
# in log-softmax's backward, the gradient coming in and the one going out. GPT-2: 1 + 2, modern: 2 + 2. Compiled
# (not FSDP), torch.compile fuses the head and the loss: one
EAGER_SOFTCAP_LOGITS_COPIES = 4
EAGER_GPT2_LOGITS_COPIES = 3


def full_logits_fit(model, ctx, B, T, fused_head=True):
    """Whether a training micro-batch B x T takes the full-logits path (F.cross_entropy over all the logits,
    build-nanogpt's, which torch.compile fuses with the head: fused_head) rather than chunks: on CUDA when its float32
    logits (and their copies) take at most FULL_LOGITS_MEMORY_FRACTION of the free memory. CPUs always chunk:
    measured faster there and 54% lighter (bench.py --mode memory)."""
    if ctx.device_type != "cuda":
        return False
    copies = 1 if fused_head else EAGER_GPT2_LOGITS_COPIES if model.softcap is None else EAGER_SOFTCAP_LOGITS_COPIES
    logits_bytes = copies * B * T * model.config.vocab_size * 4
    return logits_bytes <= torch.cuda.mem_get_info(ctx.device)[0] * FULL_LOGITS_MEMORY_FRACTION


def find_batch_size(fits, largest):
    """The largest divisor B of largest for which fits(B) is True, by bisection (fits must be monotone in B).
    With largest = total_batch_size // (T * world_size) every divisor is a micro-batch the total batch allows."""
    candidates = [b for b in range(1, largest + 1) if largest % b == 0]
    if fits(candidates[-1]):
        return candidates[-1]
    lo, hi = -1, len(candidates) - 1  # candidates[lo] fits (-1: none known), candidates[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(candidates[mid]) else (lo, mid)
    if lo < 0:
        raise UsageError("--batch_size auto: not even a micro-batch of 1 fits in memory; use a smaller --model or "
                         "--seq_len")
    return candidates[lo]


def grow_batch_size(candidates, peak, budget):
    """The largest of the ascending candidates b with peak(b) <= budget(b), trying them in order and stopping at
    the first that fails or that the line through the last two peaks measured (from peak(0)) puts over budget.
    0 if none fits."""
    points, best = [(0, peak(0))], 0
    for b in candidates:
        if len(points) > 1:
            (b0, m0), (b1, m1) = points[-2:]
            if m1 + (m1 - m0) * (b - b1) / (b1 - b0) > budget(b):
                break
        m = peak(b)
        if m > budget(b):
            break
        best = b
        points.append((b, m))
    return best


def cuda_probe_peak(model, B, T, device, dtype):
    """Peak bytes allocated during a forward and backward of micro-batch B (the model's own included); inf if it
    runs out of memory."""
    x = torch.randint(0, GPT2_VOCAB, (B, T), device=device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        with common.autocast_context(device.split(":")[0], dtype):
            _, loss = model(x, x)
        loss.backward()
        return torch.cuda.max_memory_allocated(device)
    except torch.cuda.OutOfMemoryError:
        if is_sharded(model) and hasattr(model, "reset_iter_state"):  # FSDP stopped mid-forward or -backward
            model.reset_iter_state()
        return math.inf
    finally:
        model.zero_grad(set_to_none=True)
        loss = None
        torch.cuda.empty_cache()


# share of the GPU memory a probed step may peak at: the rest is for what the uncompiled probe does not show
# (compile's workspace, the allocator's fragmentation, the val and HellaSwag passes)
BATCH_PROBE_MEMORY_FRACTION = 0.85


def training_state_bytes(num_params, ddp, fsdp_shards=0, accumulating=False):
    """GPU bytes training holds that a forward+backward probe does not allocate: AdamW's two float32 moments per
    parameter, and under DDP its float32 gradient buckets. Under FSDP (fsdp_shards ranks) the moments are sharded,
    and FSDP accumulates float32 gradients of the whole model between micro-steps."""
    if fsdp_shards:
        return num_params * 8 // fsdp_shards + (num_params * 4 if accumulating else 0)
    return num_params * (8 + (4 if ddp else 0))


def cuda_usable_bytes(ctx):
    """The GPU memory this process may use: what the other processes on this GPU leave us."""
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info(ctx.device)[0] + torch.cuda.memory_reserved(ctx.device)


def agree_batch_size(find, ctx):
    """find() on this rank, then the smallest B over the ranks. A rank where nothing fits (find raises) still joins
    the all-reduce, so that every rank stops with the error instead of waiting for it until the NCCL timeout."""
    try:
        B, error = find(), None
    except UsageError as e:
        B, error = 0, e
    B = int(common.agreed(B, ctx, dist.ReduceOp.MIN))
    if B == 0:
        raise error or UsageError("--batch_size auto: not even a micro-batch of 1 fits in memory on another rank; "
                                  "use a smaller --model or --seq_len")
    return B


def fsdp_batch_size(model, ctx, dtype, T, largest, loss_chunk_size):
    """--batch_size auto under FSDP, probing the sharded model. Its forward and backward are collectives: every rank
    runs the same probes (the smallest budget and the largest peak over ranks decide), and none that is expected
    to run out of memory, since one rank failing would leave the others waiting in an all-gather. So micro-batches
    go from small to large, each probed only if the line through the last two peaks keeps it within budget."""
    usable = common.agreed(cuda_usable_bytes(ctx), ctx, dist.ReduceOp.MIN)
    n = model.num_params()

    def budget(b):  # the optimizer's shards, and the unsharded gradients accumulated when b needs micro-steps
        return int(usable * BATCH_PROBE_MEMORY_FRACTION) - training_state_bytes(n, ctx.ddp, ctx.world_size, b < largest)

    def peak(b):
        if b == 0:  # the shards alone
            return common.agreed(torch.cuda.memory_allocated(ctx.device), ctx, dist.ReduceOp.MAX)
        model.loss_chunk_size = loss_chunk_size(b)
        return common.agreed(cuda_probe_peak(model, b, T, ctx.device, dtype), ctx, dist.ReduceOp.MAX)

    B = grow_batch_size([b for b in range(1, largest + 1) if largest % b == 0], peak, budget)
    model.loss_chunk_size = None
    if not B:
        raise UsageError("--batch_size auto: not even a micro-batch of 1 fits in memory under FSDP; "
                         "use more GPUs, a smaller --model or --seq_len")
    return B


def choose_batch_size(model, ctx, dtype, T, total_batch_size, loss_chunk_size):
    """--batch_size auto: the largest micro-batch that fits and divides the total batch (the same on every rank),
    each probed on the loss path training gives it (loss_chunk_size(B)). Under FSDP `model` is the sharded model."""
    if total_batch_size % (T * ctx.world_size):
        raise UsageError(f"--total_batch_size {total_batch_size} is not a multiple of seq_len*world_size = "
                         f"{T}*{ctx.world_size}, so no micro-batch adds up to it")
    largest = total_batch_size // (T * ctx.world_size)
    if ctx.device_type == "cuda" and is_sharded(model):
        return agree_batch_size(lambda: fsdp_batch_size(model, ctx, dtype, T, largest, loss_chunk_size), ctx)
    if ctx.device_type == "cuda":
        share = int(cuda_usable_bytes(ctx) * BATCH_PROBE_MEMORY_FRACTION)
        budget = share - training_state_bytes(model.num_params(), ctx.ddp)  # what a probed step may peak at

        def fits(b):
            model.loss_chunk_size = loss_chunk_size(b)  # the path training will use
            return cuda_probe_peak(model, b, T, ctx.device, dtype) <= budget

        B = agree_batch_size(lambda: find_batch_size(fits, largest), ctx)
        model.loss_chunk_size = None
        return B
    # no reliable out-of-memory signal off CUDA: the OS kills the process instead. ~6 GB for gpt2 at T=1024
    return agree_batch_size(lambda: find_batch_size(lambda b: b * T <= 8192, largest), ctx)


