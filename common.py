"""
What every part of a run shares (nanochat's common.py): the errors the command line turns into one-line messages,
the rank-0 print, the GPT-2 tokenizer, the device and its precision (autocast dtype, TF32, peak FLOPs), the launch
(one process per GPU under torchrun, srun or mpirun) and the collectives the ranks agree with, and stop signals.
Never imports train_gpt2.
"""

import contextlib
import ctypes
import os
import re
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import tiktoken
import torch
import torch.distributed as dist

GPT2_EOT = 50256
GPT2_VOCAB = 50257  # real GPT-2 token ids are < 50257; ids above that only pad the embedding table


class UsageError(ValueError):
    """Bad input from the user: main() prints its one-line message instead of a traceback. (The model raises plain
    ValueErrors; where the command line builds, loads or exports one, they become UsageErrors.)"""


class TrainingDiverged(RuntimeError):
    pass


class CheckpointWriteFailed(RuntimeError):
    """Rank 0 could not write a checkpoint: every rank stops at that step; rank 0 says why."""


def print0(*args, **kwargs):
    """print on global rank 0 only (RANK, set by torchrun and by setup_distributed's launchers; unset: one process)."""
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs)


def gpt2_tokenizer():
    """tiktoken's GPT-2 BPE, which it downloads on first use into its cache (TIKTOKEN_CACHE_DIR)."""
    try:
        return tiktoken.get_encoding("gpt2")
    except OSError as e:  # requests' errors are OSErrors
        raise UsageError(f"cannot download the GPT-2 tokenizer ({type(e).__name__}); connect to the internet once "
                         "(tiktoken caches it), or set TIKTOKEN_CACHE_DIR to a cache that has it") from None


def autocast_context(device_type, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


@contextlib.contextmanager
def model_errors_as_usage_errors():
    """The model raises plain ValueErrors (an unknown --model, a bad --init_from, an arch that does not export):
    around the calls that build, load or export it for the command line, they are the user's input errors."""
    try:
        yield
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None


# -----------------------------------------------------------------------------
# The device and its precision


def pick_device(requested="auto"):
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def cpu_has_native_bf16():
    # AVX512-BF16 or AMX: bf16 matmuls at twice the fp32 rate or more; elsewhere bf16 is emulated and slow
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and not {"avx512_bf16", "amx_bf16"}.isdisjoint(flags)
    except (OSError, AttributeError, RuntimeError):
        return False


def pick_dtype(requested, device_type):
    """The autocast dtype. bf16 has float32's exponent range, so unlike fp16 it needs no loss scaling;
    fp16 is for GPUs without bf16 (V100, T4)."""
    if requested != "auto":
        return getattr(torch, requested)
    if device_type == "cuda":
        # bf16 tensor cores start with Ampere (compute capability 8.0). torch.cuda.is_bf16_supported() also says yes
        # on V100/T4 (sm70/sm75), where bf16 is emulated: slow, and the MFU would be against the wrong peak
        return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
    if device_type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


# dense bf16 tensor-core peak FLOP/s from the datasheets (no sparsity); the first name found in the device name wins
GPU_PEAK_FLOPS = [
    ("H200", 989e12), ("H100 NVL", 835e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12),  # H100: SXM
    ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12),
    ("A10G", 70e12), ("A10", 125e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12), ("A6000", 155e12),
    ("V100", 125e12), ("T4", 65e12),  # fp16 (no bf16 tensor cores)
]


def gpu_peak_flops(device_name):
    """The peak of the named GPU; of a MIG slice ("NVIDIA A100-SXM4-40GB MIG 3g.20gb"), its share: N of the 7
    compute slices (approximate: an A100's 1g has 14 of its 108 SMs, 0.13 against 1/7)."""
    peak = next((flops for key, flops in GPU_PEAK_FLOPS if key in device_name), None)
    mig = re.search(r"MIG (\d)g\.", device_name)
    return peak * int(mig.group(1)) / 7 if peak and mig else peak


def flops_per_token(config, T):
    """Training FLOPs per token: 6 per parameter (forward 2, backward 4) plus attention's QK^T and AV
    (PaLM paper, appendix B). The embeddings do no matmul, so they are left out; the modern block has the same
    matmuls (its norms, rotary and soft-cap are elementwise, negligible): one formula for both archs."""
    # lm_head (one matmul, tied with wte or not), then per layer attention 4 C^2 and MLP 8 C^2
    N = config.vocab_size * config.n_embd + config.n_layer * 12 * config.n_embd**2
    return 6 * N + 12 * config.n_layer * config.n_embd * T


