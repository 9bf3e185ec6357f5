"""What ``torch.compile`` costs a run, and how to pay it once: :func:`enable_compile_cache`
(compiled code kept on disk between processes) and :func:`recommend_compile` (whether
``compile=True`` pays for itself over a run). The compiled kernel itself is
:mod:`amaml.flow.kernels.compiled`."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV", "enable_compile_cache", "recommend_compile"]

#: Environment variable naming the cache folder of :func:`enable_compile_cache`.
CACHE_ENV = "AMAML_CACHE"


def enable_compile_cache(directory: str | os.PathLike[str] | None = None) -> Path:
    """Keep ``torch.compile``'s compiled code on disk, so that later processes reuse it.

    Points TorchInductor's on-disk caches (the FX graph cache of compiled kernels and the
    AOTAutograd cache of forward/backward graphs) to ``directory``, by default
    ``$AMAML_CACHE`` or else ``~/.cache/amaml/torch-compile``, and switches them on. A
    process that then compiles the same steps (same model, loss, shapes, dtype, torch
    version) loads the kernels instead of generating and building C++ or Triton code;
    Dynamo still traces the Python (a few seconds). torch's own default is a folder under
    ``/tmp``, which a reboot or a fresh container empties.

    Call it once at start-up, before the first compilation. It sets process-wide state
    (``TORCHINDUCTOR_CACHE_DIR``, ``TORCHINDUCTOR_FX_GRAPH_CACHE``,
    ``TORCHINDUCTOR_AUTOGRAD_CACHE`` and the matching ``torch._inductor.config`` /
    ``torch._functorch.config`` flags), as torch's caches are process-wide.

    Measured on the paper's MLP (``benchmarks/bench_compile_cache.py``, 2 CPU cores,
    torch 2.13, 2026-11-28): the first compiled ``adapt(..., memory="store",
    compile=True)`` meta-gradient of a fresh process took 16.7 s with an empty cache and
    3.2 s in a second process with the cache the first one filled (idle machine; 71.3 s
    and 10.6 s under a load of 6).

    Args:
        directory: The cache folder; created if missing.

    Returns:
        The cache folder, absolute.
    """
    if directory is None:
        env = os.environ.get(CACHE_ENV)
        base = Path(env) if env else Path.home() / ".cache" / "amaml"
        path = base / "torch-compile"
    else:
        path = Path(directory)
    path = path.expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    for config, name in ((inductor_config, "fx_graph_cache"),
                         (functorch_config, "enable_autograd_cache")):
        if hasattr(config, name):
            setattr(config, name, True)
    return path


def recommend_compile(n_steps: int, meta_iters: int, n_tasks: int, device: str) -> bool:
    """Whether ``compile=True`` pays for its compilation over a whole meta-training run.

    Compiling costs a one-off ``C`` seconds per process (model, loss and shapes) and saves
    ``s`` seconds per inner step and task on every later meta-gradient; it pays when
    ``n_steps * meta_iters * n_tasks * s > C``. Measured on the paper's MLP (2-32-32-1
    tanh, 100 support points, float32, one CPU thread, torch 2.13, 2 cores;
    ``benchmarks/bench_compile_cache.py``, 2026-11-28, after the C++-wrapped compiled
    steps and the leaner fused eager path): eager store 0.62 ms per inner step and task,
    compiled store 0.28 to 0.33 ms, so ``s`` is about 0.32 ms; ``C`` was 16 to 17 s with
    an empty cache and 3.2 to 3.6 s with a warm one (:func:`enable_compile_cache`) on an
    idle machine, and 71 s (empty cache) on the same machine under a load of 6. Break-even
    is therefore about 5 x 10^4 task-steps with an empty cache on an idle machine (e.g.
    100 steps x 5 tasks x 100 meta-iterations) and 10^4 with a warm one. The rule asks for
    1.5 times the empty-cache break-even (7.5 x 10^4 task-steps): the timings of this
    shared machine vary by 20 to 50% (and compilation by 4x under load), and the saving
    per step shrinks for larger models, where arithmetic rather than dispatch dominates.

    On CUDA, per-op launch latency makes eager steps dispatch-bound too, and compilation
    (Triton) is slower; the same threshold is used, unmeasured on GPUs here.

    Args:
        n_steps: Inner steps per adaptation.
        meta_iters: Meta-gradients in the run.
        n_tasks: Tasks per meta-gradient.
        device: ``"cpu"`` or ``"cuda"`` (or a ``torch.device`` string such as
            ``"cuda:0"``).

    Returns:
        ``True`` if the run is long enough for compilation to pay, with margin.

    Raises:
        ValueError: A count below 1 or an unknown device type.
    """
    for name, value in (("n_steps", n_steps), ("meta_iters", meta_iters),
                        ("n_tasks", n_tasks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1; got {value!r}.")
    kind = str(device).split(":")[0]
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (optionally 'cuda:N'); got "
                         f"{device!r}.")
    return 2 * n_steps * meta_iters * n_tasks >= 3 * _BREAK_EVEN_TASK_STEPS


#: Inner task-steps after which compilation has paid for itself (empty cache, CPU, the
#: paper's MLP, idle machine): about 16 s / 0.32 ms; see :func:`recommend_compile`.
_BREAK_EVEN_TASK_STEPS = 50_000