def tune_cpu_allocator():
    """Keep big buffers (activations, logits) on glibc's heap: by default blocks over 32 MB are mmapped and
    unmapped on free, and every step paid page faults for hundreds of MB, ~30% of a CPU step's time."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, Windows, musl)
        return
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest it takes


def setup_device(requested_dtype, seed, ctx):
    """The dtype the run trains in (--dtype), with the device's fast math switched on and the seeds set."""
    dtype = pick_dtype(requested_dtype, ctx.device_type)
    if dtype == torch.float16 and ctx.device_type != "cuda":
        raise UsageError("--dtype float16 needs a CUDA GPU (it is for GPUs without bf16); use --dtype bfloat16 or "
                         "float32")
    if ctx.device_type == "cuda":
        # TF32 tensor cores for the float32 matmuls that autocast leaves (10-bit mantissa, plenty for training)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.manual_seed(seed)
    if ctx.device_type == "cpu":
        tune_cpu_allocator()
    torch.manual_seed(seed)
    return dtype


# the RNG states a checkpoint keeps for each rank, so that a resumed run continues exactly
def get_rng_state(generator):
    state = {"torch": torch.get_rng_state(), "sample": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    # a CUDA generator's state is 16 bytes, a CPU one's 5056: a checkpoint from the other device type keeps the
    # sampling generator as seeded (the training losses do not depend on it)
    if state["sample"].numel() == generator.get_state().numel():
        generator.set_state(state["sample"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class ReadAhead:
    """Has the OS start reading a window of a memory-mapped token shard from disk while the GPU computes: the random
    windows of --shuffle defeat its readahead, and a cold 128 KiB read costs ~0.5 ms, near 1% of a GPU step."""

    def __init__(self):
        self._fds = {}  # file name -> descriptor

    def __call__(self, data, start, length):
        """Tokens start .. start+length of data (an np.memmap; anything else is in memory already)."""
        if not isinstance(data, np.memmap) or not hasattr(os, "posix_fadvise"):
            return
        if data.filename not in self._fds:
            self._fds[data.filename] = os.open(data.filename, os.O_RDONLY)
        where, size = data.offset + start * data.itemsize, length * data.itemsize
        os.posix_fadvise(self._fds[data.filename], where, size, os.POSIX_FADV_WILLNEED)

    def __del__(self):
        for fd in self._fds.values():
            os.close(fd)


# -----------------------------------------------------------------------------
# Launch: one process per GPU under torchrun, srun or mpirun, and what the ranks agree on


@dataclass
class DistContext:
    ddp: bool
    rank: int
    local_rank: int
    world_size: int
    device: str
    file_group: object = None  # under torchrun: the group that waits for rank 0's file I/O (setup_distributed)

    @property
    def master(self):
        return self.rank == 0

    @property
    def device_type(self):  # cuda, cpu or mps: what autocast and the fused kernels ask for
        return self.device.split(":")[0]


def local_rank_from_env(rank):
    """The GPU of this process on its node (RANK is global across nodes): LOCAL_RANK from torchrun, else the local
    rank Slurm or MPI set (srun, mpirun), else RANK modulo the GPUs of a node (ranks numbered node by node)."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID", "OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID"):
        if name in os.environ:
            return int(os.environ[name])
    return rank % max(1, torch.cuda.device_count())


def restart_safe_group(rank, world_size):
    """init_process_group's store under torchrun. torchrun --max-restarts gives every attempt the same rendezvous
    store: a restarted group would read the dead one's addresses (a hang, or "Connection refused"), so the keys of
    each attempt get a prefix of their own. Without torchrun (srun, mpirun): {}, env:// as usual."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    store, _, _ = next(dist.rendezvous("env://"))
    return dict(store=dist.PrefixStore(f"attempt{attempt}/", store), rank=rank, world_size=world_size)


def cuda_device(local_rank):
    """This process's GPU: its local rank among the node's GPUs, or the one GPU a process sees where each task gets
    its own (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per rank), whose ordinal is 0 whatever its rank."""
    return f"cuda:{local_rank % max(1, torch.cuda.device_count())}"


# How long the ranks wait for rank 0's checkpoint I/O (writing one, picking the one to resume). NCCL's default 10
# minutes stays on the training collectives, where it catches a hung rank; but gpt2-xl's ~19 GB checkpoint on slow
# shared storage can take longer than that to write and fsync, and the ranks waiting in a collective would be
# killed by the watchdog. So they wait in a CPU (gloo) group of their own with a timeout no write reaches: a side
# group rather than a --timeout flag, as no single value is right for every file system, and a rank 0 that hangs
# for good still ends with the job's time limit.
FILE_IO_TIMEOUT = timedelta(days=7)


def setup_distributed(requested_device):
    """Under torchrun (RANK and WORLD_SIZE set): one process per GPU with NCCL, or per CPU process with gloo."""
    device = pick_device(requested_device)
    if not ("RANK" in os.environ and "WORLD_SIZE" in os.environ):
        if device.startswith("cuda:"):  # else seeding, synchronize, the dtype's capability query act on GPU 0
            torch.cuda.set_device(device)
        return DistContext(False, 0, 0, 1, device)
    # Import dynamo before the process group exists. Imported afterwards (DDP and torch.compile import it), it keeps
    # a reference to the group, so destroy_process_group cannot join gloo's worker threads; one that frees its last
    # tensor after Python has begun shutting down aborts the process ("terminate called without an active exception").
    from torch import _dynamo  # noqa: F401 (binds no local `torch`, which the lines above use)

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = local_rank_from_env(rank)
    group = restart_safe_group(rank, world_size)
    if device.startswith("cuda"):
        device = cuda_device(local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", device_id=torch.device(device), **group)
    else:
        dist.init_process_group(backend="gloo", **group)
    file_group = dist.new_group(backend="gloo", timeout=FILE_IO_TIMEOUT)
    return DistContext(True, rank, local_rank, world_size, device, file_group)


def all_reduce_mean(value, ctx):
    """The mean of a scalar tensor over ranks (gloo has no AVG, so SUM / world_size)."""
    if ctx.ddp:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value = value / ctx.world_size
    return value


def gather_objects(obj, ctx):
    if not ctx.ddp:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def agreed(value, ctx, op, group=None):
    """A number agreed over the ranks (op: MIN or MAX; a collective: every rank calls it); as is in one process.
    group: ctx.file_group to wait out rank 0's file I/O (CPU tensors, FILE_IO_TIMEOUT), else the default group."""
    if not ctx.ddp:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device="cpu" if group is not None else ctx.device)
    dist.all_reduce(t, op=op, group=group)
    return t.item()


def any_rank(flag, ctx, group=None):
    """True on every rank if flag is True on any (in group, see agreed)."""
    return bool(agreed(flag, ctx, dist.ReduceOp.MAX, group))


def decided_by_rank0(decide, ctx):
    """decide() on rank 0 alone, and its result (or its UsageError) on every rank: one answer where each rank could
    find its own (directory listings on NFS can differ between nodes). The others wait in the file I/O group: rank 0
    may read a big checkpoint meanwhile."""
    if ctx is None or not ctx.ddp:
        return decide()
    box = [None]
    if ctx.master:
        try:
            box[0] = (decide(), None)
        except UsageError as e:
            box[0] = (None, str(e))
    dist.broadcast_object_list(box, src=0, group=ctx.file_group)
    result, error = box[0]
    if error is not None:
        raise UsageError(error)
    return result


# -----------------------------------------------------------------------------
# Stopping: on a signal, and at the end of a torchrun worker


class StopSignal:
    """SIGTERM (what a cluster sends before preemption), SIGUSR1 (SLURM's --signal=USR1@120 before the time limit)
    or Ctrl-C: finish the step, checkpoint, exit. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self):
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint", flush=True)

    def agreed(self, ctx):
        """True on every rank if any rank was signalled, so that all ranks stop at the same step."""
        return any_rank(self.requested, ctx)


def exit_without_teardown(code):
    """End a torchrun worker without Python's interpreter teardown. Gloo's worker threads can outlive the destroyed
    process group; one that frees its last tensor while the interpreter shuts down aborts the process ("terminate
    called without an active exception", SIGABRT), which turns a finished run into a failed one (seen in CI under
    FSDP). Everything the run writes is closed and synced before main() returns."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)




def run_script(main):
    """main() as a script. Under torchrun (RANK set) the worker ends without the interpreter's teardown, with main's
    exit code (its one-line errors' too)."""
    if "RANK" not in os.environ:
        return main()
    try:
        main()
    except SystemExit as e:
        if not isinstance(e.code, int):
            raise
        exit_without_teardown(e.code)
    exit_without_teardown(0)
